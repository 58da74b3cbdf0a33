"""Convert a transformers ``T5EncoderModel`` folder (Flux ``text_encoder_2/``) to our Orbax format.

    python convert/t5.py --src SRC --out OUT [--dtype source|bf16|fp16|fp32] [--overwrite]

SRC: a folder with ``config.json`` and one safetensors file or a sharded ``*.safetensors.index.json``. The token
embedding is read from ``shared.weight`` (or ``encoder.embed_tokens.weight`` when ``shared`` is absent; the tied
copy is skipped). A full encoder-decoder checkpoint (``T5ForConditionalGeneration``) is accepted: its
``decoder.*`` and ``lm_head`` tensors are skipped with a warning. ``wo`` and the RMS norms are stored in float32
(transformers keeps ``wo`` in fp32), the rest in ``--dtype``. OUT: ``params/`` (Orbax) + ``config.json``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import ml_dtypes

from dreamomni2_jax.weights.safetensors_io import open_checkpoint
from dreamomni2_jax.convert.component import component_cli, read_transformers_config
from dreamomni2_jax.convert.table import IDENTITY, LINEAR, Plan, Rule, expand, target_spec

log = logging.getLogger(__name__)
ARCHITECTURES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")
DECODER = (r"decoder\..*", r"lm_head\.weight")

_B = "encoder.block.{i}.layer."


def rules(cfg, embed_source: str) -> list[Rule]:
    ff = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
    linears = [f"{_B}0.SelfAttention.{m}" for m in "qkvo"] + [f"{_B}1.DenseReluDense.{m}" for m in ff]
    norms = [f"{_B}0.layer_norm", f"{_B}1.layer_norm", "encoder.final_layer_norm"]
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    return ([Rule("shared.embedding", embed_source), Rule(f"{bias}.embedding", f"{bias}.weight")]
            + [Rule(f"{m}.kernel", f"{m}.weight", LINEAR) for m in linears]
            + [Rule(f"{m}.scale", f"{m}.weight", IDENTITY) for m in norms])


def read_config(folder: Path):
    """T5Config from ``folder/config.json``, checking ``architectures``."""
    # deferred import: JAX / Flax model code loads only when a plan is built, not for --help or argument checks
    from dreamomni2_jax.models.t5 import T5Config

    return read_transformers_config(folder, T5Config, ARCHITECTURES, "T5 encoder")


def build_plan(src: str | Path, param_dtype=ml_dtypes.bfloat16):
    """Validate ``src`` against the config's model -> ``(Plan, T5Config)`` (nothing read yet)."""
    from flax import nnx

    from dreamomni2_jax.models.t5 import T5EncoderModel

    src = Path(src)
    cfg = read_config(src if src.is_dir() else src.parent)
    reader = open_checkpoint(src)
    embed = "shared.weight" if "shared.weight" in reader else "encoder.embed_tokens.weight"
    ignore = ["encoder\\.embed_tokens\\.weight"] if embed == "shared.weight" else []
    skipped = [k for k in reader.keys() if k.startswith("decoder.") or k == "lm_head.weight"]
    if skipped:
        log.warning("%s: skipping %d decoder / lm_head tensors (encoder only)", reader.source, len(skipped))
        ignore += DECODER
    abstract = nnx.eval_shape(lambda: T5EncoderModel(cfg, dtype=param_dtype, param_dtype=param_dtype,
                                                     rngs=nnx.Rngs(0)))
    spec = target_spec(nnx.state(abstract, nnx.Param))
    return Plan(reader, expand(rules(cfg, embed), {"i": cfg.num_layers}), spec, ignore=ignore), cfg


convert, main = component_cli(build_plan, __doc__, src_help='transformers T5EncoderModel folder (text_encoder_2/)')


if __name__ == "__main__":
    sys.exit(main())
