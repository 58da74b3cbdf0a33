"""Convert a transformers ``CLIPTextModel`` folder (Flux ``text_encoder/``) to our Orbax format.

    python convert/clip.py --src SRC --out OUT [--dtype source|bf16|fp16|fp32] [--overwrite]

SRC: a folder with ``config.json`` (``CLIPTextModel``) and one safetensors file or a sharded index. Keys with the
transformers-4 ``text_model.`` prefix and without it (transformers 5) are both accepted; the non-persistent
``position_ids`` buffer some checkpoints carry is ignored. OUT: ``params/`` (Orbax) + ``config.json``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from dreamomni2_jax.weights.safetensors_io import Reader, open_checkpoint
from dreamomni2_jax.convert.component import component_cli, read_transformers_config
from dreamomni2_jax.convert.table import IDENTITY, LINEAR, Plan, Rule, expand, target_spec

log = logging.getLogger(__name__)
PREFIX = "text_model."
ARCHITECTURES = ("CLIPTextModel",)
IGNORE = (r"embeddings\.position_ids",)

_L = "encoder.layers.{i}."
_LINEARS = tuple(_L + m for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"))
_NORMS = (_L + "layer_norm1", _L + "layer_norm2", "final_layer_norm")
RULES = (
    [Rule("embeddings.token_embedding.embedding", "embeddings.token_embedding.weight"),
     Rule("embeddings.position_embedding.embedding", "embeddings.position_embedding.weight")]
    + [r for m in _LINEARS for r in (Rule(f"{m}.kernel", f"{m}.weight", LINEAR), Rule(f"{m}.bias", f"{m}.bias"))]
    + [r for m in _NORMS for r in (Rule(f"{m}.scale", f"{m}.weight", IDENTITY), Rule(f"{m}.bias", f"{m}.bias"))]
)


def _strip_prefix(reader: Reader) -> Reader:
    if not any(k.startswith(PREFIX) for k in reader.keys()):
        return reader
    return Reader({(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in reader.infos.items()},
                  reader.source)


def read_config(folder: Path):
    """CLIPConfig from ``folder/config.json``, checking ``architectures``."""
    # deferred import: JAX / Flax model code loads only when a plan is built, not for --help or argument checks
    from dreamomni2_jax.models.clip import CLIPConfig

    return read_transformers_config(folder, CLIPConfig, ARCHITECTURES, "CLIP text encoder")


def build_plan(src: str | Path, param_dtype=np.float32):
    """Validate ``src`` against the config's model -> ``(Plan, CLIPConfig)`` (nothing read yet)."""
    from flax import nnx

    from dreamomni2_jax.models.clip import CLIPTextModel

    src = Path(src)
    cfg = read_config(src if src.is_dir() else src.parent)
    reader = _strip_prefix(open_checkpoint(src))
    abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, dtype=param_dtype, param_dtype=param_dtype,
                                                    rngs=nnx.Rngs(0)))
    spec = target_spec(nnx.state(abstract, nnx.Param))
    return Plan(reader, expand(RULES, {"i": cfg.num_hidden_layers}), spec, ignore=IGNORE), cfg


convert, main = component_cli(build_plan, __doc__, src_help='transformers CLIPTextModel folder (text_encoder/)')


if __name__ == "__main__":
    sys.exit(main())
