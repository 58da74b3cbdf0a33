"""LoRA files: read and write diffusers/PEFT and kohya/ComfyUI safetensors (numpy only, no torch, no jax).
Attaching adapters to a model is :mod:`dreamomni2_jax.lora.attach`.

Three layouts of the same adapters:

* ours (:func:`dreamomni2_jax.lora.layers.lora_state`) and the neutral in-memory ``{module: Adapter}``:
  :mod:`dreamomni2_jax.lora.adapters`;
* diffusers/PEFT (here): ``transformer.transformer_blocks.3.attn.to_q.lora_A.weight`` ``[r, in]`` /
  ``lora_B.weight`` ``[out, r]`` plus ``__metadata__["lora_adapter_metadata"]`` = JSON ``{"transformer.r",
  "transformer.lora_alpha", "transformer.target_modules", ...}`` (what diffusers' ``save_lora_weights`` writes and
  ``load_lora_weights`` reads into ``peft.LoraConfig``, so alpha != rank loads correctly);
* kohya/ComfyUI (BFL module names, fused q/k/v): :mod:`dreamomni2_jax.lora.kohya`.

DoRA adapters (``lora.variant = "dora"``) also carry peft's magnitude vector (``Adapter.magnitude`` ``[out]``; ours:
``.lora_magnitude_vector`` ``[L, out]``), written as ``transformer.<module>.lora_magnitude_vector`` with
``use_dora: true`` in the adapter metadata (what peft's ``get_peft_model_state_dict`` and diffusers'
``save_lora_weights`` write). The kohya layout has no DoRA form here: exporting DoRA as kohya is refused.

Entry points: :func:`save_lora_file` / :func:`load_lora_file` (our flat state <-> a file), :func:`read_adapters` /
:func:`write_adapters` (the neutral form <-> a file).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from dreamomni2_jax.utils.atomic_write import atomic_file
from dreamomni2_jax.utils.dtypes import SHORT
from dreamomni2_jax.lora.adapters import (  # noqa: F401 - Adapter, LoraError, LoraFileError, stack/unstack: public here too
    MAGNITUDE, Adapter, LoraError, LoraFileError, alphas_close, is_dora, stack, uniform_rank_alpha, unstack)
from dreamomni2_jax.lora.kohya import from_kohya, to_kohya

FORMATS = ("diffusers", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
OUR_METADATA_KEY = "dreamomni2_lora"
PREFIX = "transformer."


# ------------------------------------------------------------------------------------------------ diffusers
def to_diffusers(adapters: Mapping[str, Adapter], dtype=np.float32) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> (tensors, safetensors metadata) in diffusers ``save_lora_weights`` layout (uniform rank/alpha)."""
    rank, alpha = uniform_rank_alpha(adapters)
    if any(a.rank != rank or not alphas_close(a.alpha, alpha) for a in adapters.values()):
        raise LoraFileError("diffusers export needs one rank/alpha for all modules; stack() the adapters first")
    dora = is_dora(adapters)
    tensors = {}
    for path, ad in sorted(adapters.items()):
        tensors[f"{PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(ad.down.astype(dtype))
        tensors[f"{PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(ad.up.astype(dtype))
        if dora:
            tensors[f"{PREFIX}{path}.{MAGNITUDE}"] = np.ascontiguousarray(np.asarray(ad.magnitude).astype(dtype))
    cfg = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(adapters), "lora_dropout": 0.0, "bias": "none",
           "use_dora": dora, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}}
    meta = {f"{PREFIX}{k}": v for k, v in cfg.items()}
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


def _peft_meta(file_meta: Mapping[str, str], source) -> dict | None:
    raw = file_meta.get(METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFileError(f"{source}: __metadata__[{METADATA_KEY!r}] is not JSON ({e})") from None
    if any(k.startswith(PREFIX) for k in meta):
        meta = {k[len(PREFIX):]: v for k, v in meta.items() if k.startswith(PREFIX)}
    return meta


def _pattern_value(module: str, patterns: Mapping[str, float], default: float) -> float:
    for pat, v in patterns.items():  # peft: a pattern matches a module name suffix (regex)
        if re.fullmatch(rf"(.*\.)?(?:{pat.lstrip('^')})", module):
            return v
    return default


def from_diffusers(tensors: Mapping[str, np.ndarray], file_meta: Mapping[str, str], source) -> dict[str, Adapter]:
    """diffusers / PEFT / ai-toolkit keys (``transformer.`` or ``base_model.model.`` prefix, or none)."""
    prefixes = (PREFIX, "base_model.model.")
    pre = next((p for p in prefixes if any(k.startswith(p) for k in tensors)), "")
    unknown = [k for k in tensors if not k.startswith(pre)]
    body = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
    parts: dict[str, dict[str, np.ndarray]] = {}
    for k, v in body.items():
        m = re.fullmatch(rf"(.+)\.(lora_A\.weight|lora_B\.weight|alpha|{MAGNITUDE})(?:\.weight)?", k)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            unknown.append(pre + k)
    incomplete = [f"{pre}{m}" for m, p in parts.items() if "lora_A.weight" not in p or "lora_B.weight" not in p]
    if unknown or incomplete:
        raise LoraFileError(f"{source}: unsupported LoRA keys {sorted(unknown)[:50]}"
                            + (f"; modules without both lora_A and lora_B: {incomplete}" if incomplete else "")
                            + " (supported: Flux transformer LoRA in diffusers/PEFT or kohya format)")
    meta = _peft_meta(file_meta, source)
    n_mag = sum(MAGNITUDE in p for p in parts.values())
    if (meta and meta.get("use_dora") and n_mag != len(parts)) or 0 < n_mag < len(parts):
        raise LoraFileError(f"{source}: DoRA LoRA (use_dora or {MAGNITUDE} keys) with a magnitude vector for "
                            f"{n_mag} of {len(parts)} modules; modules without one: "
                            f"{sorted(pre + m for m, p in parts.items() if MAGNITUDE not in p)[:20]}")
    out = {}
    for module, p in sorted(parts.items()):
        down, up = np.asarray(p["lora_A.weight"]), np.asarray(p["lora_B.weight"])
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraFileError(f"{source}: {pre}{module}: lora_A {list(down.shape)} / lora_B {list(up.shape)} are "
                                "not [r, in] / [out, r]")
        r = down.shape[0]
        if "alpha" in p:
            alpha = float(np.asarray(p["alpha"]).reshape(()))
        elif meta is not None:
            rank = _pattern_value(module, meta.get("rank_pattern") or {}, meta.get("r", r))
            alpha = _pattern_value(module, meta.get("alpha_pattern") or {}, meta.get("lora_alpha", rank))
            scale = float(alpha) / (np.sqrt(rank) if meta.get("use_rslora") else float(rank))
            alpha = scale * r  # peft's scale, whatever r the config names
        else:
            alpha = float(r)  # diffusers/PEFT convention without metadata: scale 1
        mag = p.get(MAGNITUDE)
        if mag is not None and np.asarray(mag).shape != (up.shape[0],):
            raise LoraFileError(f"{source}: {pre}{module}.{MAGNITUDE}: shape {list(np.asarray(mag).shape)} is not "
                                f"[out] = [{up.shape[0]}]")
        out[module] = Adapter(down, up, alpha, None if mag is None else np.asarray(mag))
    return out


# ----------------------------------------------------------------------------------------------------- files
def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    return "diffusers"


def read_adapters(path: str | Path, schema=None) -> tuple[dict[str, Adapter], dict]:
    """Read a LoRA file -> (``{module: Adapter}``, info ``{"format", "file_metadata"}``). ``schema``: the model's
    (name, schema or config) for kohya/BFL names; default: the file's ``ss_base_model_version`` (``flux2``), else
    FLUX.1."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            file_meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraFileError(f"{path}: not a readable safetensors file ({e})") from None
    if not tensors:
        raise LoraFileError(f"{path}: contains no tensors")
    fmt = detect_format(tensors)
    if fmt == "kohya" and all(k.startswith(PREFIX) for k in tensors):  # diffusers names, kohya down/up suffixes
        tensors = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in tensors.items()}
        fmt = "diffusers"
    if fmt == "kohya":
        if schema is None:
            schema = "flux2" if file_meta.get("ss_base_model_version") == "flux2" else "flux"
        adapters = from_kohya(tensors, path, schema)
    else:
        adapters = from_diffusers(tensors, file_meta, path)
    if not adapters:
        raise LoraFileError(f"{path}: no LoRA adapters found")
    return adapters, {"format": fmt, "file_metadata": file_meta}


def write_adapters(path: str | Path, adapters: Mapping[str, Adapter], format: str = "diffusers",
                   dtype: str = "fp32", extra_metadata: Mapping[str, str] | None = None, schema=None) -> Path:
    """Write ``adapters`` as ``format`` (diffusers | kohya) in ``dtype`` (fp32 | bf16 | fp16); temp file + rename.
    ``schema``: the model's, for kohya names (default: the first schema declaring every module)."""
    from safetensors.numpy import save_file

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if dtype not in SHORT:
        raise ValueError(f"dtype must be one of {sorted(SHORT)}, got {dtype!r}")
    if format == "kohya":
        tensors, meta = to_kohya(adapters, SHORT[dtype], schema)
    else:
        tensors, meta = to_diffusers(adapters, SHORT[dtype])
    meta = {**meta, **(extra_metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def check_finite(flat: Mapping[str, np.ndarray], source) -> None:
    """Refuse adapters holding NaN / inf (a diverged run): :class:`LoraFileError` naming ``source`` and the keys."""
    # deferred import: LoRA files are numpy only; the finiteness check of JAX trees needs JAX
    from dreamomni2_jax.utils.integrity import nonfinite_leaves

    bad = nonfinite_leaves(flat)
    if bad:
        raise LoraFileError(f"{source}: {len(bad)} adapter tensor(s) hold NaN or inf values ({', '.join(bad[:5])}"
                            f"{' ...' if len(bad) > 5 else ''}); the LoRA is unusable")


def save_lora_file(path: str | Path, flat: Mapping[str, np.ndarray], alpha: float, format: str = "diffusers",
                   dtype: str = "fp32", extra_metadata: Mapping[str, str] | None = None, schema=None) -> Path:
    """Export our flat LoRA state (:func:`lora_state` format; rank from shapes) to a safetensors file (refuses
    non-finite adapters)."""
    check_finite(flat, "LoRA to export")
    adapters = unstack({k: np.asarray(v, np.float32) for k, v in flat.items()}, alpha)
    info = {"rank": next(iter(adapters.values())).rank, "alpha": float(alpha),
            "variant": "dora" if is_dora(adapters) else "lora",
            "targets": sorted({k.rsplit(".", 1)[0] for k in flat})}
    extra = {OUR_METADATA_KEY: json.dumps(info), **(extra_metadata or {})}
    return write_adapters(path, adapters, format, dtype, extra, schema)


def load_lora_file(path: str | Path, layer_counts: Mapping[str, int] | None = None,
                   dtype=np.float32, schema=None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a diffusers/PEFT or kohya LoRA file -> (our flat state, metadata).

    metadata: ``{"rank", "alpha", "variant", "targets": [our module paths], "format", "source"}``. ``layer_counts``
    (``{"transformer_blocks": 19, ...}``) sets the stacked length (default: highest layer index in the file + 1);
    ``schema``: as for :func:`read_adapters`.
    """
    adapters, info = read_adapters(path, schema)
    flat, rank, alpha = stack(adapters, layer_counts, dtype)
    targets = sorted({k.rsplit(".", 1)[0] for k in flat})
    return flat, {"rank": rank, "alpha": alpha, "variant": "dora" if is_dora(adapters) else "lora",
                  "targets": targets, "format": info["format"], "source": str(path)}


__all__ = ["Adapter", "LoraError", "LoraFileError", "MAGNITUDE", "FORMATS", "is_dora", "unstack", "stack",
           "to_diffusers", "from_diffusers", "check_finite", "read_adapters", "write_adapters", "save_lora_file",
           "load_lora_file", "detect_format"]
