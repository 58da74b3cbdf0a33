"""Helpers shared by the FLUX.2 [klein] tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dreamomni2_jax.weights.safetensors_io import Reader, TensorInfo


def meta_reader(model) -> Reader:
    """A converter Reader over a torch model's parameter names / shapes (meta device: no data, full size)."""
    infos = {k: TensorInfo(Path("<meta>"), np.dtype(np.float32), tuple(v.shape), 0, 0)
             for k, v in model.state_dict().items()}
    return Reader(infos, Path(f"<meta {type(model).__name__}>"))
