"""Merging: export of data vectors (delta, clipping, export-time noise), merge methods, the streaming and
incremental merges, and λ calibration on the merger's validation data.

Imports `taskvec.io`, `taskvec.models`, `taskvec.privacy` and `taskvec.training` (calibration evaluates);
never audits or simulation.
"""
