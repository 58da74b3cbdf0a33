"""Convert a FLUX.2 VAE (diffusers ``AutoencoderKLFlux2`` ``vae/`` folder or BFL single file) to our Orbax format.

    python convert/vae_flux2.py --src SRC --out OUT [--dtype fp32|bf16] [--config config.json] [--overwrite]

SRC: a diffusers folder (``config.json`` with ``_class_name`` ``AutoencoderKLFlux2`` + safetensors) or a BFL
single file (the FLUX.2 ``ae.safetensors`` / ``flux2-vae.safetensors``, LDM layout; a ``vae.`` /
``first_stage_model.`` prefix is stripped). For BFL the config is inferred from tensor shapes (GroupNorm groups 32,
batch-norm eps 1e-4: diffusers' ``AutoencoderKLFlux2`` defaults, unless ``--config``). The encoder / decoder /
quant convs use the ``AutoencoderKL`` module table of :mod:`dreamomni2_jax.convert.vae` (our paths == diffusers
paths; BFL names as in the FLUX.1 VAE, except that BFL keeps the quant convs inside the encoder / decoder:
``encoder.quant_conv`` / ``decoder.post_quant_conv``, as diffusers' ``scripts/convert_flux2_to_diffusers.py``
maps them); the latent batch-norm statistics ``bn.running_mean`` / ``bn.running_var`` are kept in float32
(``bn.num_batches_tracked`` is a training counter and is skipped). OUT: ``params/`` (Orbax) + ``config.json``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dreamomni2_jax.convert.component import component_cli
from dreamomni2_jax.weights.safetensors_io import open_checkpoint
from dreamomni2_jax.convert.table import Plan, Rule, target_spec
from dreamomni2_jax.convert.vae import BFL_PREFIXES, _check_class, detect_layout, ldm_shapes, rules as vae_rules

BN_STATS = ("bn.running_mean", "bn.running_var")
IGNORE = (r"bn\.num_batches_tracked",)
# BFL's FLUX.2 autoencoder holds the quant convs inside its encoder / decoder (FLUX.1's at the top level).
_BFL_QUANT = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}


def _bfl_source(name: str) -> str:
    for theirs, flux2 in _BFL_QUANT.items():
        if name.startswith(theirs):
            return flux2 + name[len(theirs):]
    return name


def rules(cfg, layout: str = "diffusers") -> list[Rule]:
    """Rule table for ``layout`` in ``("diffusers", "bfl")``: the AutoencoderKL table plus the batch-norm stats."""
    table = vae_rules(cfg.vae_config(), layout)
    if layout == "bfl":
        table = [Rule(r.targets, tuple(_bfl_source(s) for s in r.sources), r.hook) for r in table]
    return table + [Rule(k, k) for k in BN_STATS]


def infer_bfl_config(reader, norm_num_groups: int = 32):
    """Flux2VAEConfig from BFL tensor shapes; GroupNorm groups and batch-norm eps cannot be inferred (diffusers'
    ``AutoencoderKLFlux2`` defaults)."""
    # deferred import: JAX / Flax model code loads only when a plan is built, not for --help or argument checks
    from dreamomni2_jax.models.vae_flux2 import Flux2VAEConfig

    return Flux2VAEConfig(**ldm_shapes(reader, "FLUX.2 VAE"), norm_num_groups=norm_num_groups,
                          use_quant_conv="encoder.quant_conv.weight" in reader,
                          use_post_quant_conv="decoder.post_quant_conv.weight" in reader)


def build_plan(src: str | Path, config=None, param_dtype=np.float32):
    """Open ``src``, settle the config, validate -> ``(Plan, Flux2VAEConfig)`` (nothing read yet)."""
    from flax import nnx

    from dreamomni2_jax.models.vae_flux2 import AutoencoderKLFlux2, Flux2VAEConfig

    src = Path(src)
    reader = open_checkpoint(src).under_prefix(BFL_PREFIXES)
    layout = detect_layout(reader)
    if isinstance(config, (str, Path)):
        config = Flux2VAEConfig.from_json(config)
    if config is None and layout == "bfl":
        config = infer_bfl_config(reader)
    if config is None:
        folder = src if src.is_dir() else src.parent
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'}: AutoencoderKLFlux2 config missing (or pass --config)")
        _check_class(folder / "config.json", "AutoencoderKLFlux2")
        config = Flux2VAEConfig.from_json(folder / "config.json")
    abstract = nnx.eval_shape(lambda: AutoencoderKLFlux2(config, dtype=param_dtype, param_dtype=param_dtype,
                                                         rngs=nnx.Rngs(0)))
    spec = target_spec(nnx.state(abstract, (nnx.Param, nnx.BatchStat)))
    return Plan(reader, rules(config, layout), spec, ignore=IGNORE), config


convert, main = component_cli(build_plan, __doc__,
                              src_help="diffusers AutoencoderKLFlux2 vae/ folder or BFL FLUX.2 ae.safetensors",
                              config_help="AutoencoderKLFlux2 config.json overriding the folder's / inferred one")


if __name__ == "__main__":
    sys.exit(main())
