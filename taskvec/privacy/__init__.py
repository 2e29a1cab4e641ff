"""Privacy: the ledger schema, mechanisms and their accountants (analytic Gaussian for export noise,
Opacus PRV/RDP for DP-SGD), budgets, release records, and the DP-SGD glue around Opacus.

Imports `taskvec.io` and `taskvec.models`; never training, merging or anything above.
"""

DEFAULT_SAMPLE_RATE = 0.25  # DP-SGD's q: each unit's chance to be in a step's batch (an epoch is 4 steps)
