"""stamp_lib: a small, tested reference implementation of STaMP.

STaMP (Federici et al., ICLR 2026, arXiv 2510.26771) multiplies an activation X (s tokens x d
features) on the left by an invertible *sequence* transform L, quantizes each transformed token
with its own bit width, and undoes the transform: X_hat = L^{-1} Q(L X).

Core modules (pure torch, no model dependencies):

* :mod:`stamp_lib.transforms` - identity, DCT-II, sequency-ordered WHT, Haar DWT (1-D and 2-D
  token grid), KLT; fast paths and dense matrices that agree.
* :mod:`stamp_lib.quant` - min-max fake quantization (per token / per block, symmetric or not,
  clipping, per-row bit widths) and bit-allocation policies.
* :mod:`stamp_lib.bounds` - Theorem 1 and the measured STaMP error.
* :mod:`stamp_lib.metrics` - SQNR, energy profiles.
* :mod:`stamp_lib.study` - the size switch, seeds, results files and caches used by notebooks.

Model-facing modules (import them explicitly; they pull in transformers): ``models``, ``text``,
``capture``, ``galaxy``.
"""

from . import bounds, metrics, quant, study, transforms

__all__ = ["transforms", "quant", "bounds", "metrics", "study"]
__version__ = "0.1.0"
