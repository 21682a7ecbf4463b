"""Quantization methods that STaMP composes with, as preparation steps on calibration data.
Imports :mod:`stamp_lib.core` only.

* :mod:`.features`: right (feature) transforms R: rotations (QuaRot-style Hadamard) and scales.
* :mod:`.smoothquant`: SmoothQuant's per-channel scales.
* :mod:`.gptq`: GPTQ weight quantization and its Hessian accumulator.

:data:`FEATURE_OF` is the one table from a baseline's name to its feature transform (the LLM
chapter's ``rtn`` / ``smoothquant`` / ``hadamard``, the image chapter's ``rtn`` / ``hadamard`` /
``svdquant``); ``svdquant`` adds a low-rank full-precision branch to SmoothQuant-style scales.
``quarot`` and ``flatquant`` have no per-linear feature transform: they transform the whole network
(:mod:`stamp_lib.model.quarot`, ``Recipe(network="quarot")``; :mod:`stamp_lib.model.flatquant`,
``Recipe(network="flatquant")``, its learned transforms in :mod:`.flatquant`); ``hadamard`` is the per-linear
variant (an online Hadamard on every linear's input, folded into its weight).
"""

FEATURE_OF = {"fp": None, "rtn": None, "smoothquant": "smoothquant", "quarot": None, "flatquant": None,
              "hadamard": "hadamard", "svdquant": "smoothquant"}

# the paper's Table 2 rows, and the per-linear Hadamard variant ("hadamard")
LLM_BASELINES = ("fp", "rtn", "smoothquant", "quarot", "flatquant", "hadamard")
IMAGE_BASELINES = ("fp", "rtn", "hadamard", "svdquant")  # Table 1 / Figure 1 rows (ViDiT-Q: not yet)

__all__ = ["FEATURE_OF", "LLM_BASELINES", "IMAGE_BASELINES"]
