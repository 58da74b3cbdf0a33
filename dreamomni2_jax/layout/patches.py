"""Latents as 2x2-patch tokens, the same for FLUX.1 and FLUX.2 (pure numpy / jax arrays, no ids).

Sizes are VAE-latent sizes (pixels / 8); a latent of ``(h, w)`` gives ``(h // 2) * (w // 2)`` tokens in row-major
order. The position ids of the tokens are :mod:`dreamomni2_jax.layout.ids_flux1` (FLUX.1) and
:mod:`dreamomni2_jax.layout.ids_klein` (FLUX.2).
"""
from __future__ import annotations

LatentSize = tuple[int, int]


def check_latent_size(h: int, w: int) -> None:
    """Refuse a latent size that does not split into 2x2 patches."""
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(f"latent size must be even and >= 2, got {(h, w)}")


def num_tokens(latent_h: int, latent_w: int) -> int:
    return (latent_h // 2) * (latent_w // 2)


def pack_latents(latents):
    """NHWC latents ``[B, H, W, C]`` -> tokens ``[B, (H/2)*(W/2), C*4]``.

    Same token and feature order as diffusers' ``FluxPipeline._pack_latents`` on NCHW
    (features ordered channel, dy, dx). Works on numpy and jax arrays.
    """
    b, h, w, c = latents.shape
    check_latent_size(h, w)
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b, h2, w2, c, dy, dx
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, latent_h: int, latent_w: int):
    """Inverse of :func:`pack_latents`: ``[B, S, C*4]`` -> NHWC ``[B, H, W, C]``."""
    b, s, d = tokens.shape
    check_latent_size(latent_h, latent_w)
    if s != num_tokens(latent_h, latent_w) or d % 4:
        raise ValueError(f"{tokens.shape} tokens do not fit a latent of {(latent_h, latent_w)}")
    c = d // 4
    x = tokens.reshape(b, latent_h // 2, latent_w // 2, c, 2, 2)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # b, h2, dy, w2, dx, c
    return x.reshape(b, latent_h, latent_w, c)


__all__ = ["LatentSize", "check_latent_size", "num_tokens", "pack_latents", "unpack_latents"]
