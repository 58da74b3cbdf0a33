"""Convert a FLUX.2 transformer checkpoint (diffusers or BFL layout, safetensors only) to our Orbax format.

    python convert/flux2_transformer.py --src SRC --out OUT [--dtype bf16|fp32] [--config config.json]

SRC: a diffusers ``transformer/`` folder of a ``Flux2Transformer2DModel`` (FLUX.2 [dev] or [klein]; sharded +
``*.index.json`` or one file, with ``config.json``) or a BFL single file (``flux2-dev`` / ``flux-2-klein-*``
layout; a ``model.diffusion_model.`` prefix is stripped). For a BFL file the config is inferred from tensor shapes
(head_dim 128, rope axes (32, 32, 32, 32), θ 2000 unless ``--config``).
OUT: ``params/`` (Orbax, per-layer slices) + ``config.json``; written to a temp folder and renamed.
Mapping: one declarative rule table per layout (``diffusers_rules`` / ``bfl_rules``) run by ``dreamomni2_jax.convert.table``,
following diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``. FLUX.2 has no biases.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import ml_dtypes

from dreamomni2_jax.convert.component import component_cli
from dreamomni2_jax.convert.flux_transformer import BFL_PREFIX, _quiet_malloc, settle_config
from dreamomni2_jax.weights.safetensors_io import Reader, open_checkpoint
from dreamomni2_jax.models.flux2_schema import FLUX2_SCHEMA
from dreamomni2_jax.convert.table import IDENTITY, LINEAR, Plan, Rule, chain, expand, split, swap_halves, target_spec

log = logging.getLogger(__name__)

# Linears: module names, BFL names and fused parts from the model schema; norms here. {i} = double, {j} = single block.
_DOUBLE_NORMS = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")
_SINGLE_NORMS = ("attn.norm_q", "attn.norm_k")
_D, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{j}."


def _linear(target: str, source: str, hook=LINEAR) -> Rule:
    return Rule(f"{target}.kernel", f"{source}.weight", hook)


def diffusers_rules(guidance: bool) -> list[Rule]:
    names = [FLUX2_SCHEMA.template(lin) for lin in FLUX2_SCHEMA.with_flags(guidance_embeds=guidance)]
    rules = [_linear(n, n) for n in names]
    rules += [Rule(f"{p}{m}.scale", f"{p}{m}.weight") for p, ms in ((_D, _DOUBLE_NORMS), (_S, _SINGLE_NORMS))
              for m in ms]
    return rules


def bfl_rules(guidance: bool) -> list[Rule]:
    D, S = "double_blocks.{i}.", "single_blocks.{j}."
    norms = [(_D + "attn.norm_q", D + "img_attn.norm.query_norm"), (_D + "attn.norm_k", D + "img_attn.norm.key_norm"),
             (_D + "attn.norm_added_q", D + "txt_attn.norm.query_norm"),
             (_D + "attn.norm_added_k", D + "txt_attn.norm.key_norm"),
             (_S + "attn.norm_q", S + "norm.query_norm"), (_S + "attn.norm_k", S + "norm.key_norm")]
    rules = [Rule(f"{tgt}.scale", f"{src}.scale", IDENTITY) for tgt, src in norms]
    present = set(FLUX2_SCHEMA.with_flags(guidance_embeds=guidance))
    for src, _, parts in FLUX2_SCHEMA.bfl_fused(per_group=True):
        if not present.issuperset(parts):
            continue
        names = tuple(FLUX2_SCHEMA.template(p) for p in parts)
        if len(parts) > 1:
            rules.append(Rule(tuple(f"{n}.kernel" for n in names), f"{src}.weight", chain(split(0), LINEAR)))
        elif parts[0].swapped:  # BFL final layer modulation is (shift, scale); diffusers' is (scale, shift)
            rules.append(_linear(names[0], src, chain(swap_halves(0), LINEAR)))
        else:
            rules.append(_linear(names[0], src))
    return rules


def detect_layout(reader: Reader) -> str:
    if "single_stream_modulation.lin.weight" in reader:
        return "bfl"
    if "single_stream_modulation.linear.weight" in reader:
        return "diffusers"
    raise ValueError(f"{reader.source}: not a FLUX.2 transformer checkpoint in diffusers or BFL layout "
                     f"(first keys: {reader.keys()[:5]})")



def infer_config(reader: Reader, layout: str, base=None):
    """Flux2Config from tensor shapes; ``base`` (a Flux2Config) supplies head_dim / rope axes / θ / eps."""
    # deferred import: JAX / Flax model code loads only when a plan is built, not for --help or argument checks
    from dreamomni2_jax.models.flux2 import Flux2Config

    base = base or Flux2Config()
    img, txt, final, guid, ffin, dbl, sgl = {
        "bfl": ("img_in", "txt_in", "final_layer.linear", "guidance_in.in_layer", "double_blocks.0.img_mlp.0",
                "double_blocks.", "single_blocks."),
        "diffusers": ("x_embedder", "context_embedder", "proj_out", "time_guidance_embed.guidance_embedder.linear_1",
                      "transformer_blocks.0.ff.linear_in", "transformer_blocks.", "single_transformer_blocks.")}[layout]
    for k in (img, txt, final):
        if f"{k}.weight" not in reader:
            raise ValueError(f"{reader.source}: missing key {k}.weight, cannot infer the FLUX.2 config")
    inner, in_ch = reader.shape(f"{img}.weight")
    if inner % base.attention_head_dim:
        raise ValueError(f"{reader.source}: hidden size {inner} is not a multiple of head_dim "
                         f"{base.attention_head_dim}; pass --config")
    out_ch = reader.shape(f"{final}.weight")[0] // base.patch_size**2
    mlp_ratio = reader.shape(f"{ffin}.weight")[0] / 2 / inner if f"{ffin}.weight" in reader else base.mlp_ratio
    return Flux2Config(
        patch_size=base.patch_size, in_channels=in_ch, out_channels=None if out_ch == in_ch else out_ch,
        num_layers=reader.count(dbl), num_single_layers=reader.count(sgl),
        attention_head_dim=base.attention_head_dim, num_attention_heads=inner // base.attention_head_dim,
        joint_attention_dim=reader.shape(f"{txt}.weight")[1],
        timestep_guidance_channels=reader.shape(("time_in.in_layer" if layout == "bfl" else
                                                 "time_guidance_embed.timestep_embedder.linear_1") + ".weight")[1],
        mlp_ratio=mlp_ratio, axes_dims_rope=base.axes_dims_rope, rope_theta=base.rope_theta, eps=base.eps,
        guidance_embeds=f"{guid}.weight" in reader)


def build_plan(src: str | Path, config=None, param_dtype=ml_dtypes.bfloat16):
    """Open ``src``, pick the layout, settle the config and validate everything -> ``(Plan, Flux2Config)``.

    ``config``: Flux2Config or path to a config.json; by default the folder's config.json (diffusers) or the
    shape-inferred one (BFL). Raises ``ConversionError`` listing every missing / unused / mis-shaped tensor.
    """
    from dreamomni2_jax.models.flux2 import Flux2Config

    src = Path(src)
    reader = open_checkpoint(src).under_prefix((BFL_PREFIX,))
    layout = detect_layout(reader)
    config = settle_config(src, layout, config, Flux2Config, lambda: infer_config(reader, layout))
    return make_plan(reader, layout, config, param_dtype), config


def make_plan(reader: Reader, layout: str, config, param_dtype=ml_dtypes.bfloat16) -> Plan:
    """The validated plan for ``reader`` (``layout`` "diffusers" | "bfl") into a model of ``config``."""
    from flax import nnx

    from dreamomni2_jax.models.flux2 import abstract_flux2, stacked_counts

    model = abstract_flux2(config, dtype=param_dtype, param_dtype=param_dtype)
    spec = target_spec(nnx.state(model, nnx.Param), stacked_counts(config))
    rules = (bfl_rules if layout == "bfl" else diffusers_rules)(config.guidance_embeds)
    counts = {"i": config.num_layers, "j": config.num_single_layers}
    return Plan(reader, expand(rules, counts), spec)


convert, main = component_cli(build_plan, __doc__, before=_quiet_malloc,
                              src_help="diffusers Flux2Transformer2DModel transformer/ folder or BFL .safetensors file",
                              config_help="Flux2Transformer2DModel config.json overriding the inferred one")


__all__ = ["build_plan", "make_plan", "convert", "main", "diffusers_rules", "bfl_rules", "infer_config"]

if __name__ == "__main__":
    sys.exit(main())
