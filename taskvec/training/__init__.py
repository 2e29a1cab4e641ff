"""Training: data loading and splits by patient, the fine-tuning loop (resumable, with the DP-SGD seam),
evaluation and metrics.

Imports `taskvec.io`, `taskvec.models` and `taskvec.privacy`; never merging, audits or simulation.
"""
