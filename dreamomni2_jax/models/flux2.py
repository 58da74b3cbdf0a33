"""FLUX.2 transformer in Flax NNX: same architecture, config and module names as diffusers'
``Flux2Transformer2DModel`` (FLUX.2 [dev] and [klein] are configs of this one class), with the double/single
blocks stacked along a leading layer axis (``nnx.vmap``) and run by ``jax.lax.scan`` under a remat policy, as
:mod:`dreamomni2_jax.models.flux` does for FLUX.1.

Position ids have 4 axes ``(T, H, W, L)`` (see :mod:`dreamomni2_jax.layout.ids_klein`), rope θ = ``rope_theta``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.models.attention import check_impl
from dreamomni2_jax.models.stacked import REMAT_POLICIES, as_batch, joint_ids, joint_mask, scan_blocks, stacked
from dreamomni2_jax.models.flux2_blocks import (
    Flux2Modulation,
    Flux2SingleTransformerBlock,
    Flux2TimestepGuidanceEmbeddings,
    Flux2TransformerBlock,
    layer_norm,
    make_linear,
)
from dreamomni2_jax.models.flux2_schema import FLUX2_SCHEMA
from dreamomni2_jax.models.rope import rope_cos_sin

STACKED = FLUX2_SCHEMA.stacked  # module names of the stacked groups (declared in models/flux2_schema.py)


@dataclass(frozen=True)
class Flux2Config:
    """diffusers ``Flux2Transformer2DModel`` ``config.json`` fields; defaults = FLUX.2 [dev]."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    guidance_embeds: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} != attention_head_dim "
                             f"{self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Flux2Config":
        """Build from a diffusers config dict; ``_``-prefixed keys are ignored, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown Flux2Transformer2DModel config fields {unknown}; "
                             f"known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "Flux2Config":
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "Flux2Transformer2DModel", **d}


# Published transformer configs (diffusers ``transformer/config.json``); [klein] "Base" checkpoints share the shapes.
FLUX2_PRESETS = {
    "dev": Flux2Config(),
    "klein-4b": Flux2Config(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                            guidance_embeds=False),
    "klein-9b": Flux2Config(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                            guidance_embeds=False),
}


class Flux2Transformer2DModel(nnx.Module):
    """FLUX.2 transformer. ``dtype`` = compute dtype, ``param_dtype`` = storage dtype (norm scales stay float32).

    ``attention_impl`` / ``remat``: as for :class:`~dreamomni2_jax.models.flux.FluxTransformer2DModel`.
    """

    def __init__(self, config: Flux2Config, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                 attention_impl: str = "xla", remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
        self.config, self.dtype, self.remat = config, dtype, remat
        self.attention_impl = check_impl(attention_impl)
        c, dim = config, config.inner_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.time_guidance_embed = Flux2TimestepGuidanceEmbeddings(
            c.timestep_guidance_channels, dim, c.guidance_embeds, rngs=rngs, **kw)
        self.double_stream_modulation_img = Flux2Modulation(dim, 6, rngs=rngs, **kw)
        self.double_stream_modulation_txt = Flux2Modulation(dim, 6, rngs=rngs, **kw)
        self.single_stream_modulation = Flux2Modulation(dim, 3, rngs=rngs, **kw)
        self.x_embedder = make_linear(c.in_channels, dim, rngs, use_bias=False, **kw)
        self.context_embedder = make_linear(c.joint_attention_dim, dim, rngs, use_bias=False, **kw)
        blk = dict(attention_impl=attention_impl, **kw)
        args = (dim, c.num_attention_heads, c.attention_head_dim, c.mlp_ratio, c.eps)
        self.transformer_blocks = stacked(lambda r: Flux2TransformerBlock(*args, rngs=r, **blk), c.num_layers, rngs)
        self.single_transformer_blocks = stacked(
            lambda r: Flux2SingleTransformerBlock(*args, rngs=r, **blk), c.num_single_layers, rngs)
        self.norm_out = Flux2Modulation(dim, 2, rngs=rngs, **kw)  # AdaLayerNormContinuous(bias=False): `linear`
        self.proj_out = make_linear(dim, c.out_dim, rngs, use_bias=False, **kw)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None,
                 attention_mask=None, n_out: int | None = None):
        """Same meaning/units as diffusers: ``hidden_states`` [B, S_img, in_channels] packed latents (target tokens
        first, then reference tokens), ``encoder_hidden_states`` [B, S_txt, joint_attention_dim], ``timestep`` /
        ``guidance`` scalar or [B] in [0, 1] scale (x1000 inside, in float32), ``img_ids`` / ``txt_ids``
        [S, 4] shared or [B, S, 4] per sample (int32/float32). ``attention_mask``: bool [B, S_txt + S_img] or
        [B, S_img], True = real token (padded keys are masked). ``n_out``: return only the first ``n_out`` image
        tokens (the last single block computes only their rows). Returns [B, S_img or n_out, out_dim]."""
        c = self.config
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        n_txt = encoder_hidden_states.shape[1]
        if c.guidance_embeds and guidance is None:
            raise ValueError("this FLUX.2 model has guidance_embeds=True: pass `guidance`")
        if not c.guidance_embeds and guidance is not None:
            raise ValueError("this FLUX.2 model has guidance_embeds=False: `guidance` must be None")
        if n_out is not None and not 0 < n_out <= n_img:
            raise ValueError(f"n_out must be in [1, {n_img}] (image tokens), got {n_out}")
        t = as_batch(timestep, b, "timestep") * 1000.0
        g = None if guidance is None else as_batch(guidance, b, "guidance") * 1000.0
        temb = self.time_guidance_embed(t, g)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)
        x = self.x_embedder(hidden_states.astype(self.dtype))
        ctx = self.context_embedder(encoder_hidden_states.astype(self.dtype))
        ids = joint_ids(txt_ids, img_ids, b, n_txt, n_img)
        cos, sin = rope_cos_sin(ids, c.axes_dims_rope, float(c.rope_theta))
        mask = joint_mask(attention_mask, b, n_txt, n_img)

        def double(block, carry):
            return block(carry[1], carry[0], mod_img, mod_txt, cos, sin, mask)

        ctx, x = scan_blocks(self.transformer_blocks, double, (ctx, x), self.remat)
        rows = slice(n_txt, n_txt + (n_img if n_out is None else n_out))
        stream = jnp.concatenate([ctx, x], axis=1)
        if self.single_transformer_blocks is None:
            x = stream[:, rows]
        else:
            x = scan_blocks(self.single_transformer_blocks, lambda blk, s: blk(s, mod_single, cos, sin, mask),
                             stream, self.remat,
                             last=lambda blk, s: blk(s, mod_single, cos, sin, mask, rows=rows))
        scale, shift = self.norm_out(temb)
        return self.proj_out(layer_norm(x, c.eps) * (1 + scale) + shift)


def abstract_flux2(config: Flux2Config, **kwargs) -> Flux2Transformer2DModel:
    """Shape-only model (``nnx.eval_shape``); kwargs as for :class:`Flux2Transformer2DModel`."""
    return nnx.eval_shape(lambda: Flux2Transformer2DModel(config, rngs=nnx.Rngs(0), **kwargs))


def stacked_counts(config: Flux2Config) -> dict[str, int]:
    """Leading-axis length of each stacked module (for ``dreamomni2_jax.weights.store``)."""
    return FLUX2_SCHEMA.layer_counts(config)
