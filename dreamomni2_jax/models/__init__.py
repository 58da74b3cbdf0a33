"""Flax NNX ports of the Flux Kontext pipeline models (module names mirror diffusers / transformers)."""
