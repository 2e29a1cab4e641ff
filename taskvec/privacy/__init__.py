"""Privacy: the ledger's entries (`entries`), the mechanisms that write them (`mechanism`, one module each in
`mechanisms/`), their accountants (`accounting`: analytic Gaussian, Opacus PRV/RDP), merge budgets (`budget`),
release records (`releases`), the DP-SGD engine around Opacus (`dpsgd`), and `ledger`, which gathers the API
the rest of taskvec uses.

Imports `taskvec.io` and `taskvec.models`; never training, merging or anything above.
"""

# DP-SGD's recipe when the caller gives no other (torch-free, so the command line's defaults come from here)
DEFAULT_SAMPLE_RATE = 0.25  # q: each unit's chance to be in a step's batch (an epoch is 4 steps)
DEFAULT_DELTA = 1e-5  # δ: keep it below 1 / the number of units
DEFAULT_MAX_GRAD_NORM = 1.0  # C: each unit's gradient is clipped to this L2 norm
DEFAULT_AUGMULT = 2  # K augmented copies of each image, averaged before clipping (De et al. 2022)


def steps_per_epoch(sample_rate: float) -> int:
    """Steps of one DP-SGD epoch at sampling rate q: ⌊1/q⌋ (at least 1), as Opacus's Poisson sampler counts them."""
    return max(1, int(1 / sample_rate))
