"""Registry backends, one module per address scheme, each declaring itself with
`taskvec.registry.store.register_store`; `taskvec.registry.address` imports every module here."""
