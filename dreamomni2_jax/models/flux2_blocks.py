"""FLUX.2 building blocks in Flax NNX, named exactly like diffusers' modules.

Ports of diffusers ``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock`` / ``Flux2Attention`` /
``Flux2ParallelSelfAttention`` / ``Flux2FeedForward`` / ``Flux2Modulation`` /
``Flux2TimestepGuidanceEmbeddings`` (diffusers/models/transformers/transformer_flux2.py). Differences from FLUX.1:
no biases anywhere, adaLN modulation computed once per forward and shared by all blocks of a kind (the blocks get
the modulation vectors, not ``temb``), SwiGLU feed-forwards, and single blocks with one fused
``to_qkv_mlp_proj`` (q | k | v | gate | up) and one fused ``to_out`` (attention | mlp). Every ``nnx.Linear`` sits
at the torch ``nn.Linear``'s attribute path, so conversion and LoRA targeting are pure name tables. Norms and
softmax run in float32, matmuls in ``dtype``; attention goes through ``models.attention.attention``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.models.attention import attention
from dreamomni2_jax.models.flux_blocks import Identity, RMSNorm, layer_norm, make_linear, timestep_embedding
from dreamomni2_jax.models.rope import apply_rope


def _linear(din: int, dout: int, rngs, dtype, param_dtype) -> nnx.Linear:
    return make_linear(din, dout, rngs, dtype, param_dtype, use_bias=False)


def _modulate(x, shift, scale, eps: float):
    return layer_norm(x, eps) * (1 + scale) + shift


def swiglu(x):
    """diffusers ``Flux2SwiGLU``: ``silu(x[..., :half]) * x[..., half:]``."""
    gate, up = jnp.split(x, 2, axis=-1)
    return jax.nn.silu(gate) * up


class TimestepEmbedding(nnx.Module):
    """diffusers ``TimestepEmbedding(sample_proj_bias=False)``: ``linear_1 -> SiLU -> linear_2``."""

    def __init__(self, din: int, dim: int, *, rngs, dtype, param_dtype):
        self.linear_1 = _linear(din, dim, rngs, dtype, param_dtype)
        self.linear_2 = _linear(dim, dim, rngs, dtype, param_dtype)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class Flux2TimestepGuidanceEmbeddings(nnx.Module):
    """temb = timestep_embedder(proj(t)) [+ guidance_embedder(proj(g))]; t, g already x1000 (float32)."""

    def __init__(self, channels: int, dim: int, guidance: bool, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.channels, self.dtype = channels, dtype
        self.timestep_embedder = TimestepEmbedding(channels, dim, **kw)
        self.guidance_embedder = TimestepEmbedding(channels, dim, **kw) if guidance else None

    def __call__(self, timestep, guidance):
        emb = self.timestep_embedder(timestep_embedding(timestep, self.channels).astype(self.dtype))
        if guidance is not None and self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, self.channels).astype(self.dtype))
        return emb


class Flux2Modulation(nnx.Module):
    """``linear(silu(temb))`` (no bias), chunked in ``n`` vectors ``[B, 1, dim]``.

    ``n`` = 6 (double stream: shift/scale/gate x attn, mlp), 3 (single stream), 2 (``norm_out``: scale, shift —
    diffusers ``AdaLayerNormContinuous`` order)."""

    def __init__(self, dim: int, n: int, *, rngs, dtype, param_dtype):
        self.n = n
        self.linear = _linear(dim, n * dim, rngs, dtype, param_dtype)

    def __call__(self, temb):
        return tuple(jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], self.n, axis=-1))


class Flux2FeedForward(nnx.Module):
    """``linear_in`` (dim -> 2 * inner: gate | up) -> SwiGLU -> ``linear_out``."""

    def __init__(self, dim: int, mlp_ratio: float, *, rngs, dtype, param_dtype):
        inner = int(dim * mlp_ratio)
        self.linear_in = _linear(dim, 2 * inner, rngs, dtype, param_dtype)
        self.linear_out = _linear(inner, dim, rngs, dtype, param_dtype)

    def __call__(self, x):
        return self.linear_out(swiglu(self.linear_in(x)))


class Flux2Attention(nnx.Module):
    """Joint attention of the double-stream blocks (image ``to_q/k/v`` + text ``add_q/k/v_proj``), no biases."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, *, rngs, dtype, param_dtype,
                 attention_impl: str = "xla"):
        self.heads, self.head_dim, self.attention_impl = heads, head_dim, attention_impl
        inner = heads * head_dim
        lin = lambda din, dout: _linear(din, dout, rngs, dtype, param_dtype)  # noqa: E731
        self.to_q, self.to_k, self.to_v = lin(dim, inner), lin(dim, inner), lin(dim, inner)
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nnx.List([lin(inner, dim), Identity()])
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = lin(dim, inner), lin(dim, inner), lin(dim, inner)
        self.to_add_out = lin(inner, dim)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def __call__(self, x, context, cos, sin, mask):
        """``x`` [B, S_img, dim], ``context`` [B, S_txt, dim]; rope over ``[txt | img]``. Returns (img, txt)."""
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        cq = self.norm_added_q(self._heads(self.add_q_proj(context)))
        ck = self.norm_added_k(self._heads(self.add_k_proj(context)))
        cv = self._heads(self.add_v_proj(context))
        q, k, v = (jnp.concatenate(p, axis=1) for p in ((cq, q), (ck, k), (cv, v)))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, mask, self.attention_impl)
        out = out.reshape(*out.shape[:2], -1).astype(x.dtype)
        n_txt = context.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class Flux2ParallelSelfAttention(nnx.Module):
    """Single-stream "parallel" block body: one ``to_qkv_mlp_proj`` (q | k | v | gate | up), attention and SwiGLU
    side by side, one ``to_out`` over ``[attention | mlp]``."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float, *, rngs, dtype,
                 param_dtype, attention_impl: str = "xla"):
        self.heads, self.head_dim, self.attention_impl = heads, head_dim, attention_impl
        self.inner, self.mlp_hidden = heads * head_dim, int(dim * mlp_ratio)
        self.to_qkv_mlp_proj = _linear(dim, 3 * self.inner + 2 * self.mlp_hidden, rngs, dtype, param_dtype)
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = _linear(self.inner + self.mlp_hidden, dim, rngs, dtype, param_dtype)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def __call__(self, x, cos, sin, mask, rows: slice | None = None):
        """``x`` [B, S, dim] (``[txt | img]`` stream). ``rows``: outputs of these query rows only (keys/values and
        rope stay full; same values as slicing the full output)."""
        h = self.to_qkv_mlp_proj(x)
        qkv, mlp = h[..., : 3 * self.inner], h[..., 3 * self.inner:]
        q, k, v = (self._heads(a) for a in jnp.split(qkv, 3, axis=-1))
        q, k = self.norm_q(q), self.norm_k(k)
        qcos, qsin = cos, sin
        if rows is not None and self.attention_impl != "splash":  # splash needs equal q / kv lengths
            q, qcos, qsin, mlp = q[:, rows], cos[..., rows, :], sin[..., rows, :], mlp[:, rows]
        q, k = apply_rope(q, qcos, qsin), apply_rope(k, cos, sin)
        out = attention(q, k, v, mask, self.attention_impl)
        out = out.reshape(*out.shape[:2], -1).astype(x.dtype)
        if rows is not None and out.shape[1] != mlp.shape[1]:  # splash: computed all rows
            out, mlp = out[:, rows], mlp[:, rows]
        return self.to_out(jnp.concatenate([out, swiglu(mlp)], axis=-1))


class Flux2TransformerBlock(nnx.Module):
    """Double-stream block; takes the shared modulations; returns ``(encoder_hidden_states, hidden_states)``."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float, *, rngs, dtype,
                 param_dtype, attention_impl: str = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.eps = eps
        self.attn = Flux2Attention(dim, heads, head_dim, eps, attention_impl=attention_impl, **kw)
        self.ff = Flux2FeedForward(dim, mlp_ratio, **kw)
        self.ff_context = Flux2FeedForward(dim, mlp_ratio, **kw)

    def __call__(self, hidden_states, encoder_hidden_states, mod_img, mod_txt, cos, sin, mask):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod_img
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mod_txt
        e = self.eps
        attn_out, ctx_out = self.attn(_modulate(hidden_states, shift_msa, scale_msa, e),
                                      _modulate(encoder_hidden_states, c_shift_msa, c_scale_msa, e), cos, sin, mask)
        hidden_states = hidden_states + gate_msa * attn_out
        hidden_states = hidden_states + gate_mlp * self.ff(_modulate(hidden_states, shift_mlp, scale_mlp, e))
        encoder_hidden_states = encoder_hidden_states + c_gate_msa * ctx_out
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp * self.ff_context(
            _modulate(encoder_hidden_states, c_shift_mlp, c_scale_mlp, e))
        return encoder_hidden_states, hidden_states


class Flux2SingleTransformerBlock(nnx.Module):
    """Single-stream block over the concatenated ``[txt | img]`` stream, shared modulation ``(shift, scale, gate)``."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float, *, rngs, dtype,
                 param_dtype, attention_impl: str = "xla"):
        self.eps = eps
        self.attn = Flux2ParallelSelfAttention(dim, heads, head_dim, mlp_ratio, eps, rngs=rngs, dtype=dtype,
                                               param_dtype=param_dtype, attention_impl=attention_impl)

    def __call__(self, x, mod, cos, sin, mask, rows: slice | None = None):
        """``rows``: return only these rows of the stream (the others serve as keys/values only)."""
        shift, scale, gate = mod
        out = self.attn(_modulate(x, shift, scale, self.eps), cos, sin, mask, rows=rows)
        return (x if rows is None else x[:, rows]) + gate * out
