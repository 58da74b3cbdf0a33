"""dreamomni2-jax: JAX/Flax NNX trainer for DreamOmni2-style multi-reference LoRAs on Flux Kontext.

Stages (one module each): convert (``convert/``) -> cache (:mod:`.cache`) -> stream (:mod:`.data`) ->
step (:mod:`.train_step`) -> checkpoint (:mod:`.checkpoint`) -> export (``convert/export_lora.py``)
-> sample (:mod:`.sampler`). Position ids and RoPE: :mod:`.positions`, :mod:`.rope`.
"""

__version__ = "0.1.0"
