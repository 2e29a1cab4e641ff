"""Models: the `ModelSpec` that rebuilds a timm module from a file's header, base creation, saving and
loading model files, segmentation models (smp decoders over timm encoders), and DP-ready conversion of a model's layers.

Imports `taskvec.io` (and `taskvec.errors`); nothing above.
"""
