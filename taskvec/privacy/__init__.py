"""Privacy: the ledger schema, mechanisms and their accountants (analytic Gaussian for export noise,
Opacus PRV/RDP for DP-SGD), budgets, release records, and the DP-SGD glue around Opacus.

Imports `taskvec.io` and `taskvec.models`; never training, merging or anything above.
"""
