"""The experiments of the book and their command lines (``python -m stamp_lib <command>``).
Import everything below them.

* :mod:`.llm`: the LLM table (W4A4KV4 perplexity, with and without STaMP), window NLL.
* :mod:`.diffusion`: the galaxy image-generator experiment (paired SQNR against full precision).
* :mod:`.pixart`: the PixArt-Sigma path (real checkpoints on a machine that has them).
* :mod:`.seqstats`: sequence statistics of real activations (KLT vs DCT/WHT/DWT, chapter 2).
* :mod:`.ablations`: what the gain is made of, allocation, length and bits sweeps (chapter 5).
* :mod:`.causality`: leaks of a sequence transform into earlier tokens, decoding (chapter 6).
* :mod:`.overhead`: counted FLOPs and timed cost of the transforms (chapter 6).
* :mod:`.zeroshot`: lm-eval zero-shot accuracy of a quantized model (``zeroshot`` command).
* :mod:`.runbook`: the paper models' commands, memory plan and results files (chapter 7).
* :mod:`.bench`: benchmarks that print ratios measured side by side.
* :mod:`.cli`: what the command lines share (argument checks, one-line errors, run facts).
"""
