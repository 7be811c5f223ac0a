"""Offline trainer and evaluator for reward models (`bt` sequence RMs, `arm` GenARM guides).

Submodules import torch/transformers/TRL lazily; importing this package costs nothing.
See `aligner.training.cli` for the `train` and `eval-rm` commands.
"""
