"""Privacy: the ledger's entries (`entries`), the mechanisms that write them (`mechanism`, one module each in
`mechanisms/`), their accountants (`accounting`: analytic Gaussian, Opacus PRV/RDP), merge budgets (`budget`),
release records (`releases`), the DP-SGD engine around Opacus (`dpsgd`), and `ledger`, which gathers the API
the rest of taskvec uses.

Imports `taskvec.io` and `taskvec.models`; never training, merging or anything above.
"""

DEFAULT_SAMPLE_RATE = 0.25  # DP-SGD's q: each unit's chance to be in a step's batch (an epoch is 4 steps)
