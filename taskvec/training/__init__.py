"""Training: data loading and splits by patient, the training modes (`modes/`, one module each), the
fine-tuning loop (`loop`) and its parts (`config`, `schedule`, `losses`, `augment`, `run_folder`, the DP-SGD
seam in `setup`), evaluation and metrics.

Imports `taskvec.io`, `taskvec.models` and `taskvec.privacy`; never merging, audits or simulation.
"""
