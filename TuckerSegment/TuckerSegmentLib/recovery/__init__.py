"""Recovering accuracy after compression by training the compressed network.

``distill``: label-free, the compressed network learns to reproduce the original's softmax on patches of
unlabeled CTs; ``compress_distill``: compression and distillation into one output (``compress --distill N``,
the compression panel, ``build-variants --distill N``). ``resume``: the resumable training state every
recovery method keeps beside its output (safetensors + JSON, no pickle), so an interrupted run continues
where it stopped.
"""
