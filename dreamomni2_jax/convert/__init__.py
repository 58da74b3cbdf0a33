"""Offline weight converters: PyTorch safetensors checkpoints -> Orbax checkpoints of our Flax NNX params.

``table`` (declarative source -> ours mapping engine), ``component`` (one component: CLI + convert), one mapping
table per model (``flux_transformer``, ``flux2_transformer``, ``vae``, ``vae_flux2``, ``clip``, ``t5``, ``qwen3``),
``pipeline`` (a whole diffusers folder) and ``export_lora`` (LoRA export, diffusers or kohya). The command-line scripts are
``convert/<name>.py`` at the top of the repository. The output format and its (sharded) restore live in
:mod:`dreamomni2_jax.weights`; the model loaders in :mod:`dreamomni2_jax.convert.loaders`.
"""
