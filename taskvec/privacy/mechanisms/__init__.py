"""Privacy mechanisms, one module each: a `taskvec.privacy.mechanism.Mechanism` subclass registered with
`@register`, found by `taskvec.privacy.mechanism.mechanisms()` without being listed anywhere else."""
