"""Loaders for the models and data that run here (offline, from pinned registry packages), with
verified caches. Imports :mod:`stamp_lib.core` only.

* :mod:`.models`: SmolLM2-135M and Gemma-3-270M (GGUF, dequantized once), any local checkpoint.
* :mod:`.text`: the Wikipedia sample shipped with gensim, cleaned and tokenized into windows.
* :mod:`.galaxy`: the pretrained galaxy-image diffusion model (MLP-Mixer score network) and its
  VP-SDE sampler.
"""
