"""Offline weight converters: PyTorch safetensors checkpoints -> Orbax checkpoints of our Flax NNX params.

``safetensors_io`` (streaming reader/writer), ``table`` (declarative mapping engine + output format),
one module per model (``flux_transformer``, ...), each runnable as ``python convert/<name>.py``.
"""
