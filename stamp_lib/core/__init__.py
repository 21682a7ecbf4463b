"""Primitives: the maths of STaMP and the few utilities every layer needs. Imports only torch,
numpy and scipy (no models, no other ``stamp_lib`` package).

* :mod:`.transforms`: sequence transforms L (identity, DCT, WHT, Haar DWT 1-D / 2-D, KLT, token 0
  apart), fast paths with dense twins; :func:`.transforms.haar_levels` (the levels rule).
* :mod:`.hadamard`: Hadamard matrices (Sylvester, Paley), power-of-two radices, Kronecker products.
* :mod:`.quant`: min-max fake quantization, the STaMP operator, bit specs and bit allocation.
* :mod:`.bounds`: Theorem 1 and the measured error it bounds.
* :mod:`.metrics`: SQNR (whole and per sample), energy profiles.
* :mod:`.autocorr`: the sequence autocorrelation and its summaries (Toeplitz fraction, ...).
* :mod:`.stats`: paired differences with t intervals.
* :mod:`.checks`: input validation; :mod:`.io`: atomic writes, file lock, cache/results folders;
  :mod:`.cells`: resumable runs (one file per finished cell, keyed by knobs and code);
  :mod:`.workspace`: the fast paths' scratch buffers.
"""

from . import bounds, metrics, quant, transforms

__all__ = ["transforms", "quant", "bounds", "metrics"]
