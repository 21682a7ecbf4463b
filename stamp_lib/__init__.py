"""stamp_lib: a small, tested reference implementation of STaMP.

STaMP (Federici et al., ICLR 2026, arXiv 2510.26771) multiplies an activation X (s tokens x d
features) on the left by an invertible *sequence* transform L, quantizes each transformed token
with its own bit width, and undoes the transform: X_hat = L^{-1} Q(L X R) R^{-1}.

Module map (layers from the bottom; a package imports only the packages above it in this list):

=================  ===========================================================================
``core``           the maths and primitives: sequence transforms, Hadamard construction,
                   quantizers and bit specs, Theorem 1, metrics, autocorrelation, paired
                   statistics, validation, atomic files (torch / numpy / scipy only)
``methods``        methods STaMP composes with: feature transforms (Hadamard rotation, scales),
                   SmoothQuant, GPTQ (imports ``core``)
``model``          hooks, activation capture, recipes (prepare / apply, exact restore), K/V
                   quantization (imports ``core``, ``methods``; transformers for K/V)
``zoo``            offline loaders and caches: SmolLM2, Gemma-3, Wikipedia text, the galaxy
                   diffusion model (imports ``core``)
``experiments``    the book's experiments and command lines: LLM table, galaxy diffusion,
                   PixArt-Sigma, sequence statistics, benchmarks (imports all of the above)
``book``           book plumbing: run records, claims registry, plotting (imports ``core``)
=================  ===========================================================================

Command lines: ``python -m stamp_lib {llm,diffusion,pixart,bench} ...`` (``--help`` on each).
The core modules are also reachable as ``stamp_lib.core.transforms``, ``stamp_lib.core.quant``,
``stamp_lib.core.bounds`` and ``stamp_lib.core.metrics``.
"""

from .core import bounds, metrics, quant, transforms

__all__ = ["transforms", "quant", "bounds", "metrics"]
__version__ = "0.1.0"
