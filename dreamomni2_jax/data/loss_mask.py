"""Masked flow-matching loss (``train.loss_mask``): per-token loss weights of a sample, built on the host.

* ``manifest``: the record's own mask image (JSONL ``"mask"`` field, qflux ``NAME_mask.png``), resized to the
  target's latent size at cache time (stored as ``loss_mask`` [h, w] float in [0, 1]);
* ``difference`` (editing records): where the target's latent differs from its source's (first reference, the same
  latent size): ``mean_c |target - source| > train.mask_threshold``, grown by ``train.mask_dilate`` latent pixels
  (a square max filter). Computed from the cached latents when batches are assembled, so changing the threshold
  needs no re-caching.

A latent-resolution mask becomes a per-token weight by averaging each 2x2 patch (the token order of
:func:`positions.pack_latents`). Samples without a mask (a record with no mask image, a generation record under
``difference``) weigh every token 1. In the step the weight is ``mask_floor + (1 - mask_floor) * m`` and each
sample's loss is ``Σ w·err / Σ w`` over its real target tokens x channels (padding weighs 0), so a masked sample
is not down-weighted overall.
"""
from __future__ import annotations

import numpy as np

MODES = ("none", "manifest", "difference")


def token_weights(mask: np.ndarray) -> np.ndarray:
    """Latent-resolution mask [h, w] -> per-token weight [(h/2) * (w/2)] (2x2 patch average, row-major)."""
    h, w = mask.shape
    m = np.asarray(mask, np.float32).reshape(h // 2, 2, w // 2, 2)
    return m.mean(axis=(1, 3)).reshape(-1)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary square dilation (max filter of size ``2 * radius + 1``) of a [h, w] mask."""
    if radius <= 0:
        return mask
    h, w = mask.shape
    p = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out = np.maximum(out, p[dy:dy + h, dx:dx + w])
    return out


def difference_mask(target: np.ndarray, source: np.ndarray, threshold: float, radius: int) -> np.ndarray:
    """float32 [h, w]: 1 where ``mean_c |target - source| > threshold`` (latents [h, w, C]), dilated."""
    d = np.abs(np.asarray(target, np.float32) - np.asarray(source, np.float32)).mean(-1)
    return dilate((d > threshold).astype(np.float32), radius)


def sample_weights(arrays: dict, meta: dict, mode: str, threshold: float = 0.1, radius: int = 1) -> np.ndarray:
    """Per-token weight [target tokens] of one cached record (``arrays`` as :func:`cache.decode_record` gives)."""
    h, w = arrays["target"].shape[:2]
    mask = None
    if mode == "manifest":
        mask = arrays.get("loss_mask")
    elif mode == "difference":
        src = arrays.get("ref0")
        if meta.get("task", "editing") == "editing" and src is not None and src.shape == arrays["target"].shape:
            mask = difference_mask(arrays["target"], src, threshold, radius)
    elif mode != "none":
        raise ValueError(f"train.loss_mask={mode!r} is not one of {MODES}")
    if mask is None:
        return np.ones(((h // 2) * (w // 2),), np.float32)
    if mask.shape != (h, w):
        raise ValueError(f"loss mask of shape {mask.shape} does not match the target latent {(h, w)}")
    return token_weights(mask)


def per_sample_loss(err, tmask, weight, floor: float):
    """Per-sample mean of ``err`` [B, T, C] (jax): plain mean over real tokens (``tmask`` [B, T]) when ``weight``
    is None, else ``Σ w·err / Σ w`` with ``w = (floor + (1 - floor) * weight) * tmask``."""
    import jax.numpy as jnp

    c = err.shape[-1]
    w = tmask if weight is None else (floor + (1.0 - floor) * weight.astype(jnp.float32)) * tmask
    num = jnp.sum(err * w[:, :, None], axis=(1, 2))
    den = w.sum(1) * c
    if weight is None:
        return num / jnp.maximum(den, 1.0)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
