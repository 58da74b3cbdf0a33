"""Attaching LoRA adapters to a model, by one function, :func:`attach_lora`, from any of three sources:

* fresh adapters from a :class:`~dreamomni2_jax.config.LoraConfig` (the preset of the model's schema plus
  ``targets``; with ``lora.init_from``, that file's adapters instead);
* a LoRA file (diffusers/PEFT or kohya/BFL safetensors; :mod:`dreamomni2_jax.lora.files` reads it);
* a training run's checkpoint (run folder, its ``checkpoints/`` or one step folder; latest complete step).

A model that already has adapters gets the new ones' values (same modules and rank; alpha is folded into
``lora_B``); ``scale`` is folded into ``lora_B`` (unmerged: bf16 base weights do not swallow the update).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamomni2_jax.config import LoraConfig
from dreamomni2_jax.lora.layers import (LoraError, apply_lora, linear_paths, lora_metadata, lora_modules, lora_state,
    reset_magnitudes, set_lora_state)
from dreamomni2_jax.lora.files import MAGNITUDE, LoraFileError, check_finite, load_lora_file
from dreamomni2_jax.models.schemas import lora_target_patterns, schema_for, stacked_groups
from dreamomni2_jax.utils.tree_paths import dotted
from dreamomni2_jax.checkpoint.store import load_lora as read_checkpoint_lora

log = logging.getLogger(__name__)


def layer_counts(model) -> dict[str, int]:
    """``{stacked block name: layer count}`` of an NNX Flux / FLUX.2 model (leading axis of its params)."""
    out = {}
    for name in stacked_groups():
        block = getattr(model, name, None)
        if block is not None:
            leaves = jax.tree.leaves(nnx.state(block, nnx.Param))
            out[name] = int(leaves[0].shape[0])
    return out


def attach_lora(model: nnx.Module, source: str | Path | None = None, *, config: LoraConfig | None = None,
                scale: float = 1.0, step: int | None = None, ema: bool = False, seed: int | jax.Array = 0,
                dtype=None, dropout: float | None = None, fresh: bool = False, variant: str | None = None) -> dict:
    """Attach adapters to ``model`` (see the module docstring) -> ``{"rank", "alpha", "targets", ...}``.

    ``source`` None: fresh adapters from ``config`` (``seed`` draws ``lora_A``), or ``config.init_from``'s file
    (``fresh=True``: fresh ones regardless, e.g. for shape-only models).
    ``source`` a file: its adapters at strength ``scale``; a folder: the run checkpoint's (``step``: that step,
    ``ema``: the EMA adapters). ``dtype`` / ``dropout`` / ``variant`` of new adapters: ``config``'s, else
    float32 / 0 / the source's. DoRA sources (``lora_magnitude_vector`` keys) make DoRA layers; ``variant="dora"``
    with a plain LoRA (a model without adapters only) makes DoRA layers whose magnitudes start at the norm of
    ``W + scale * A @ B``, which computes exactly what the LoRA computes (``lora.init_from`` a LoRA file with
    ``lora.variant=dora``).
    A LoRA that does not fit the model raises ``LoraFileError`` / ``LoraError`` naming the modules, a bad run
    folder ``CheckpointError``."""
    if dtype is None:
        dtype = jnp.dtype(config.dtype) if config is not None else jnp.float32
    if dropout is None:
        dropout = config.dropout if config is not None else 0.0
    if source is None and config is not None and config.init_from and not fresh:
        meta = attach_lora(model, config.init_from, scale=scale, dtype=dtype, dropout=dropout,
                           variant=config.variant)
        if meta["variant"] != config.variant:
            log.warning("lora.init_from=%s is a DoRA LoRA: training it as DoRA (config: lora.variant=%s)",
                        config.init_from, config.variant)
        if (meta["rank"], meta["alpha"]) != (config.rank, config.alpha):
            log.warning("lora.init_from=%s: using the file's rank %d / alpha %g (config: %d / %g)", config.init_from,
                        meta["rank"], meta["alpha"], config.rank, config.alpha)
        return meta
    if source is None:
        if config is None:
            raise LoraError("attach_lora needs a LoRA source (file or run folder) or a LoraConfig")
        return _fresh(model, config, seed)
    path = Path(source)
    if path.is_dir():
        flat, meta = read_checkpoint_lora(path, step, ema=ema)
    else:
        flat, meta = load_lora_file(path, layer_counts(model), schema=schema_for(model))
    return _set_adapters(model, flat, meta, scale, dtype=dtype, dropout=dropout, variant=variant)


def _fresh(model: nnx.Module, cfg: LoraConfig, seed) -> dict:
    """Adapters from ``cfg``: the model's preset (restricted to the modules it has, e.g. no single blocks) plus
    ``cfg.targets``, at ``cfg.rank`` / ``cfg.alpha`` / ``cfg.dropout`` / ``cfg.dtype`` / ``cfg.init``."""
    have = {dotted(path) for path, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}
    patterns = lora_target_patterns(cfg, model)
    preset = [p for p in patterns[:len(patterns) - len(cfg.targets)] if any(re.search(p, h) for h in have)]
    apply_lora(model, preset + list(cfg.targets), rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
               dtype=jnp.dtype(cfg.dtype), seed=seed, init=cfg.init, variant=cfg.variant)
    return {**lora_metadata(model), "source": None}


def _set_adapters(model, flat: Mapping[str, np.ndarray], meta: Mapping, scale: float = 1.0, *, dtype=None,
                  dropout: float = 0.0, variant: str | None = None) -> dict:
    """Attach adapters in our flat layout (``meta``: ``rank``, ``alpha``, ``targets``, optional ``source`` /
    ``step_dir``) with strength ``scale`` (folded into ``lora_B``). A model without adapters gets exactly these
    targets, rank and alpha; a model that already has adapters must have the same modules and rank (alpha is
    folded in). Any mismatch raises :class:`LoraFileError` listing the keys."""
    src = meta.get("source") or meta.get("step_dir") or "LoRA"
    check_finite(flat, src)
    file_variant = "dora" if any(k.endswith(f".{MAGNITUDE}") for k in flat) else "lora"
    existing = lora_modules(model)
    factor = float(scale)
    if existing:
        have = set(existing)
        missing, unknown = sorted(have - set(meta["targets"])), sorted(set(meta["targets"]) - have)
        if missing or unknown:
            raise LoraFileError(f"{src}: LoRA modules differ from the model's adapters: not in the file {missing}, "
                                f"not adapted in the model {unknown}")
        mm = lora_metadata(model)
        if mm["rank"] != meta["rank"]:
            raise LoraFileError(f"{src}: rank {meta['rank']} != the model adapters' rank {mm['rank']}")
        if mm["variant"] != file_variant:
            raise LoraFileError(f"{src}: a {file_variant} adapter cannot be loaded into the model's "
                                f"{mm['variant']} adapters")
        factor *= (meta["alpha"] / meta["rank"]) / (mm["alpha"] / mm["rank"])
    else:
        available = set(linear_paths(model))
        unknown = [t for t in meta["targets"] if t not in available]
        if unknown:
            raise LoraFileError(f"{src}: LoRA targets that are not Linear modules of the model: {unknown}; model "
                                f"Linear paths: {sorted(available)}")
        apply_lora(model, [f"^{re.escape(t)}$" for t in meta["targets"]], rank=meta["rank"], alpha=meta["alpha"],
                   dropout=dropout, dtype=jnp.dtype(dtype or jnp.float32),
                   variant="dora" if "dora" in (variant, file_variant) else "lora")
    if factor != 1.0:
        flat = {k: v * np.float32(factor) if k.endswith(".lora_B") else v for k, v in flat.items()}
    fill = not existing and variant == "dora" and file_variant == "lora"
    if fill:  # magnitudes come from the adapted weights below
        flat = {**flat, **{k: v for k, v in lora_state(model).items() if k.endswith(f".{MAGNITUDE}")}}
    try:
        set_lora_state(model, flat)
    except LoraError as e:
        raise LoraFileError(f"{src}: {e}") from None
    if fill:
        reset_magnitudes(model)
    return {**meta, "variant": lora_metadata(model)["variant"]}


__all__ = ["attach_lora", "layer_counts"]
