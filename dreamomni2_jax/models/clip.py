"""CLIP text encoder: transformers ``CLIPTextModel`` (5.x) in Flax NNX.

Paths mirror transformers (``embeddings.token_embedding``, ``encoder.layers.0.self_attn.q_proj``,
``final_layer_norm``). Causal self-attention only (Flux passes no padding mask), softmax and
LayerNorm statistics in float32. ``__call__`` returns ``(last_hidden_state, pooled)`` with the
pooled vector taken exactly as transformers does: ``eos_token_id == 2`` (the legacy configs, e.g.
openai/clip-vit-large-patch14 used by Flux) pools at ``argmax(input_ids)``; otherwise at the first
position equal to ``eos_token_id``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.config import read_json

_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """CLIPTextConfig fields used by the text model (transformers names)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"CLIPConfig.hidden_act={self.hidden_act!r} unsupported; known: {sorted(_ACTS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPConfig: hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "CLIPConfig":
        """From a transformers ``CLIPTextConfig`` dict (or a ``CLIPConfig`` with ``text_config``)."""
        if "text_config" in d and isinstance(d["text_config"], dict):
            d = d["text_config"]
        mt = d.get("model_type", "clip_text_model")
        if mt not in ("clip_text_model", "clip"):
            raise ValueError(f"{source}: model_type={mt!r}, expected a CLIP text model")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: d[k] for k in names if d.get(k) is not None})

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPConfig":
        path = Path(path)
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": "clip_text_model", "architectures": ["CLIPTextModel"]}


def _layer_norm(d: int, eps: float, dtype, rngs):
    return nnx.LayerNorm(d, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

    def __call__(self, input_ids):
        s = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(s))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.k_proj = nnx.Linear(d, d, **kw)
        self.v_proj = nnx.Linear(d, d, **kw)
        self.q_proj = nnx.Linear(d, d, **kw)
        self.out_proj = nnx.Linear(d, d, **kw)

    def __call__(self, x, bias):
        b, s, d = x.shape
        hd = d // self.heads
        q, k, v = (p(x).reshape(b, s, self.heads, hd) for p in (self.q_proj, self.k_proj, self.v_proj))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * hd ** -0.5
        p = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, d)
        return self.out_proj(o)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = cfg.hidden_act
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(_ACTS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm1 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype, rngs)

    def __call__(self, x, bias):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, param_dtype, rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, bias):
        for layer in self.layers:
            x = layer(x, bias)
        return x


class CLIPTextModel(nnx.Module):
    """``model(input_ids [B, S]) -> (last_hidden_state [B, S, D], pooled [B, D])``."""

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)

    def __call__(self, input_ids):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextModel: input_ids must be [B, S], got shape {input_ids.shape}")
        s = input_ids.shape[1]
        if s > self.config.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: sequence length {s} > max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        causal = jnp.tril(jnp.ones((s, s), bool))
        bias = jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[None, None]
        h = self.encoder(self.embeddings(input_ids), bias)
        h = self.final_layer_norm(h)
        ids = input_ids.astype(jnp.int32)
        if self.config.eos_token_id == 2:  # legacy configs: eot token has the highest id
            pos = jnp.argmax(ids, axis=-1)
        else:
            pos = jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(h, pos[:, None, None], axis=1)[:, 0]
        return h, pooled
