"""Flux (Kontext) transformer in Flax NNX: same architecture, config and module names as diffusers'
``FluxTransformer2DModel``, with the double/single blocks stacked along a leading layer axis and run by
``jax.lax.scan`` (compile time independent of depth) under a selectable remat policy.

Every Variable under ``transformer_blocks`` / ``single_transformer_blocks`` carries that leading layer axis (the
blocks are created with ``nnx.vmap``); code that swaps modules in there (LoRA) must keep it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.config import read_json
from dreamomni2_jax.models.attention import check_impl
from dreamomni2_jax.models.flux_blocks import (
    AdaLayerNorm,
    CombinedTimestepTextProjEmbeddings,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    layer_norm,
    make_linear,
)
from dreamomni2_jax.models.stacked import (  # noqa: F401 - REMAT_POLICIES: part of this model's API
    REMAT_POLICIES, as_batch, joint_ids, joint_mask, scan_blocks, stacked,
)
from dreamomni2_jax.models.flux_schema import FLUX_SCHEMA
from dreamomni2_jax.models.rope import rope_cos_sin

STACKED = FLUX_SCHEMA.stacked  # module names of the stacked groups (declared in models/flux_schema.py)


@dataclass(frozen=True)
class FluxConfig:
    """diffusers ``transformer/config.json`` fields; defaults = FLUX.1 Kontext [dev]."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

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

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "FluxConfig":
        """Build from a diffusers config dict; ``_``-prefixed keys are ignored, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown FluxTransformer2DModel config fields {unknown}; "
                             f"known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "FluxConfig":
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "FluxTransformer2DModel", **d}


class FluxTransformer2DModel(nnx.Module):
    """Flux transformer. ``dtype`` = compute dtype, ``param_dtype`` = storage dtype (norm scales stay float32).

    ``attention_impl``: "xla" | "cudnn" | "auto" | "splash" | "splash_interpret" | "blocked" (see ``models.attention``).
    ``remat``: "none" | "full" | "dots_saveable" | "dots_no_batch_saveable" (jax.checkpoint policy per scanned
    layer; "dots_saveable" also saves attention logits when attention runs as XLA dots — prefer
    "dots_no_batch_saveable" or "full" with ``attention_impl="xla"``).
    """

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                 attention_impl: str = "xla", remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
        self.config, self.dtype, self.remat = config, dtype, remat
        self.attention_impl = check_impl(attention_impl)
        c, dim = config, config.inner_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            dim, c.pooled_projection_dim, c.guidance_embeds, rngs=rngs, **kw)
        self.context_embedder = make_linear(c.joint_attention_dim, dim, rngs, **kw)
        self.x_embedder = make_linear(c.in_channels, dim, rngs, **kw)
        blk = dict(attention_impl=attention_impl, **kw)
        self.transformer_blocks = stacked(
            lambda r: FluxTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, rngs=r, **blk),
            c.num_layers, rngs)
        self.single_transformer_blocks = stacked(
            lambda r: FluxSingleTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, rngs=r, **blk),
            c.num_single_layers, rngs)
        self.norm_out = AdaLayerNorm(dim, 2, rngs=rngs, **kw)
        self.proj_out = make_linear(dim, c.out_dim, rngs, **kw)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None, attention_mask=None, n_out: int | None = None):
        """Same meaning/units as diffusers: ``hidden_states`` [B, S_img, in_channels] packed latents,
        ``encoder_hidden_states`` [B, S_txt, joint_attention_dim], ``pooled_projections`` [B, pooled_dim],
        ``timestep`` / ``guidance`` scalar or [B] in [0, 1] scale (x1000 inside, in float32 — diffusers first
        rounds them to the model dtype), ``img_ids`` / ``txt_ids`` [S, 3] shared or [B, S, 3] per sample
        (int32/float32). ``attention_mask``: bool [B, S_txt + S_img] or [B, S_img] (text all real), True = real
        token; padded tokens are masked as keys, so real tokens' outputs do not depend on them (outputs at padded
        positions are garbage). ``n_out``: return only the first ``n_out`` image tokens (the last single block then
        computes only their rows: same values, less work). Returns [B, S_img or n_out, out_dim] in ``dtype``."""
        c = self.config
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        n_txt = encoder_hidden_states.shape[1]
        if c.guidance_embeds and guidance is None:
            raise ValueError("this Flux model has guidance_embeds=True: pass `guidance`")
        if not c.guidance_embeds and guidance is not None:
            raise ValueError("this Flux model has guidance_embeds=False: `guidance` must be None")
        t = as_batch(timestep, b, "timestep") * 1000.0
        g = None if guidance is None else as_batch(guidance, b, "guidance") * 1000.0
        temb = self.time_text_embed(t, g, pooled_projections.astype(self.dtype))
        x = self.x_embedder(hidden_states)
        ctx = self.context_embedder(encoder_hidden_states)
        cos, sin = rope_cos_sin(joint_ids(txt_ids, img_ids, b, n_txt, n_img), c.axes_dims_rope)
        mask = joint_mask(attention_mask, b, n_txt, n_img)

        def double(block, carry):
            return block(carry[1], carry[0], temb, cos, sin, mask)

        ctx, x = scan_blocks(self.transformer_blocks, double, (ctx, x), self.remat)
        if n_out is not None and not 0 < n_out <= n_img:
            raise ValueError(f"n_out must be in [1, {n_img}] (image tokens), got {n_out}")
        rows = slice(n_txt, n_txt + (n_img if n_out is None else n_out))
        stream = jnp.concatenate([ctx, x], axis=1)
        if self.single_transformer_blocks is None:
            x = stream[:, rows]
        else:
            x = scan_blocks(self.single_transformer_blocks, lambda block, s: block(s, temb, cos, sin, mask), stream,
                             self.remat, last=lambda block, s: block(s, temb, cos, sin, mask, rows=rows))
        scale, shift = self.norm_out(temb)  # diffusers AdaLayerNormContinuous: scale first
        return self.proj_out(layer_norm(x) * (1 + scale) + shift)



def abstract_flux(config: FluxConfig, **kwargs) -> FluxTransformer2DModel:
    """Shape-only model (``nnx.eval_shape``); kwargs as for :class:`FluxTransformer2DModel`."""
    return nnx.eval_shape(lambda: FluxTransformer2DModel(config, rngs=nnx.Rngs(0), **kwargs))


def stacked_counts(config: FluxConfig) -> dict[str, int]:
    """Leading-axis length of each stacked module (for ``dreamomni2_jax.weights.store``)."""
    return FLUX_SCHEMA.layer_counts(config)
