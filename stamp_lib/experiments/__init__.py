"""The experiments of the book and their command lines (``python -m stamp_lib <command>``).
Import everything below them.

* :mod:`.llm`: the LLM table (W4A4KV4 perplexity, with and without STaMP), window NLL.
* :mod:`.diffusion`: the galaxy image-generator experiment (paired SQNR against full precision).
* :mod:`.pixart`: the PixArt-Sigma path (real checkpoints on a machine that has them).
* :mod:`.seqstats`: sequence statistics of real activations (KLT vs DCT/WHT/DWT, chapter 2).
* :mod:`.bench`: benchmarks that print ratios measured side by side.
"""
