"""Flux VAE: diffusers ``AutoencoderKL`` (Encoder / Decoder / mid-block attention) in Flax NNX.

NHWC inside. Module paths mirror diffusers (``encoder.down_blocks.0.resnets.0.conv1``,
``decoder.mid_block.attentions.0.to_q``, ...), so the converter is a name table. Conv kernels
are ``[kh, kw, in, out]``; GroupNorm statistics and the attention softmax run in float32.

Large images: ``encode_images`` / ``decode_latents`` process the batch in chunks of
``batch_chunk`` images, each chunk through one jitted call (exact: same numbers as one big
call), and the mid-block attention splits its queries in chunks of ``attn_chunk`` tokens (exact
up to float summation order) so a 2 MP image never materialises a full [S, S] score matrix.
There is no overlapping spatial tiling (GroupNorm statistics are global, so tiling would change
the result).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.config import read_json

_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters (diffusers ``vae/config.json`` names)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"VAEConfig.act_fn={self.act_fn!r}: only 'silu' is supported")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAEConfig: block channel {c} not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for Flux)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "VAEConfig":
        """Build from a diffusers AutoencoderKL config dict; unknown keys are ignored, block types checked."""
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", _DOWN), ("up_block_types", _UP)):
            types = d.get(key)
            if types is not None and (len(types) != n or any(t != want for t in types)):
                raise ValueError(f"{source}: {key}={types} unsupported; expected {n} x {want!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        path = Path(path)
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["down_block_types"] = [_DOWN] * len(self.block_out_channels)
        d["up_block_types"] = [_UP] * len(self.block_out_channels)
        d["_class_name"] = "AutoencoderKL"
        return d


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, pad: int | None = None, dtype, param_dtype, rngs):
    p = (k // 2) if pad is None else pad
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)),
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _group_norm(c: int, groups: int, *, dtype, rngs):
    return nnx.GroupNorm(c, num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without time embedding (norm1/conv1/norm2/conv2[/conv_shortcut])."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _group_norm(cin, groups, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(cin, cout, 3, **kw)
        self.norm2 = _group_norm(cout, groups, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, **kw)
        self.conv_shortcut = _conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Pad (0, 1) bottom/right then 3x3 stride-2 conv (diffusers padding=0 path)."""

    def __init__(self, c: int, *, dtype, param_dtype, rngs):
        self.conv = _conv(c, c, 3, stride=2, pad=0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, c: int, *, dtype, param_dtype, rngs):
        self.conv = _conv(c, c, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Attention(nnx.Module):
    """Single-head spatial self-attention with group_norm, residual (diffusers deprecated attn block)."""

    def __init__(self, c: int, groups: int, *, attn_chunk: int, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = _group_norm(c, groups, dtype=dtype, rngs=rngs)
        self.to_q = nnx.Linear(c, c, **kw)
        self.to_k = nnx.Linear(c, c, **kw)
        self.to_v = nnx.Linear(c, c, **kw)
        self.to_out = nnx.List([nnx.Linear(c, c, **kw)])
        self.attn_chunk = attn_chunk

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        scale = 1.0 / float(c) ** 0.5
        outs = []
        for s in range(0, h * w, self.attn_chunk):  # static query chunks: never a full [S, S] matrix
            logits = jnp.einsum("bqc,bkc->bqk", q[:, s:s + self.attn_chunk], k,
                                preferred_element_type=jnp.float32) * scale
            p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            outs.append(jnp.einsum("bqk,bkc->bqc", p, v))
        o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
        o = self.to_out[0](o.astype(x.dtype)).reshape(b, h, w, c)
        return o + x


class UNetMidBlock2D(nnx.Module):
    def __init__(self, c: int, groups: int, add_attention: bool, *, attn_chunk: int, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(c, c, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(c, groups, attn_chunk=attn_chunk, **kw)] if add_attention else [])

    def __call__(self, x):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, add_down: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(n)])
        self.downsamplers = nnx.List([Downsample2D(cout, **kw)] if add_down else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, add_up: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(n)])
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)] if add_up else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, attn_chunk: int, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, **kw)
            for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention, attn_chunk=attn_chunk, **kw)
        self.conv_norm_out = _group_norm(ch[-1], g, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, attn_chunk: int, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, ch[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(ch[0], g, cfg.mid_block_add_attention, attn_chunk=attn_chunk, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1, **kw)
            for i in range(len(ch))])
        self.conv_norm_out = _group_norm(ch[-1], g, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(ch[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class VAE(nnx.Module):
    """AutoencoderKL. ``encode``: images NHWC in [-1, 1] -> latent mean (mode); ``decode``: latents -> images."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attn_chunk: int = 4096, rngs: nnx.Rngs):
        kw = dict(attn_chunk=attn_chunk, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        lc = config.latent_channels
        ckw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.quant_conv = _conv(2 * lc, 2 * lc, 1, **ckw) if config.use_quant_conv else None
        self.post_quant_conv = _conv(lc, lc, 1, **ckw) if config.use_post_quant_conv else None

    def _check(self, x, channels: int, what: str):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"VAE.{what}: expected NHWC with {channels} channels, got shape {x.shape}")

    def encode_moments(self, images):
        """Posterior ``(mean, logvar)`` (logvar clamped to [-30, 20] as diffusers does)."""
        self._check(images, self.config.in_channels, "encode")
        f = self.config.downscale
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"VAE.encode: height/width {images.shape[1:3]} must be multiples of {f}")
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images):
        """Mode (mean) of the latent distribution, NHWC ``[B, H/8, W/8, latent_channels]``."""
        return self.encode_moments(images)[0]

    def decode(self, latents):
        """Raw (un-normalised) latents NHWC -> images NHWC, roughly in [-1, 1] (not clipped)."""
        self._check(latents, self.config.latent_channels, "decode")
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def normalize_latents(z, config: VAEConfig):
    """VAE latents -> diffusion-model space: ``(z - shift) * scale``."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def denormalize_latents(z, config: VAEConfig):
    """Inverse of :func:`normalize_latents`: ``z / scale + shift``."""
    return z / config.scaling_factor + (config.shift_factor or 0.0)


@nnx.jit
def _encode_jit(vae: VAE, x):
    return vae.encode(x)


@nnx.jit
def _decode_jit(vae: VAE, z):
    return vae.decode(z)


def _chunked(fn, vae: VAE, x, batch_chunk: int):
    if batch_chunk < 1:
        raise ValueError(f"batch_chunk must be >= 1, got {batch_chunk}")
    parts = [fn(vae, x[i:i + batch_chunk]) for i in range(0, x.shape[0], batch_chunk)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def encode_images(vae: VAE, images, batch_chunk: int = 1):
    """Jitted ``vae.encode`` over the batch in chunks of ``batch_chunk`` images (exact)."""
    return _chunked(_encode_jit, vae, images, batch_chunk)


def decode_latents(vae: VAE, latents, batch_chunk: int = 1):
    """Jitted ``vae.decode`` over the batch in chunks of ``batch_chunk`` latents (exact)."""
    return _chunked(_decode_jit, vae, latents, batch_chunk)
