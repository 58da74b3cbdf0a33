"""Convert a FLUX.2 VAE (diffusers ``AutoencoderKLFlux2`` ``vae/`` folder) to our Orbax format.

    python convert/vae2.py --src SRC --out OUT [--dtype fp32|bf16] [--overwrite]

SRC: a diffusers folder (``config.json`` with ``_class_name`` ``AutoencoderKLFlux2`` + safetensors). The
encoder / decoder / quant convs use the ``AutoencoderKL`` module table of :mod:`dreamomni2_jax.convert.vae` (our paths ==
diffusers paths); the latent batch-norm statistics ``bn.running_mean`` / ``bn.running_var`` are kept in float32
(``bn.num_batches_tracked`` is a training counter and is skipped). OUT: ``params/`` (Orbax) + ``config.json``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dreamomni2_jax.convert.component import component_cli
from dreamomni2_jax.weights.safetensors_io import open_checkpoint
from dreamomni2_jax.convert.table import Plan, Rule, target_spec
from dreamomni2_jax.convert.vae import _check_class, rules as vae_rules

BN_STATS = ("bn.running_mean", "bn.running_var")
IGNORE = (r"bn\.num_batches_tracked",)


def rules(cfg) -> list[Rule]:
    return vae_rules(cfg.vae_config(), "diffusers") + [Rule(k, k) for k in BN_STATS]


def build_plan(src: str | Path, config=None, param_dtype=np.float32):
    """Open ``src``, settle the config, validate -> ``(Plan, Flux2VAEConfig)`` (nothing read yet)."""
    from flax import nnx

    from dreamomni2_jax.models.vae2 import AutoencoderKLFlux2, Flux2VAEConfig

    src = Path(src)
    reader = open_checkpoint(src)
    if isinstance(config, (str, Path)):
        config = Flux2VAEConfig.from_json(config)
    if config is None:
        folder = src if src.is_dir() else src.parent
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'}: AutoencoderKLFlux2 config missing (or pass --config)")
        _check_class(folder / "config.json", "AutoencoderKLFlux2")
        config = Flux2VAEConfig.from_json(folder / "config.json")
    abstract = nnx.eval_shape(lambda: AutoencoderKLFlux2(config, dtype=param_dtype, param_dtype=param_dtype,
                                                         rngs=nnx.Rngs(0)))
    spec = target_spec(nnx.state(abstract, (nnx.Param, nnx.BatchStat)))
    return Plan(reader, rules(config), spec, ignore=IGNORE), config


convert, main = component_cli(build_plan, __doc__, src_help="diffusers AutoencoderKLFlux2 vae/ folder",
                              config_help="AutoencoderKLFlux2 config.json overriding the folder's")


if __name__ == "__main__":
    sys.exit(main())
