"""Flux building blocks in Flax NNX, named exactly like diffusers' modules.

Ports of diffusers ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` / ``FluxAttention`` and the
embedding / adaLN layers they use (diffusers/models/{transformers/transformer_flux,embeddings,normalization}.py).
Every ``nnx.Linear`` sits at the same attribute path as the torch ``nn.Linear`` (``attn.to_out.0``,
``ff.net.0.proj``, ...), so weight conversion and LoRA targeting are pure name tables. Norms and softmax run in
float32; matmuls run in ``dtype``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.models.attention import attention
from dreamomni2_jax.models.rope import apply_rope


class Identity(nnx.Module):
    """Parameterless stand-in for torch ``nn.Dropout`` (keeps list indices such as ``to_out.0`` aligned)."""

    def __call__(self, x):
        return x


def layer_norm(x, eps: float = 1e-6):
    """LayerNorm without affine params, computed in float32, returned in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """torch ``nn.RMSNorm`` (weight -> ``scale``); scale kept in float32 (tiny), float32 math."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def make_linear(din: int, dout: int, rngs: nnx.Rngs, dtype, param_dtype, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
    """diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`` in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding`` / ``PixArtAlphaTextProjection``)."""

    def __init__(self, din: int, dim: int, *, rngs, dtype, param_dtype):
        self.linear_1 = make_linear(din, dim, rngs, dtype, param_dtype)
        self.linear_2 = make_linear(dim, dim, rngs, dtype, param_dtype)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """temb = timestep_embedder(t) [+ guidance_embedder(g)] + text_embedder(pooled); t, g already x1000."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.timestep_embedder = MLPEmbedder(256, dim, **kw)
        self.guidance_embedder = MLPEmbedder(256, dim, **kw) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim, **kw)
        self.dtype = dtype

    def __call__(self, timestep, guidance, pooled):
        emb = self.timestep_embedder(timestep_embedding(timestep).astype(self.dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).astype(self.dtype))
        return emb + self.text_embedder(pooled)


class AdaLayerNorm(nnx.Module):
    """adaLN modulation: ``linear(silu(temb))`` chunked in ``n`` (6: AdaLayerNormZero, 3: ...Single, 2: Continuous)."""

    def __init__(self, dim: int, n: int, *, rngs, dtype, param_dtype):
        self.n = n
        self.linear = make_linear(dim, n * dim, rngs, dtype, param_dtype)

    def __call__(self, temb):
        return jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], self.n, axis=-1)  # each [B, 1, dim]


def modulate(x, shift, scale):
    return layer_norm(x) * (1 + scale) + shift


class GELUProj(nnx.Module):
    """diffusers ``GELU(dim, inner, approximate="tanh")``: attribute ``proj``."""

    def __init__(self, din: int, dout: int, *, rngs, dtype, param_dtype):
        self.proj = make_linear(din, dout, rngs, dtype, param_dtype)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")``: ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int, *, rngs, dtype, param_dtype, mult: int = 4):
        self.net = nnx.List(
            [GELUProj(dim, dim * mult, rngs=rngs, dtype=dtype, param_dtype=param_dtype), Identity(),
             make_linear(dim * mult, dim, rngs, dtype, param_dtype)]
        )

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class FluxAttention(nnx.Module):
    """diffusers ``FluxAttention``: joint (``added_kv=True``, double blocks) or self-only pre_only (single blocks)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, added_kv: bool, pre_only: bool, rngs, dtype,
                 param_dtype, attention_impl: str = "xla"):
        self.heads, self.head_dim, self.attention_impl = heads, head_dim, attention_impl
        inner = heads * head_dim
        lin = lambda din, dout: make_linear(din, dout, rngs, dtype, param_dtype)  # noqa: E731
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        self.to_q, self.to_k, self.to_v = lin(dim, inner), lin(dim, inner), lin(dim, inner)
        self.to_out = None if pre_only else nnx.List([lin(inner, dim), Identity()])
        if added_kv:
            self.norm_added_q = RMSNorm(head_dim)
            self.norm_added_k = RMSNorm(head_dim)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = lin(dim, inner), lin(dim, inner), lin(dim, inner)
            self.to_add_out = lin(inner, dim)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        return norm_q(self._heads(to_q(x))), norm_k(self._heads(to_k(x))), self._heads(to_v(x))

    def __call__(self, x, context, cos, sin, mask, rows: slice | None = None):
        """``x`` [B, S, dim] (single: txt+img stream); ``context`` [B, S_txt, dim] or None. Rope over txt+img.

        ``rows`` (self-attention only): compute the outputs of these query rows only (keys/values stay full)."""
        if rows is not None:
            k, v = self.norm_k(self._heads(self.to_k(x))), self._heads(self.to_v(x))
            q = self.norm_q(self._heads(self.to_q(x[:, rows])))
            q, k = apply_rope(q, cos[..., rows, :], sin[..., rows, :]), apply_rope(k, cos, sin)
            out = attention(q, k, v, mask, self.attention_impl)
            return out.reshape(*out.shape[:2], -1).astype(x.dtype)
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q, self.norm_added_k)
            q, k, v = (jnp.concatenate([c, t], axis=1) for c, t in ((cq, q), (ck, k), (cv, v)))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, mask, self.attention_impl)
        out = out.reshape(*out.shape[:2], -1).astype(x.dtype)
        if context is None:
            return out if rows is None else out[:, rows]
        n_txt = context.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class FluxTransformerBlock(nnx.Module):
    """Double-stream (MMDiT) block; returns ``(encoder_hidden_states, hidden_states)`` like diffusers."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, rngs, dtype, param_dtype, attention_impl="xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = AdaLayerNorm(dim, 6, **kw)
        self.norm1_context = AdaLayerNorm(dim, 6, **kw)
        self.attn = FluxAttention(dim, heads, head_dim, added_kv=True, pre_only=False,
                                  attention_impl=attention_impl, **kw)
        self.ff = FeedForward(dim, **kw)
        self.ff_context = FeedForward(dim, **kw)

    def __call__(self, hidden_states, encoder_hidden_states, temb, cos, sin, mask):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        attn_out, ctx_out = self.attn(
            modulate(hidden_states, shift_msa, scale_msa),
            modulate(encoder_hidden_states, c_shift_msa, c_scale_msa),
            cos, sin, mask,
        )
        hidden_states = hidden_states + gate_msa * attn_out
        hidden_states = hidden_states + gate_mlp * self.ff(modulate(hidden_states, shift_mlp, scale_mlp))
        encoder_hidden_states = encoder_hidden_states + c_gate_msa * ctx_out
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp * self.ff_context(
            modulate(encoder_hidden_states, c_shift_mlp, c_scale_mlp)
        )
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block over the concatenated ``[txt | img]`` stream (diffusers concatenates/splits per block;
    the math is identical, so we keep the stream concatenated across all single blocks)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, rngs, dtype, param_dtype, attention_impl="xla",
                 mlp_ratio: float = 4.0):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNorm(dim, 3, **kw)
        self.proj_mlp = make_linear(dim, mlp_dim, rngs, dtype, param_dtype)
        self.proj_out = make_linear(dim + mlp_dim, dim, rngs, dtype, param_dtype)
        self.attn = FluxAttention(dim, heads, head_dim, added_kv=False, pre_only=True,
                                  attention_impl=attention_impl, **kw)

    def __call__(self, x, temb, cos, sin, mask, rows: slice | None = None):
        """``rows``: return only these rows of the stream (same values; the other rows are used as keys/values only)."""
        shift, scale, gate = self.norm(temb)
        h = modulate(x, shift, scale)
        attn_out = self.attn(h, None, cos, sin, mask, rows=rows)
        if rows is not None:
            x, h = x[:, rows], h[:, rows]
        mlp = jax.nn.gelu(self.proj_mlp(h), approximate=True)
        return x + gate * self.proj_out(jnp.concatenate([attn_out, mlp], axis=-1))
