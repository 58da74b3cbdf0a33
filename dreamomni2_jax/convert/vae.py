"""Convert a Flux VAE (diffusers ``vae/`` folder or BFL ``ae.safetensors``) to our Orbax format.

    python convert/vae.py --src SRC --out OUT [--dtype source|bf16|fp16|fp32] [--config config.json] [--overwrite]

SRC: a diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors) or a BFL single file (``ae.safetensors``
of FLUX.1 / Kontext; a ``vae.`` / ``first_stage_model.`` prefix is stripped). For BFL the config is inferred from
tensor shapes (GroupNorm groups 32, ``scaling_factor`` 0.3611, ``shift_factor`` 0.1159 unless ``--config``).
OUT: ``params/`` (Orbax) + ``config.json``; written to a temp folder and renamed.
Mapping: one module table (:func:`vae_modules`, our paths == diffusers paths) and the BFL renames of diffusers'
``convert_ldm_vae_checkpoint`` (``down.{i}.block`` / ``up.{n-1-i}.block`` / ``mid.attn_1`` with 1x1-conv q/k/v).
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np

from dreamomni2_jax.weights.safetensors_io import Reader, open_checkpoint
from dreamomni2_jax.convert.component import component_cli
from dreamomni2_jax.convert.table import CONV, IDENTITY, LINEAR, Plan, Rule, chain, reshape, target_spec

log = logging.getLogger(__name__)
BFL_PREFIXES = ("first_stage_model.", "vae.")
FLUX_SCALING, FLUX_SHIFT = 0.3611, 0.1159

_RESNET = (("norm1", "norm"), ("conv1", "conv"), ("norm2", "norm"), ("conv2", "conv"))
_ATTN = (("group_norm", "norm"), ("to_q", "linear"), ("to_k", "linear"), ("to_v", "linear"), ("to_out.0", "linear"))


def vae_modules(cfg) -> list[tuple[str, str]]:
    """Every parametrised module of our VAE as ``(path, kind)``, kind in conv / norm / linear."""
    n, ch = len(cfg.block_out_channels), cfg.block_out_channels
    mods: list[tuple[str, str]] = []

    def resnet(p: str, cin: int, cout: int):
        mods.extend((f"{p}.{m}", k) for m, k in _RESNET)
        if cin != cout:
            mods.append((f"{p}.conv_shortcut", "conv"))

    def mid(p: str, c: int):
        resnet(f"{p}.mid_block.resnets.0", c, c)
        if cfg.mid_block_add_attention:
            mods.extend((f"{p}.mid_block.attentions.0.{m}", k) for m, k in _ATTN)
        resnet(f"{p}.mid_block.resnets.1", c, c)

    mods.append(("encoder.conv_in", "conv"))
    for b in range(n):
        for r in range(cfg.layers_per_block):
            resnet(f"encoder.down_blocks.{b}.resnets.{r}", ch[max(b - 1, 0)] if r == 0 else ch[b], ch[b])
        if b < n - 1:
            mods.append((f"encoder.down_blocks.{b}.downsamplers.0.conv", "conv"))
    mid("encoder", ch[-1])
    mods += [("encoder.conv_norm_out", "norm"), ("encoder.conv_out", "conv"), ("decoder.conv_in", "conv")]
    mid("decoder", ch[-1])
    rch = ch[::-1]
    for b in range(n):
        for r in range(cfg.layers_per_block + 1):
            resnet(f"decoder.up_blocks.{b}.resnets.{r}", rch[max(b - 1, 0)] if r == 0 else rch[b], rch[b])
        if b < n - 1:
            mods.append((f"decoder.up_blocks.{b}.upsamplers.0.conv", "conv"))
    mods += [("decoder.conv_norm_out", "norm"), ("decoder.conv_out", "conv")]
    if cfg.use_quant_conv:
        mods.append(("quant_conv", "conv"))
    if cfg.use_post_quant_conv:
        mods.append(("post_quant_conv", "conv"))
    return mods


def bfl_name(path: str, n_blocks: int) -> str:
    """Our (= diffusers) module path -> BFL / LDM module path."""
    s = re.sub(r"^(encoder|decoder)\.conv_norm_out$", r"\1.norm_out", path)
    s = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", s)
    s = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", s)
    s = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_blocks - 1 - int(m[1])}.block.", s)
    s = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_blocks - 1 - int(m[1])}.upsample.", s)
    s = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", s)
    s = s.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
    for ours, theirs in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        s = re.sub(rf"\.{re.escape(ours)}$", f".{theirs}", s)
    return s


# Rule templates per module kind: (target leaf, source leaf, hook). BFL attention projections are 1x1 convs.
_KINDS = {
    "conv": (("kernel", "weight", CONV), ("bias", "bias", IDENTITY)),
    "norm": (("scale", "weight", IDENTITY), ("bias", "bias", IDENTITY)),
    "linear": (("kernel", "weight", LINEAR), ("bias", "bias", IDENTITY)),
}
_CONV1x1_AS_LINEAR = chain(reshape(lambda t: (*t, 1, 1)), LINEAR)


def rules(cfg, layout: str) -> list[Rule]:
    """Rule table for ``layout`` in ``("diffusers", "bfl")``."""
    out = []
    for path, kind in vae_modules(cfg):
        src = path if layout == "diffusers" else bfl_name(path, len(cfg.block_out_channels))
        for t_leaf, s_leaf, hook in _KINDS[kind]:
            if layout == "bfl" and kind == "linear" and t_leaf == "kernel":
                hook = _CONV1x1_AS_LINEAR
            out.append(Rule(f"{path}.{t_leaf}", f"{src}.{s_leaf}", hook))
    return out


def detect_layout(reader: Reader) -> str:
    if "encoder.down.0.block.0.conv1.weight" in reader:
        return "bfl"
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in reader:
        return "diffusers"
    raise ValueError(f"{reader.source}: not an AutoencoderKL checkpoint in diffusers or BFL layout "
                     f"(first keys: {reader.keys()[:5]})")



def ldm_shapes(reader: Reader, what: str) -> dict:
    """The encoder/decoder sizes of an LDM-layout (BFL) VAE file, read from its tensor shapes: channels, block
    widths, layers per block, latent channels, mid-block attention (FLUX.1 and FLUX.2 VAEs alike)."""
    n = reader.count("encoder.down.")
    if not n or "decoder.conv_in.weight" not in reader:
        raise ValueError(f"{reader.source}: cannot infer the {what} config (no encoder.down.* / decoder.conv_in)")
    return dict(
        in_channels=reader.shape("encoder.conv_in.weight")[1], out_channels=reader.shape("decoder.conv_out.weight")[0],
        block_out_channels=tuple(reader.shape(f"encoder.down.{b}.block.0.conv1.weight")[0] for b in range(n)),
        layers_per_block=reader.count("encoder.down.0.block."),
        latent_channels=reader.shape("decoder.conv_in.weight")[1],
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in reader)


def infer_bfl_config(reader: Reader, norm_num_groups: int = 32):
    """VAEConfig from BFL tensor shapes; GroupNorm groups and latent scale/shift cannot be inferred (Flux's)."""
    # deferred import: JAX / Flax model code loads only when a plan is built, not for --help or argument checks
    from dreamomni2_jax.models.vae import VAEConfig

    return VAEConfig(**ldm_shapes(reader, "VAE"), norm_num_groups=norm_num_groups,
                     scaling_factor=FLUX_SCALING, shift_factor=FLUX_SHIFT,
                     use_quant_conv="quant_conv.weight" in reader,
                     use_post_quant_conv="post_quant_conv.weight" in reader)


def build_plan(src: str | Path, config=None, param_dtype=np.float32):
    """Open ``src``, pick the layout, settle the config, validate -> ``(Plan, VAEConfig)`` (nothing read yet)."""
    from flax import nnx

    from dreamomni2_jax.models.vae import VAE, VAEConfig

    src = Path(src)
    reader = open_checkpoint(src).under_prefix(BFL_PREFIXES)
    layout = detect_layout(reader)
    if isinstance(config, (str, Path)):
        config = VAEConfig.from_json(config)
    if config is None:
        folder = src if src.is_dir() else src.parent
        if layout == "diffusers":
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"{folder / 'config.json'}: diffusers VAE config missing (or pass --config)")
            _check_class(folder / "config.json", "AutoencoderKL")
            config = VAEConfig.from_json(folder / "config.json")
        else:
            config = infer_bfl_config(reader)
    abstract = nnx.eval_shape(lambda: VAE(config, dtype=param_dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    spec = target_spec(nnx.state(abstract, nnx.Param))
    return Plan(reader, rules(config, layout), spec), config


def _check_class(cfg_path: Path, want: str) -> None:
    got = json.loads(cfg_path.read_text()).get("_class_name")
    if got is not None and got != want:
        raise ValueError(f"{cfg_path}: _class_name is {got!r}, expected {want!r}")


convert, main = component_cli(build_plan, __doc__, src_help='diffusers vae/ folder or BFL ae.safetensors',
                              config_help="AutoencoderKL config.json overriding the folder's / inferred one")


if __name__ == "__main__":
    sys.exit(main())
