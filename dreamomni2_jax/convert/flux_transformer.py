"""Convert a Flux transformer checkpoint (diffusers or BFL layout, safetensors only) to our Orbax format.

    python convert/flux_transformer.py --src SRC --out OUT [--dtype source|bf16|fp16|fp32] [--config config.json]

SRC: a diffusers ``transformer/`` folder (sharded + ``*.index.json`` or one file, with ``config.json``) or a BFL
single file (``flux1-dev`` / ``flux1-kontext-dev`` layout; a ``model.diffusion_model.`` prefix is stripped). For a
BFL file the config is inferred from tensor shapes (head_dim 128 and rope axes (16, 56, 56) unless ``--config``).
OUT: ``params/`` (Orbax, per-layer slices) + ``config.json``; written to a temp folder and renamed.
Mapping: one declarative rule table per layout (``DIFFUSERS_RULES`` / ``BFL_RULES``) run by ``dreamomni2_jax.convert.table``;
mapping follows diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

import ml_dtypes

from dreamomni2_jax.weights.safetensors_io import Reader, limit_malloc_caching, open_checkpoint
from dreamomni2_jax.convert.component import component_cli
from dreamomni2_jax.convert.table import IDENTITY, LINEAR, Plan, Rule, chain, expand, split, swap_halves, target_spec
from dreamomni2_jax.models.flux_schema import FLUX_SCHEMA

log = logging.getLogger(__name__)
BFL_PREFIX = "model.diffusion_model."

# Linears: module names, BFL names and fused parts from the model schema; norms here. {i} = double, {j} = single block.
_DOUBLE_NORMS = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")
_SINGLE_NORMS = ("attn.norm_q", "attn.norm_k")


def _linear(target: str, source: str, hook_w=LINEAR, hook_b=IDENTITY) -> list[Rule]:
    return [Rule(f"{target}.kernel", f"{source}.weight", hook_w), Rule(f"{target}.bias", f"{source}.bias", hook_b)]


def _fused(targets: tuple[str, ...], source: str) -> list[Rule]:
    """One fused torch Linear (rows concatenated) -> several of our Linears."""
    return [Rule(tuple(f"{t}.kernel" for t in targets), f"{source}.weight", chain(split(0), LINEAR)),
            Rule(tuple(f"{t}.bias" for t in targets), f"{source}.bias", split(0))]


def diffusers_rules(guidance: bool) -> list[Rule]:
    names = [FLUX_SCHEMA.template(lin) for lin in FLUX_SCHEMA.with_flags(guidance_embeds=guidance)]
    rules = [r for n in names for r in _linear(n, n)]
    d, s = "transformer_blocks.{i}.", "single_transformer_blocks.{j}."
    rules += [Rule(f"{d}{m}.scale", f"{d}{m}.weight") for m in _DOUBLE_NORMS]
    rules += [Rule(f"{s}{m}.scale", f"{s}{m}.weight") for m in _SINGLE_NORMS]
    return rules


def bfl_rules(guidance: bool) -> list[Rule]:
    d, s = "transformer_blocks.{i}.", "single_transformer_blocks.{j}."
    D, S = "double_blocks.{i}.", "single_blocks.{j}."
    norms = [(d + "attn.norm_q", D + "img_attn.norm.query_norm"), (d + "attn.norm_k", D + "img_attn.norm.key_norm"),
             (d + "attn.norm_added_q", D + "txt_attn.norm.query_norm"),
             (d + "attn.norm_added_k", D + "txt_attn.norm.key_norm"),
             (s + "attn.norm_q", S + "norm.query_norm"), (s + "attn.norm_k", S + "norm.key_norm")]
    rules = [Rule(f"{tgt}.scale", f"{src}.scale") for tgt, src in norms]
    present = set(FLUX_SCHEMA.with_flags(guidance_embeds=guidance))
    for src, _, parts in FLUX_SCHEMA.bfl_fused(per_group=True):
        if not present.issuperset(parts):
            continue
        targets = tuple(FLUX_SCHEMA.template(p) for p in parts)
        if len(parts) > 1:
            rules += _fused(targets, src)
        elif parts[0].swapped:  # BFL final layer modulation is (shift, scale); diffusers' is (scale, shift)
            rules += _linear(targets[0], src, chain(swap_halves(0), LINEAR), swap_halves(0))
        else:
            rules += _linear(targets[0], src)
    return rules


def detect_layout(reader: Reader) -> str:
    if "double_blocks.0.img_attn.qkv.weight" in reader or "img_in.weight" in reader:
        return "bfl"
    if "x_embedder.weight" in reader:
        return "diffusers"
    raise ValueError(f"{reader.source}: not a Flux transformer checkpoint in diffusers or BFL layout "
                     f"(first keys: {reader.keys()[:5]})")



def infer_config(reader: Reader, layout: str, base=None):
    """FluxConfig from tensor shapes; ``base`` (a FluxConfig) supplies head_dim / rope axes (defaults: Kontext)."""
    # deferred import: JAX / Flax model code loads only when a plan is built, not for --help or argument checks
    from dreamomni2_jax.models.flux import FluxConfig

    base = base or FluxConfig()
    names = {"bfl": ("img_in", "txt_in", "vector_in.in_layer", "guidance_in.in_layer", "final_layer.linear",
                     "double_blocks.", "single_blocks."),
             "diffusers": ("x_embedder", "context_embedder", "time_text_embed.text_embedder.linear_1",
                           "time_text_embed.guidance_embedder.linear_1", "proj_out",
                           "transformer_blocks.", "single_transformer_blocks.")}[layout]
    img, txt, vec, guid, final, dbl, sgl = names
    for k in (img, txt, vec, final):
        if f"{k}.weight" not in reader:
            raise ValueError(f"{reader.source}: missing key {k}.weight, cannot infer the Flux config")
    inner, in_ch = reader.shape(f"{img}.weight")
    if inner % base.attention_head_dim:
        raise ValueError(f"{reader.source}: hidden size {inner} is not a multiple of head_dim "
                         f"{base.attention_head_dim}; pass --config")
    out_ch = reader.shape(f"{final}.weight")[0] // base.patch_size**2
    return FluxConfig(
        patch_size=base.patch_size, in_channels=in_ch, out_channels=None if out_ch == in_ch else out_ch,
        num_layers=reader.count(dbl), num_single_layers=reader.count(sgl),
        attention_head_dim=base.attention_head_dim, num_attention_heads=inner // base.attention_head_dim,
        joint_attention_dim=reader.shape(f"{txt}.weight")[1], pooled_projection_dim=reader.shape(f"{vec}.weight")[1],
        guidance_embeds=f"{guid}.weight" in reader, axes_dims_rope=base.axes_dims_rope)


def settle_config(src: Path, layout: str, config, config_cls, infer: Callable[[], Any]):
    """The transformer config of a conversion: ``config`` (a config, or a config.json path), else the source
    folder's config.json (diffusers layout), else ``infer()`` (from the tensor shapes)."""
    if isinstance(config, (str, Path)):
        return config_cls.from_json(config)
    if config is not None:
        return config
    folder = src if src.is_dir() else src.parent
    if layout == "diffusers" and (folder / "config.json").is_file():
        return config_cls.from_json(folder / "config.json")
    return infer()


def build_plan(src: str | Path, config=None, param_dtype=ml_dtypes.bfloat16):
    """Open ``src``, pick the layout, settle the config and validate everything -> ``(Plan, FluxConfig)``.

    ``config``: FluxConfig or path to a config.json; by default the folder's config.json (diffusers) or the
    shape-inferred one (BFL). Raises ``ConversionError`` listing every missing / unused / mis-shaped tensor.
    """
    from flax import nnx

    from dreamomni2_jax.models.flux import FluxConfig, abstract_flux, stacked_counts

    src = Path(src)
    reader = open_checkpoint(src).under_prefix((BFL_PREFIX,))
    layout = detect_layout(reader)
    config = settle_config(src, layout, config, FluxConfig, lambda: infer_config(reader, layout))
    model = abstract_flux(config, dtype=param_dtype, param_dtype=param_dtype)
    spec = target_spec(nnx.state(model, nnx.Param), stacked_counts(config))
    rules = (bfl_rules if layout == "bfl" else diffusers_rules)(config.guidance_embeds)
    counts = {"i": config.num_layers, "j": config.num_single_layers}
    return Plan(reader, expand(rules, counts), spec), config


def _quiet_malloc() -> None:
    limit_malloc_caching()
    log.setLevel(logging.INFO)


convert, main = component_cli(build_plan, __doc__, before=_quiet_malloc,
                              src_help="diffusers transformer/ folder or BFL .safetensors file",
                              config_help="FluxTransformer2DModel config.json overriding the inferred one")


__all__ = ["build_plan", "convert", "main", "diffusers_rules", "bfl_rules", "infer_config"]

if __name__ == "__main__":
    sys.exit(main())
