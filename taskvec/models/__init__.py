"""Models: the `ModelSpec` that rebuilds a timm module from a file's header, base creation, saving and
loading model files, the segmentation head, and DP-ready conversion of a model's layers.

Imports `taskvec.io` (and `taskvec.errors`); nothing above.
"""
