"""The model layer: attach quantization to any torch / transformers / diffusers model by name
patterns, and undo it exactly. Imports :mod:`stamp_lib.core` and :mod:`stamp_lib.methods`.

* :mod:`.hooks`: module selection by name and the one hook registration (capture and recipes).
* :mod:`.capture`: activation capture (kept, reduced or streamed to disk).
* :mod:`.recipe`: recipes (rules of activation, weight and feature settings), ``prepare`` and
  ``apply`` (the context manager that restores the model bit for bit).
* :mod:`.kv`: K/V quantization (and QuaRot's Q/K rotation) through transformers' attention interface.
* :mod:`.quarot`: QuaRot's network rotation (fused norms, rotated residual stream, online and
  head-wise Hadamards), a model-level preparation step (``Recipe(network="quarot")``).
"""
