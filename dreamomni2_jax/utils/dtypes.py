"""Floating-point dtype names and the numpy dtypes they stand for (one table for configs, CLIs and files).

Two spellings are in use: the short names of the command lines and LoRA / converted files (``bf16``, ``fp16``,
``fp32``) and the long names of the config (``model.param_dtype = "bfloat16"``). Both map to numpy dtypes
(``bfloat16`` from ml_dtypes, which JAX uses as ``jnp.bfloat16``), so the values work for numpy and JAX alike.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16, FP16, FP32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)
SHORT: dict[str, np.dtype] = {"bf16": BF16, "fp16": FP16, "fp32": FP32}
LONG: dict[str, np.dtype] = {"bfloat16": BF16, "float16": FP16, "float32": FP32}


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a short or long float name, or of any name numpy knows (``"int32"``)."""
    if name in SHORT:
        return SHORT[name]
    if name in LONG:
        return LONG[name]
    return np.dtype(name)


def short_name(dtype) -> str | None:
    """``bf16`` / ``fp16`` / ``fp32`` for those float dtypes, else None."""
    dt = np.dtype(dtype)
    return next((k for k, v in SHORT.items() if v == dt), None)
