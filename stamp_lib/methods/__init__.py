"""Quantization methods that STaMP composes with, as preparation steps on calibration data.
Imports :mod:`stamp_lib.core` only.

* :mod:`.features`: right (feature) transforms R: rotations (QuaRot-style Hadamard) and scales.
* :mod:`.smoothquant`: SmoothQuant's per-channel scales.
* :mod:`.gptq`: GPTQ weight quantization and its Hessian accumulator.

:data:`FEATURE_OF` is the one table from a baseline's name to its feature transform (the LLM
chapter's ``rtn`` / ``smoothquant`` / ``quarot``, the image chapter's ``rtn`` / ``hadamard`` /
``svdquant``); ``svdquant`` adds a low-rank full-precision branch to SmoothQuant-style scales.
"""

FEATURE_OF = {"fp": None, "rtn": None, "smoothquant": "smoothquant", "quarot": "hadamard",
              "hadamard": "hadamard", "svdquant": "smoothquant"}

LLM_BASELINES = ("fp", "rtn", "smoothquant", "quarot")  # the paper's Table 2 rows (FlatQuant: not yet)
IMAGE_BASELINES = ("fp", "rtn", "hadamard", "svdquant")  # Table 1 / Figure 1 rows (ViDiT-Q: not yet)

__all__ = ["FEATURE_OF", "LLM_BASELINES", "IMAGE_BASELINES"]
