"""Qwen3 text encoder: transformers ``Qwen3Model`` (the FLUX.2 [klein] ``text_encoder``) in Flax NNX.

Paths mirror transformers (``embed_tokens``, ``layers.self_attn.q_proj``, ``layers.self_attn.q_norm``,
``layers.mlp.gate_proj``, ``layers.input_layernorm``, ``norm``; a ``Qwen3ForCausalLM`` checkpoint's ``model.``
prefix is stripped by the converter and its ``lm_head`` skipped). The decoder layers are stacked along a leading
layer axis (``nnx.vmap``) and run by one ``lax.scan`` that also emits every layer's output, so
:meth:`Qwen3Model.hidden_states` returns transformers' ``output_hidden_states`` entries (index 0 = embeddings,
``k`` = output of layer ``k - 1``, the last one after the final norm) and only runs the layers it needs.
:func:`prompt_embeds` concatenates the selected layers per token exactly as ``Flux2KleinPipeline`` does.

Attention: grouped-query (``num_key_value_heads``), RMSNorm on q and k per head, rotate-half RoPE at positions
``0..S-1`` (whatever the padding, as transformers does), causal mask combined with the key padding mask; logits and
softmax in float32. Rows that see no real key (a left-padded prefix) are undefined, as in transformers.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamomni2_jax.models.stacked import stacked
from dreamomni2_jax.models.flux_blocks import RMSNorm

KLEIN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline text_encoder_out_layers


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """transformers ``Qwen3Config`` fields used by the encoder. Defaults: Qwen3-4B (FLUX.2 [klein] 4B)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    attention_bias: bool = False
    max_position_embeddings: int = 40960

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Qwen3Config: num_attention_heads {self.num_attention_heads} not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Qwen3Config":
        """From a transformers config dict (``rope_parameters`` of transformers 5 or top-level ``rope_theta``);
        refuses what this port does not implement (other activations, rope scaling, sliding windows)."""
        if d.get("model_type", "qwen3") != "qwen3":
            raise ValueError(f"{source}: model_type={d.get('model_type')!r}, expected 'qwen3'")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={d['hidden_act']!r} unsupported (only 'silu')")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true unsupported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: rope_type={rope_type!r} unsupported (only 'default')")
        d = dict(d)
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:  # transformers' default: MHA
            d["num_key_value_heads"] = d["num_attention_heads"]
        if d.get("head_dim") is None:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: d[k] for k in names if d.get(k) is not None})

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "qwen3", "architectures": ["Qwen3Model"], "hidden_act": "silu",
                **dataclasses.asdict(self)}


# The klein text encoders: Qwen3-4B (klein 4B) and Qwen3-8B (klein 9B).
QWEN3_PRESETS = {"klein-4b": Qwen3Config(),
                 "klein-9b": Qwen3Config(hidden_size=4096, intermediate_size=12288)}


def _linear(din, dout, bias, *, dtype, param_dtype, rngs):
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def rope_cos_sin(n: int, head_dim: int, theta: float):
    """transformers ``Qwen3RotaryEmbedding`` (default type) at positions ``0..n-1``: float32 ``[n, head_dim]``."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    freqs = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = _linear(d, self.heads * self.head_dim, b, **kw)
        self.k_proj = _linear(d, self.kv_heads * self.head_dim, b, **kw)
        self.v_proj = _linear(d, self.kv_heads * self.head_dim, b, **kw)
        self.o_proj = _linear(self.heads * self.head_dim, d, b, **kw)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, bias):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, s, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
        c, sn = cos[:, None, :], sin[:, None, :]  # [S, 1, D]: broadcast over heads
        q = (q.astype(jnp.float32) * c + _rotate_half(q.astype(jnp.float32)) * sn).astype(x.dtype)
        k = (k.astype(jnp.float32) * c + _rotate_half(k.astype(jnp.float32)) * sn).astype(x.dtype)
        g = self.heads // self.kv_heads  # query heads per kv head (kv head j serves heads j*g .. j*g+g-1)
        q = q.reshape(b, s, self.kv_heads, g, self.head_dim)
        logits = jnp.einsum("bqjgd,bkjd->bjgqk", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        p = jax.nn.softmax(logits + bias[:, :, None], axis=-1).astype(v.dtype)  # bias [B, 1, S, S]
        o = jnp.einsum("bjgqk,bkjd->bqjgd", p, v).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(o)


class Qwen3MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, False, **kw)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, False, **kw)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, False, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Qwen3Attention(cfg, **kw)
        self.mlp = Qwen3MLP(cfg, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nnx.Module):
    """``model(input_ids [B, S], attention_mask=None) -> last_hidden_state [B, S, hidden]`` in ``dtype``;
    :meth:`hidden_states` for intermediate layers."""

    def __init__(self, config: Qwen3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config, self.dtype = config, dtype
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        self.layers = stacked(lambda r: Qwen3DecoderLayer(config, rngs=r, **kw), config.num_hidden_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def hidden_states(self, input_ids, attention_mask=None, layers: Sequence[int] | None = None):
        """transformers' ``output_hidden_states`` entries at ``layers`` (default: all ``num_hidden_layers + 1``),
        as a tuple of ``[B, S, hidden]`` in ``dtype``. Layers past the largest index asked for are not run."""
        c = self.config
        n_all = c.num_hidden_layers + 1
        layers = tuple(range(n_all)) if layers is None else tuple(int(i) for i in layers)
        bad = [i for i in layers if not 0 <= i < n_all]
        if bad:
            raise ValueError(f"Qwen3Model: hidden-state layers {bad} out of range [0, {n_all - 1}]")
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"Qwen3Model: input_ids must be [B, S], got shape {input_ids.shape}")
        b, s = input_ids.shape
        keep = jnp.tril(jnp.ones((s, s), bool))[None]
        if attention_mask is not None:
            keep = keep & jnp.asarray(attention_mask).astype(bool)[:, None, :]
        bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [B, 1, S, S]
        cos, sin = rope_cos_sin(s, c.head_dim, c.rope_theta)
        x = self.embed_tokens(input_ids)
        n_run = max(layers)
        outs = [x]
        if n_run:
            graphdef, state = nnx.split(self.layers)

            def step(h, layer_state):
                h = nnx.merge(graphdef, layer_state)(h, cos, sin, bias)
                return h, h

            _, ys = jax.lax.scan(step, x, jax.tree.map(lambda a: a[:n_run], state))
            outs += [ys[i] for i in range(n_run)]
        if n_run == c.num_hidden_layers:
            outs[-1] = self.norm(outs[-1])  # transformers ties the last entry to last_hidden_state
        return tuple(outs[i].astype(self.dtype) for i in layers)

    def __call__(self, input_ids, attention_mask=None):
        return self.hidden_states(input_ids, attention_mask, layers=(self.config.num_hidden_layers,))[0]


def prompt_embeds(model: Qwen3Model, input_ids, attention_mask, layers: Sequence[int] = KLEIN_LAYERS):
    """``Flux2KleinPipeline._get_qwen3_prompt_embeds`` after tokenisation: the ``layers`` hidden states
    concatenated per token, ``[B, S, len(layers) * hidden]`` (layer-major features)."""
    return jnp.concatenate(model.hidden_states(input_ids, attention_mask, layers), axis=-1)


def stacked_counts(config: Qwen3Config) -> dict[str, int]:
    return {"layers": config.num_hidden_layers}
