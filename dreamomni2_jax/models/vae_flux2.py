"""FLUX.2 VAE: diffusers ``AutoencoderKLFlux2`` in Flax NNX, with the latent normalisation of ``Flux2KleinPipeline``.

The encoder / decoder / quant convs are the ``AutoencoderKL`` ones of :mod:`dreamomni2_jax.models.vae` (same module
paths); FLUX.2 adds ``bn``, a frozen ``BatchNorm2d(affine=False)`` over the 2x2-patchified latent channels
(``4 * latent_channels``) whose running statistics normalise the latents the transformer sees:

    tokens = (pack(patchify(vae.encode(x).mode())) - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)

(``Flux2KleinPipeline._encode_vae_image`` + ``_pack_latents``) and the inverse before ``vae.decode``. Our
:func:`dreamomni2_jax.layout.ids_flux1.pack_latents` is exactly patchify + pack (features ordered channel, dy, dx), so the
statistics apply on the token feature axis. NHWC inside; images in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.models.vae import VAE, VAEConfig
from dreamomni2_jax.layout.ids_flux1 import pack_latents, unpack_latents

_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class Flux2VAEConfig:
    """``AutoencoderKLFlux2`` hyper-parameters (diffusers ``vae/config.json`` names and defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    act_fn: str = "silu"
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.patch_size != (2, 2):
            raise ValueError(f"Flux2VAEConfig.patch_size={self.patch_size}: only (2, 2) is supported")
        self.vae_config()  # validates the AutoencoderKL part

    @property
    def token_channels(self) -> int:
        """Channels per packed token (= transformer ``in_channels``)."""
        return 4 * self.latent_channels

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def vae_config(self) -> VAEConfig:
        """The ``AutoencoderKL`` part (scaling / shift factors unused: FLUX.2 normalises with ``bn``)."""
        return VAEConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups, act_fn=self.act_fn, scaling_factor=1.0, shift_factor=None,
            use_quant_conv=self.use_quant_conv, use_post_quant_conv=self.use_post_quant_conv,
            mid_block_add_attention=self.mid_block_add_attention)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Flux2VAEConfig":
        """From a diffusers ``AutoencoderKLFlux2`` config dict; block types and decoder channels are checked."""
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", _DOWN), ("up_block_types", _UP)):
            types = d.get(key)
            if types is not None and (len(types) != n or any(t != want for t in types)):
                raise ValueError(f"{source}: {key}={types} unsupported; expected {n} x {want!r}")
        dec = d.get("decoder_block_out_channels")
        if dec is not None and list(dec) != list(d.get("block_out_channels", cls.block_out_channels)):
            raise ValueError(f"{source}: decoder_block_out_channels={dec} different from block_out_channels "
                             "is unsupported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "Flux2VAEConfig":
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["patch_size"] = list(self.patch_size)
        d["down_block_types"] = [_DOWN] * len(self.block_out_channels)
        d["up_block_types"] = [_UP] * len(self.block_out_channels)
        d["_class_name"] = "AutoencoderKLFlux2"
        return d


class LatentBatchNorm(nnx.Module):
    """Frozen ``BatchNorm2d(affine=False)`` running statistics (``running_mean`` / ``running_var``, float32)."""

    def __init__(self, channels: int, eps: float):
        self.eps = eps
        self.running_mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def std(self):
        return jnp.sqrt(self.running_var[...] + self.eps)

    def normalize(self, x):
        """``(x - mean) / sqrt(var + eps)`` on the last axis, float32."""
        return (x.astype(jnp.float32) - self.running_mean[...]) / self.std()

    def denormalize(self, x):
        return x.astype(jnp.float32) * self.std() + self.running_mean[...]


class AutoencoderKLFlux2(VAE):
    """``encode`` / ``decode`` as :class:`~dreamomni2_jax.models.vae.VAE` (raw latents, NHWC); plus
    :meth:`encode_tokens` / :meth:`decode_tokens` on the transformer's normalised packed tokens."""

    def __init__(self, config: Flux2VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attn_chunk: int = 4096, rngs: nnx.Rngs):
        super().__init__(config.vae_config(), dtype=dtype, param_dtype=param_dtype, attn_chunk=attn_chunk, rngs=rngs)
        self.flux2_config = config
        self.bn = LatentBatchNorm(config.token_channels, config.batch_norm_eps)

    def encode_tokens(self, images):
        """Images NHWC [B, H, W, 3] -> normalised tokens [B, (H/16)*(W/16), 4*latent_channels], float32."""
        return self.bn.normalize(pack_latents(self.encode(images)))

    def decode_tokens(self, tokens, latent_h: int, latent_w: int):
        """Inverse of :meth:`encode_tokens` then decode: tokens of a ``(latent_h, latent_w)`` latent -> images."""
        return self.decode(unpack_latents(self.bn.denormalize(tokens), latent_h, latent_w))


@nnx.jit
def _encode_tokens_jit(vae: AutoencoderKLFlux2, x):
    return vae.encode_tokens(x)


def encode_tokens(vae: AutoencoderKLFlux2, images, batch_chunk: int = 1):
    """Jitted :meth:`AutoencoderKLFlux2.encode_tokens` in chunks of ``batch_chunk`` images (exact)."""
    if batch_chunk < 1:
        raise ValueError(f"batch_chunk must be >= 1, got {batch_chunk}")
    parts = [_encode_tokens_jit(vae, images[i:i + batch_chunk]) for i in range(0, images.shape[0], batch_chunk)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


__all__ = ["AutoencoderKLFlux2", "Flux2VAEConfig", "LatentBatchNorm", "encode_tokens"]
