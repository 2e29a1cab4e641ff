"""Merging: export of data vectors (delta, clipping, export-time noise), the merge-method registry
(`methods.py`), the merge plan (`plan.py`), hashed reading (`reading.py`), the streaming sums and consensus
(`accumulate.py`), diagnostics (`diagnose.py`), writing and `merge_vectors` (`stream.py`), incremental merges, and the
choices made on the merger's validation data: λ, the method, each site's value (`calibrate.py`).

Imports `taskvec.io`, `taskvec.models`, `taskvec.privacy` and `taskvec.training` (calibration evaluates);
never audits or simulation.
"""
