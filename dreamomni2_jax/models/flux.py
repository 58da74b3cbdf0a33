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
from typing import Any, Callable

import jax
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
from dreamomni2_jax.rope import rope_cos_sin

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_no_batch_saveable")
STACKED = ("transformer_blocks", "single_transformer_blocks")


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


def _stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs):
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return make(r)

    return create(rngs)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    policy = {"dots_saveable": jax.checkpoint_policies.dots_saveable,
              # saves the projections' matmul outputs but not the (batched) attention logits
              "dots_no_batch_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
    return jax.checkpoint(fn, prevent_cse=False, policy=policy)


def _scan_blocks(blocks, body, carry, remat: str, last=None):
    """``carry = body(block_i, carry)`` for every layer of a stacked module, as one ``lax.scan``; with ``last``,
    the final layer runs ``last(block, carry)`` instead (outside the scan)."""
    if blocks is None:
        return carry
    graphdef, state = nnx.split(blocks)

    def step(c, layer_state):
        return body(nnx.merge(graphdef, layer_state), c), None

    if last is None:
        carry, _ = jax.lax.scan(_remat(step, remat), carry, state)
        return carry
    n = jax.tree.leaves(state)[0].shape[0]
    if n > 1:
        carry, _ = jax.lax.scan(_remat(step, remat), carry, jax.tree.map(lambda a: a[:-1], state))
    final = lambda c, layer_state: last(nnx.merge(graphdef, layer_state), c)  # noqa: E731
    return _remat(final, remat)(carry, jax.tree.map(lambda a: a[-1], state))


def _as_batch(x, b: int, name: str):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
        x = jnp.full((b,), x)
    if x.shape != (b,):
        raise ValueError(f"{name} must be a scalar or [B={b}], got shape {x.shape}")
    return x


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
        self.transformer_blocks = _stacked(
            lambda r: FluxTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, rngs=r, **blk),
            c.num_layers, rngs)
        self.single_transformer_blocks = _stacked(
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
        t = _as_batch(timestep, b, "timestep") * 1000.0
        g = None if guidance is None else _as_batch(guidance, b, "guidance") * 1000.0
        temb = self.time_text_embed(t, g, pooled_projections.astype(self.dtype))
        x = self.x_embedder(hidden_states)
        ctx = self.context_embedder(encoder_hidden_states)
        cos, sin = rope_cos_sin(self._ids(txt_ids, img_ids, b, n_txt, n_img), c.axes_dims_rope)
        mask = self._mask(attention_mask, b, n_txt, n_img)

        def double(block, carry):
            return block(carry[1], carry[0], temb, cos, sin, mask)

        ctx, x = _scan_blocks(self.transformer_blocks, double, (ctx, x), self.remat)
        if n_out is not None and not 0 < n_out <= n_img:
            raise ValueError(f"n_out must be in [1, {n_img}] (image tokens), got {n_out}")
        rows = slice(n_txt, n_txt + (n_img if n_out is None else n_out))
        stream = jnp.concatenate([ctx, x], axis=1)
        if self.single_transformer_blocks is None:
            x = stream[:, rows]
        else:
            x = _scan_blocks(self.single_transformer_blocks, lambda block, s: block(s, temb, cos, sin, mask), stream,
                             self.remat, last=lambda block, s: block(s, temb, cos, sin, mask, rows=rows))
        scale, shift = self.norm_out(temb)  # diffusers AdaLayerNormContinuous: scale first
        return self.proj_out(layer_norm(x) * (1 + scale) + shift)

    @staticmethod
    def _ids(txt_ids, img_ids, b, n_txt, n_img):
        txt_ids, img_ids = jnp.asarray(txt_ids), jnp.asarray(img_ids)
        for name, ids, n in (("txt_ids", txt_ids, n_txt), ("img_ids", img_ids, n_img)):
            if ids.ndim not in (2, 3) or ids.shape[-2] != n or (ids.ndim == 3 and ids.shape[0] != b):
                raise ValueError(f"{name} must be [{n}, n_axes] or [{b}, {n}, n_axes], got {ids.shape}")
        if txt_ids.ndim != img_ids.ndim:
            txt_ids = jnp.broadcast_to(txt_ids, (b, *txt_ids.shape[-2:]))
            img_ids = jnp.broadcast_to(img_ids, (b, *img_ids.shape[-2:]))
        for name, ids in (("txt_ids", txt_ids), ("img_ids", img_ids)):
            if ids.dtype not in (jnp.int32, jnp.int64, jnp.float32, jnp.float64):
                raise TypeError(f"{name} must be int32 or float32 (never bf16/fp16), got {ids.dtype}")
        if txt_ids.dtype != img_ids.dtype:
            txt_ids, img_ids = txt_ids.astype(jnp.float32), img_ids.astype(jnp.float32)
        return jnp.concatenate([txt_ids, img_ids], axis=-2)

    @staticmethod
    def _mask(mask, b, n_txt, n_img):
        if mask is None:
            return None
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"attention_mask must be boolean (True = real token), got {mask.dtype}")
        if mask.shape == (b, n_img):
            mask = jnp.concatenate([jnp.ones((b, n_txt), bool), mask], axis=1)
        if mask.shape != (b, n_txt + n_img):
            raise ValueError(f"attention_mask must be [{b}, {n_txt + n_img}] or [{b}, {n_img}], got {mask.shape}")
        return mask


def abstract_flux(config: FluxConfig, **kwargs) -> FluxTransformer2DModel:
    """Shape-only model (``nnx.eval_shape``); kwargs as for :class:`FluxTransformer2DModel`."""
    return nnx.eval_shape(lambda: FluxTransformer2DModel(config, rngs=nnx.Rngs(0), **kwargs))


def stacked_counts(config: FluxConfig) -> dict[str, int]:
    """Leading-axis length of each stacked module (for ``convert.table``)."""
    return {"transformer_blocks": config.num_layers, "single_transformer_blocks": config.num_single_layers}


def load_flux(path: str | Path, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
              param_sharding: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
              attention_impl: str = "xla", remat: str = "none", config: FluxConfig | None = None
              ) -> FluxTransformer2DModel:
    """Load a Flux transformer, each param created directly with its sharding.

    ``path``: a converted checkpoint (``convert/flux_transformer.py`` OUT: Orbax + ``config.json``), or a source
    checkpoint (diffusers ``transformer/`` folder or BFL single ``.safetensors``) converted on the fly in memory.
    ``param_sharding(path, shape)``: sharding for the param at dotted ``path`` (e.g.
    ``"transformer_blocks.attn.to_q.kernel"``, ``shape`` including the leading layer axis); default replicated on
    ``mesh`` or on the first device. ``param_dtype`` defaults to ``dtype``.
    """
    from convert import table
    from convert.flux_transformer import build_plan, is_converted

    param_dtype = dtype if param_dtype is None else param_dtype
    path = Path(path)
    param_sharding = param_sharding or table.replicated(mesh)
    if is_converted(path):
        config = config or FluxConfig.from_json(path / "config.json")
        plan = None
    else:
        plan, config = build_plan(path, config=config, param_dtype=param_dtype)
    model = abstract_flux(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat)
    graphdef, abstract_state = nnx.split(model)
    if plan is None:
        state = table.restore_params(path, abstract_state, stacked_counts(config), param_sharding)
    else:
        state = table.load_params_from_items(plan.items(), abstract_state, stacked_counts(config), param_sharding)
    return nnx.merge(graphdef, state)
