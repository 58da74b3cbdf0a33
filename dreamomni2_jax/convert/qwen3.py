"""Convert a transformers Qwen3 folder (FLUX.2 [klein] ``text_encoder/``) to our Orbax format.

    python convert/qwen3.py --src SRC --out OUT [--dtype bf16|fp32] [--overwrite]

SRC: a folder with ``config.json`` (``Qwen3ForCausalLM`` or ``Qwen3Model``) and one safetensors file or a sharded
``*.safetensors.index.json``. The ``model.`` prefix of a ``Qwen3ForCausalLM`` checkpoint is stripped and its
``lm_head`` (absent when tied to the embeddings) is skipped: the encoder needs hidden states only.
OUT: ``params/`` (Orbax, decoder layers as per-layer slices) + ``config.json``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import ml_dtypes

from dreamomni2_jax.convert.component import component_cli, read_transformers_config
from dreamomni2_jax.weights.safetensors_io import Reader, open_checkpoint
from dreamomni2_jax.convert.table import IDENTITY, LINEAR, Plan, Rule, expand, target_spec

log = logging.getLogger(__name__)
ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3Model")
_L = "layers.{i}."


def rules(cfg) -> list[Rule]:
    linears = [f"{_L}self_attn.{m}_proj" for m in "qkvo"] + [f"{_L}mlp.{m}_proj" for m in ("gate", "up", "down")]
    norms = [f"{_L}self_attn.q_norm", f"{_L}self_attn.k_norm", f"{_L}input_layernorm",
             f"{_L}post_attention_layernorm", "norm"]
    out = [Rule("embed_tokens.embedding", "embed_tokens.weight")]
    out += [Rule(f"{m}.kernel", f"{m}.weight", LINEAR) for m in linears]
    if cfg.attention_bias:
        out += [Rule(f"{_L}self_attn.{m}_proj.bias", f"{_L}self_attn.{m}_proj.bias") for m in "qkvo"]
    out += [Rule(f"{m}.scale", f"{m}.weight", IDENTITY) for m in norms]
    return out


def read_config(folder: Path):
    """Qwen3Config from ``folder/config.json``, checking ``architectures``."""
    # deferred import: JAX / Flax model code loads only when a plan is built, not for --help or argument checks
    from dreamomni2_jax.models.qwen3 import Qwen3Config

    return read_transformers_config(folder, Qwen3Config, ARCHITECTURES, "Qwen3 text encoder")


def build_plan(src: str | Path, param_dtype=ml_dtypes.bfloat16):
    """Validate ``src`` against the config's model -> ``(Plan, Qwen3Config)`` (nothing read yet)."""
    src = Path(src)
    cfg = read_config(src if src.is_dir() else src.parent)
    reader = open_checkpoint(src)
    if any(k.startswith("model.") for k in reader.keys()):  # Qwen3ForCausalLM: strip, keep the rest (checked)
        reader = Reader({k.removeprefix("model."): v for k, v in reader.infos.items()}, reader.source)
    ignore = []
    if "lm_head.weight" in reader:
        log.info("%s: skipping lm_head.weight (encoder only)", reader.source)
        ignore.append(r"lm_head\.weight")
    return make_plan(reader, cfg, param_dtype, ignore), cfg


def make_plan(reader: Reader, cfg, param_dtype=ml_dtypes.bfloat16, ignore=()) -> Plan:
    """The validated plan for ``reader`` (keys without the ``model.`` prefix) into a model of ``cfg``."""
    from flax import nnx

    from dreamomni2_jax.models.qwen3 import Qwen3Model, stacked_counts

    abstract = nnx.eval_shape(lambda: Qwen3Model(cfg, dtype=param_dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    spec = target_spec(nnx.state(abstract, nnx.Param), stacked_counts(cfg))
    return Plan(reader, expand(rules(cfg), {"i": cfg.num_hidden_layers}), spec, ignore=ignore)


convert, main = component_cli(build_plan, __doc__,
                              src_help="transformers Qwen3ForCausalLM / Qwen3Model folder (klein text_encoder/)")


if __name__ == "__main__":
    sys.exit(main())
