"""T5 encoder: transformers ``T5EncoderModel`` (T5 v1.1, gated-GELU) in Flax NNX.

Paths mirror transformers (``shared``, ``encoder.block.0.layer.0.SelfAttention.q``,
``encoder.block.0.layer.0.SelfAttention.relative_attention_bias``, ``encoder.block.0.layer.1.DenseReluDense.wi_0``,
``encoder.final_layer_norm``). The relative position bias is computed from block 0's table and
shared by every block; attention is unscaled (T5 convention).

bf16 safety: the residual stream is kept in float32, RMS-norm variance is float32, the FFN output
projection ``wo`` runs in float32 (transformers keeps ``wo`` in fp32: ``_keep_in_fp32_modules``)
and softmax is float32; only the q/k/v/o and wi matmuls run in ``dtype``. Because the residual is
float32, transformers' fp16 clamp is not needed (it is applied anyway when ``dtype`` is float16
before casting down). Output ``last_hidden_state`` is returned in ``dtype``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamomni2_jax.config import read_json

_ACTS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5Config fields used by the encoder (transformers names). Defaults: T5-v1.1-XXL as in Flux."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        self.activation  # validates

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r} unsupported")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in _ACTS:
            raise ValueError(f"T5Config: activation {act!r} unsupported; known: {sorted(_ACTS)}")
        return act

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "T5Config":
        mt = d.get("model_type", "t5")
        if mt not in ("t5", "umt5"):
            raise ValueError(f"{source}: model_type={mt!r}, expected 't5'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: d[k] for k in names if d.get(k) is not None})

    @classmethod
    def from_json(cls, path: str | Path) -> "T5Config":
        path = Path(path)
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": "t5", "architectures": ["T5EncoderModel"]}


def relative_position_bucket(rel: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucketing of ``memory_pos - query_pos`` (static, computed in numpy)."""
    num_buckets //= 2
    out = (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (np.log(rel.astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
                             * (num_buckets - max_exact)).astype(np.float32)
    large = np.where(rel < max_exact, 0, large).astype(np.int64)  # avoid -inf casts on the unused branch
    large = np.minimum(large, num_buckets - 1)
    return out + np.where(rel < max_exact, rel, large)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean or bias; variance in float32. Output float32 (caller casts)."""

    def __init__(self, d: int, eps: float, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return self.scale[...].astype(jnp.float32) * (x * jax.lax.rsqrt(var + self.eps))


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, *, dtype, param_dtype, rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = nnx.Linear(cfg.d_model, inner, **kw)
        self.k = nnx.Linear(cfg.d_model, inner, **kw)
        self.v = nnx.Linear(cfg.d_model, inner, **kw)
        self.o = nnx.Linear(inner, cfg.d_model, **kw)
        self.relative_attention_bias = (
            nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                      param_dtype=param_dtype, rngs=rngs) if has_bias else None)

    def compute_bias(self, s: int):
        """``[1, H, S, S]`` float32 relative position bias."""
        pos = np.arange(s)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        values = self.relative_attention_bias(jnp.asarray(buckets, jnp.int32))  # [S, S, H]
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def __call__(self, x, bias):
        b, s, _ = x.shape
        h, dk = self.cfg.num_heads, self.cfg.d_kv
        q, k, v = (p(x).reshape(b, s, h, dk) for p in (self.q, self.k, self.v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, h * dk))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, *, dtype, param_dtype, rngs):
        self.SelfAttention = T5Attention(cfg, has_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, bias):
        y = self.SelfAttention(_to_compute(self.layer_norm(x), self.dtype), bias)
        return x + y.astype(jnp.float32)


class T5DenseGatedActDense(nnx.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated) or ``wo(act(wi x))``; ``wo`` in float32."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = cfg.activation
        if cfg.is_gated:
            self.wi_0 = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
            self.wi_1 = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        else:
            self.wi = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.wo = nnx.Linear(cfg.d_ff, cfg.d_model, use_bias=False, dtype=jnp.float32,
                             param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        if hasattr(self, "wi_0"):
            h = _ACTS[self.act](self.wi_0(x)) * self.wi_1(x)
        else:
            h = _ACTS[self.act](self.wi(x))
        return self.wo(h.astype(jnp.float32))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        self.DenseReluDense = T5DenseGatedActDense(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x):
        return x + self.DenseReluDense(_to_compute(self.layer_norm(x), self.dtype))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer = nnx.List([T5LayerSelfAttention(cfg, has_bias, **kw), T5LayerFF(cfg, **kw)])

    def __call__(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        self.block = nnx.List([T5Block(cfg, i == 0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                               for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)

    def __call__(self, x, attention_mask=None):
        s = x.shape[1]
        bias = self.block[0].layer[0].SelfAttention.compute_bias(s)
        if attention_mask is not None:
            bias = bias + jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0,
                                    jnp.finfo(jnp.float32).min)
        x = x.astype(jnp.float32)
        for blk in self.block:
            x = blk(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
    """``model(input_ids [B, S], attention_mask=None) -> last_hidden_state [B, S, d_model]`` in ``dtype``."""

    def __init__(self, config: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=jnp.float32, param_dtype=param_dtype,
                                rngs=rngs)
        self.encoder = T5Stack(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"T5EncoderModel: input_ids must be [B, S], got shape {input_ids.shape}")
        return self.encoder(self.shared(input_ids), attention_mask).astype(self.dtype)


def _to_compute(x, dtype):
    """Cast the float32 normed activations to the matmul dtype (fp16: clamp first, as transformers does)."""
    if jnp.dtype(dtype) == jnp.float16:
        big = jnp.finfo(jnp.float16).max - 1000
        x = jnp.clip(x, -big, big)
    return x.astype(dtype)
