"""LoRA files: export/import in diffusers/PEFT and kohya/ComfyUI safetensors (numpy only, no torch, no jax).
Attaching adapters to a model is :mod:`dreamomni2_jax.attach`.

Three layouts of the same adapters:

* ours (:func:`dreamomni2_jax.lora.lora_state`): ``transformer_blocks.attn.to_q.lora_A`` ``[L, in, r]`` /
  ``.lora_B`` ``[L, r, out]`` (stacked blocks keep the layer axis), ``delta = x @ A @ B * alpha / r``;
* diffusers/PEFT: ``transformer.transformer_blocks.3.attn.to_q.lora_A.weight`` ``[r, in]`` / ``lora_B.weight``
  ``[out, r]`` plus ``__metadata__["lora_adapter_metadata"]`` = JSON ``{"transformer.r", "transformer.lora_alpha",
  "transformer.target_modules", ...}`` (what diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads
  into ``peft.LoraConfig``, so alpha != rank loads correctly);
* kohya/ComfyUI (BFL module names): ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up`` /
  ``.alpha``. BFL fuses q/k/v (``img_attn.qkv``, ``txt_attn.qkv``) and q/k/v/mlp (single ``linear1``); their
  adapters are fused as ``lora_down`` = stacked downs ``[sum r, in]`` and ``lora_up`` = block diagonal
  ``[sum out, sum r]`` (missing parts get zero blocks), which diffusers' ``_convert_kohya_flux_lora_to_diffusers``
  splits back exactly (its "sparse" path). The final-layer modulation swaps halves (BFL shift/scale order).
  The kohya/BFL names, fused parts and swaps come from the model's schema (``models/<model>_schema.py``): FLUX.1
  (``ss_base_model_version`` ``flux1``) or FLUX.2 (``flux2``: single blocks' ``linear1`` / ``linear2`` are already
  one Linear each in diffusers, ``to_qkv_mlp_proj`` / ``to_out``).

The neutral in-memory form is ``{unstacked diffusers module path: Adapter(down [r, in], up [out, r], alpha)}``.

DoRA adapters (``lora.variant = "dora"``) also carry peft's magnitude vector (``Adapter.magnitude`` ``[out]``; ours:
``.lora_magnitude_vector`` ``[L, out]``), written as ``transformer.<module>.lora_magnitude_vector`` with
``use_dora: true`` in the adapter metadata (what peft's ``get_peft_model_state_dict`` and diffusers'
``save_lora_weights`` write). The kohya layout has no DoRA form here: exporting DoRA as kohya is refused.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from dreamomni2_jax.models.roles import ModelSchema, SchemaError
from dreamomni2_jax.models.schemas import schema_for, schema_of_modules, stacked_groups

log = logging.getLogger(__name__)

STACKED = stacked_groups()
DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
FORMATS = ("diffusers", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
OUR_METADATA_KEY = "dreamomni2_lora"
PREFIX = "transformer."

class LoraFileError(ValueError):
    """A LoRA file is unreadable, has unknown keys, or does not fit the model; the message names them."""


@dataclass
class Adapter:
    """One Linear's adapter in torch layout: ``delta_W [out, in] = alpha / rank * up @ down``."""

    down: np.ndarray  # [r, in]   (diffusers lora_A.weight, kohya lora_down.weight)
    up: np.ndarray  # [out, r]    (diffusers lora_B.weight, kohya lora_up.weight)
    alpha: float
    magnitude: Optional[np.ndarray] = None  # [out]: DoRA's magnitude vector (peft lora_magnitude_vector), else None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self) -> np.ndarray:
        return self.scale * (self.up.astype(np.float64) @ self.down.astype(np.float64))


# ---------------------------------------------------------------------------------------- ours <-> adapters
def _split_stacked(path: str) -> tuple[str, str] | None:
    head, _, rest = path.partition(".")
    return (head, rest) if head in STACKED and rest else None


MAGNITUDE = "lora_magnitude_vector"  # = dreamomni2_jax.dora.MAGNITUDE (peft's name)
STATE_SUFFIXES = (".lora_A", ".lora_B", f".{MAGNITUDE}")


def is_dora(adapters: Mapping[str, Adapter]) -> bool:
    """True when the adapters are DoRA (all carry a magnitude); mixing DoRA and plain adapters is refused."""
    with_m = sorted(p for p, a in adapters.items() if a.magnitude is not None)
    if with_m and len(with_m) != len(adapters):
        raise LoraFileError(f"DoRA magnitude vectors for {len(with_m)} of {len(adapters)} modules only; without "
                            f"one: {sorted(set(adapters) - set(with_m))[:20]}")
    return bool(with_m)


def unstack(flat: Mapping[str, np.ndarray], alpha: float) -> dict[str, Adapter]:
    """Our flat state (:func:`lora_state` format) -> ``{diffusers module path: Adapter}`` (one per layer)."""
    modules = sorted({k.rsplit(".", 1)[0] for k in flat})
    bad = [k for k in flat if not k.endswith(STATE_SUFFIXES)]
    missing = [f"{m}.{s}" for m in modules for s in ("lora_A", "lora_B") if f"{m}.{s}" not in flat]
    if bad or missing:
        raise LoraFileError(f"LoRA state: keys not ending in .lora_A/.lora_B/.{MAGNITUDE} {bad}; missing {missing}")
    out = {}
    for m in modules:
        a, b = np.asarray(flat[f"{m}.lora_A"]), np.asarray(flat[f"{m}.lora_B"])
        mag = np.asarray(flat[f"{m}.{MAGNITUDE}"]) if f"{m}.{MAGNITUDE}" in flat else None
        if _split_stacked(m):
            head, rest = _split_stacked(m)
            for i in range(a.shape[0]):
                out[f"{head}.{i}.{rest}"] = Adapter(a[i].T, b[i].T, float(alpha), None if mag is None else mag[i])
        else:
            out[m] = Adapter(a.T, b.T, float(alpha), mag)
    is_dora(out)
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b))


def _uniform(adapters: Mapping[str, Adapter]) -> tuple[int, float]:
    """Common (rank, alpha) to store all adapters with: the shared one, else max rank and the most common scale."""
    first = next(iter(adapters.values()))
    if all(a.rank == first.rank and _close(a.alpha, first.alpha) for a in adapters.values()):
        return first.rank, float(first.alpha)
    pairs = Counter((a.rank, float(a.alpha)) for a in adapters.values())
    rank = max(a.rank for a in adapters.values())
    scale = Counter(a.scale for a in adapters.values()).most_common(1)[0][0]
    log.info("LoRA has mixed rank/alpha %s: storing as rank %d, alpha %g (zero-padded, scales folded into B)",
             sorted(pairs), rank, scale * rank)
    return rank, scale * rank


def stack(adapters: Mapping[str, Adapter], layer_counts: Mapping[str, int] | None = None,
          dtype=np.float32) -> tuple[dict[str, np.ndarray], int, float]:
    """``{module: Adapter}`` -> (our flat state, rank, alpha). Per-layer adapters are stacked along a leading axis
    of ``layer_counts[block]`` (default: highest index + 1); layers without an adapter get zeros (no effect).
    Mixed ranks/alphas are zero-padded to the largest rank with each scale folded into ``lora_B`` (exact).
    DoRA magnitudes are stacked the same way; a DoRA module adapted in only some of its layers is refused (the
    magnitude of an unadapted layer is its base weight's norm, which a LoRA file does not hold)."""
    rank, alpha = _uniform(adapters)
    dora = is_dora(adapters)

    def fit(ad: Adapter) -> tuple[np.ndarray, np.ndarray]:
        a, b = ad.down.T.astype(np.float32), ad.up.T.astype(np.float32)  # [in, r], [r, out]
        if ad.rank != rank or not _close(ad.alpha, alpha):
            a = np.pad(a, ((0, 0), (0, rank - ad.rank)))
            b = np.pad(b * np.float32(ad.scale / (alpha / rank)), ((0, rank - ad.rank), (0, 0)))
        return a.astype(dtype), b.astype(dtype)

    flat, groups = {}, {}
    for path, ad in adapters.items():
        m = re.fullmatch(rf"({'|'.join(STACKED)})\.(\d+)\.(.+)", path)
        if m:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = ad
        else:
            flat[f"{path}.lora_A"], flat[f"{path}.lora_B"] = fit(ad)
            if dora:
                flat[f"{path}.{MAGNITUDE}"] = np.asarray(ad.magnitude, np.float32).astype(dtype)
    for name, layers in sorted(groups.items()):
        head = name.partition(".")[0]
        n = (layer_counts or {}).get(head, max(layers) + 1)
        if max(layers) >= n:
            raise LoraFileError(f"LoRA has {name.replace('.', f'.{max(layers)}.', 1)} but the model has only {n} "
                                f"{head}")
        ref = next(iter(layers.values()))
        shape_a, shape_b = (ref.down.shape[1], rank), (rank, ref.up.shape[0])
        a = np.zeros((n, *shape_a), dtype)
        b = np.zeros((n, *shape_b), dtype)
        for i, ad in layers.items():
            if (ad.down.shape[1], ad.up.shape[0]) != (shape_a[0], shape_b[1]):
                raise LoraFileError(f"{head}.{i}.{name.partition('.')[2]}: in/out {ad.down.shape[1]}/"
                                    f"{ad.up.shape[0]} differ from other layers' {shape_a[0]}/{shape_b[1]}")
            a[i], b[i] = fit(ad)
        if dora:
            if len(layers) < n:
                raise LoraFileError(f"DoRA LoRA has {name} for layers {sorted(layers)} of {n} only; DoRA adapters "
                                    "must cover every layer of a stacked module")
            flat[f"{name}.{MAGNITUDE}"] = np.stack([np.asarray(layers[i].magnitude, np.float32)
                                                    for i in range(n)]).astype(dtype)
        elif len(layers) < n:
            log.warning("LoRA file has %s for layers %s only; the other of %d layers get a zero adapter",
                        name, sorted(layers), n)
        flat[f"{name}.lora_A"], flat[f"{name}.lora_B"] = a, b
    return flat, rank, alpha


# ------------------------------------------------------------------------------------------------ diffusers
def to_diffusers(adapters: Mapping[str, Adapter], dtype=np.float32) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> (tensors, safetensors metadata) in diffusers ``save_lora_weights`` layout (uniform rank/alpha)."""
    rank, alpha = _uniform(adapters)
    if any(a.rank != rank or not _close(a.alpha, alpha) for a in adapters.values()):
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


# ---------------------------------------------------------------------------------------------------- kohya
def kohya_table(schema: ModelSchema) -> list[tuple[str, str | None, tuple[str, ...], tuple[int, ...], bool]]:
    """``[(kohya name template, stacked block or None, module paths, output ratios, swapped)]`` of a model schema;
    ``{i}`` = layer index, module paths relative to the block (fused BFL modules list their parts in order)."""
    return [("lora_unet_" + template.replace(".", "_"), group, tuple(p.path for p in parts),
             tuple(p.ratio for p in parts), parts[0].swapped) for template, group, parts in schema.bfl_fused()]


def _schema_of(adapters: Mapping[str, "Adapter"], schema) -> ModelSchema:
    try:
        return schema_for(schema) if schema is not None else schema_of_modules(adapters)
    except SchemaError as e:
        raise LoraFileError(f"no kohya/BFL layout for these modules: {e}") from None


def to_kohya(adapters: Mapping[str, Adapter], dtype=np.float32, schema=None
             ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> (tensors, metadata) with ``lora_unet_<bfl name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
    ``schema``: the model's (name, schema or config); default: the first schema declaring every module."""
    if is_dora(adapters):
        raise LoraFileError("kohya/ComfyUI export of DoRA adapters (lora.variant=dora) is not supported; export "
                            "--format diffusers (peft's lora_magnitude_vector keys)")
    schema = _schema_of(adapters, schema)
    remaining = dict(adapters)
    tensors: dict[str, np.ndarray] = {}
    layer_ids = {b: sorted({int(p.split(".")[1]) for p in adapters if p.startswith(b + ".")}) for b in STACKED}
    for name_t, block, mods, ratios, swapped in kohya_table(schema):
        for i in (layer_ids[block] if block else [None]):
            paths = [f"{block}.{i}.{m}" if block else m for m in mods]
            present = [p for p in paths if p in remaining]
            if not present:
                continue
            parts = [remaining.pop(p, None) for p in paths]
            name = name_t.format(i=i)
            down, up, alpha = _fuse(parts, ratios, name)
            if swapped:
                up = np.concatenate(np.split(up, 2, axis=0)[::-1], axis=0)
            tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(down.astype(dtype))
            tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(up.astype(dtype))
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    if remaining:
        raise LoraFileError(f"modules with no kohya/BFL equivalent: {sorted(remaining)}")
    rank, alpha = _uniform(adapters)
    return tensors, {"format": "pt", "ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank),
                     "ss_network_alpha": str(alpha), "ss_base_model_version": schema.kohya_version}


def _fuse(parts: list[Adapter | None], ratios: tuple[int, ...], name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Fuse per-part adapters into one (down stacked, up block diagonal); missing parts become zero blocks."""
    present = [p for p in parts if p is not None]
    if len(parts) == 1:
        return present[0].down, present[0].up, float(present[0].alpha)
    ref_i = next(k for k, p in enumerate(parts) if p is not None)
    unit = parts[ref_i].up.shape[0] // ratios[ref_i]
    rank = Counter(p.rank for p in present).most_common(1)[0][0]
    scale = Counter(p.scale for p in present).most_common(1)[0][0]
    d_in = present[0].down.shape[1]
    downs, ups = [], []
    for p, ratio in zip(parts, ratios):
        if p is None:
            p = Adapter(np.zeros((rank, d_in), np.float32), np.zeros((ratio * unit, rank), np.float32), scale * rank)
        if p.up.shape[0] != ratio * unit or p.down.shape[1] != d_in:
            raise LoraFileError(f"{name}: part shapes down {list(p.down.shape)} up {list(p.up.shape)} do not fit the "
                                f"fused layout (in {d_in}, outputs {[r * unit for r in ratios]})")
        downs.append(p.down)
        ups.append(p.up * np.asarray(p.scale / scale, p.up.dtype) if p.scale != scale else p.up)
    total = sum(d.shape[0] for d in downs)
    down = np.concatenate(downs, axis=0)
    up = np.zeros((sum(u.shape[0] for u in ups), total), np.result_type(*ups))
    r0 = c0 = 0
    for u in ups:
        up[r0:r0 + u.shape[0], c0:c0 + u.shape[1]] = u
        r0, c0 = r0 + u.shape[0], c0 + u.shape[1]
    return down, up, scale * total


def _kohya_base(key: str) -> tuple[str, str] | None:
    """Normalize sd-scripts / ComfyUI key spellings -> (``lora_unet_...`` base name, suffix)."""
    m = re.fullmatch(r"(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
    if not m:
        return None
    base = m.group(1)
    for p in ("diffusion_model.", "model.diffusion_model."):
        if base.startswith(p):
            base = "lora_unet_" + base[len(p):]
    return base.replace(".", "_"), m.group(2)


def from_kohya(tensors: Mapping[str, np.ndarray], source, schema="flux") -> dict[str, Adapter]:
    """Inverse of :func:`to_kohya` for the model ``schema`` (FLUX.1 and FLUX.2 kohya names overlap), splitting
    fused modules like diffusers' converter (exact for block-diagonal ``lora_up``; otherwise every part gets the
    full ``lora_down`` and its rows of ``lora_up``)."""
    schema = schema_for(schema)
    groups: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for k, v in tensors.items():
        parsed = _kohya_base(k)
        if parsed is None:
            unknown.append(k)
        else:
            groups.setdefault(parsed[0], {})[parsed[1]] = v
    table = {}
    for name_t, block, mods, ratios, swapped in kohya_table(schema):
        table[re.escape(name_t).replace(r"\{i\}", r"(\d+)")] = (block, mods, ratios, swapped)
    out: dict[str, Adapter] = {}
    for base, g in sorted(groups.items()):
        hit = next(((m, spec) for pat, spec in table.items() if (m := re.fullmatch(pat, base))), None)
        if hit is None or "lora_down.weight" not in g or "lora_up.weight" not in g:
            unknown += [f"{base}.{s}" for s in g]
            continue
        m, (block, mods, ratios, swapped) = hit
        paths = [f"{block}.{m.group(1)}.{x}" if block else x for x in mods]
        down, up = np.asarray(g["lora_down.weight"]), np.asarray(g["lora_up.weight"])
        r = down.shape[0]
        alpha = float(np.asarray(g["alpha"]).reshape(())) if "alpha" in g else float(r)
        if swapped:
            up = np.concatenate(np.split(up, 2, axis=0)[::-1], axis=0)
        out.update(_unfuse(paths, ratios, down, up, alpha, f"{source}: {base}"))
    if unknown:
        raise LoraFileError(f"{source}: unsupported LoRA keys {sorted(unknown)[:50]} (supported: {schema.name} "
                            "transformer LoRA in diffusers/PEFT or kohya format; text-encoder LoRAs are not supported)")
    return out


def _unfuse(paths, ratios, down, up, alpha, where) -> dict[str, Adapter]:
    if len(paths) == 1:
        return {paths[0]: Adapter(down, up, alpha)}
    n, rank = len(paths), down.shape[0]
    if up.shape[0] % sum(ratios) or up.shape[1] != rank:
        raise LoraFileError(f"{where}: lora_up {list(up.shape)} does not split into {paths} (ratios {ratios})")
    unit = up.shape[0] // sum(ratios)
    rows = np.cumsum([0] + [r * unit for r in ratios])
    sub = rank // n
    sparse = rank % n == 0 and all(
        not np.any(up[rows[j]:rows[j + 1], k * sub:(k + 1) * sub]) for j in range(n) for k in range(n) if j != k)
    out = {}
    for j, path in enumerate(paths):
        u = up[rows[j]:rows[j + 1]]
        if sparse:
            d, u = down[j * sub:(j + 1) * sub], u[:, j * sub:(j + 1) * sub]
            if not np.any(d) and not np.any(u):
                continue  # zero block written for a part without an adapter
            out[path] = Adapter(d, u, alpha * sub / rank)
        else:
            out[path] = Adapter(down, u, alpha)
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
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if format == "kohya":
        tensors, meta = to_kohya(adapters, DTYPES[dtype], schema)
    else:
        tensors, meta = to_diffusers(adapters, DTYPES[dtype])
    meta = {**meta, **(extra_metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_finite(flat: Mapping[str, np.ndarray], source) -> None:
    """Refuse adapters holding NaN / inf (a diverged run): :class:`LoraFileError` naming ``source`` and the keys."""
    from dreamomni2_jax.integrity import nonfinite_leaves

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


__all__ = ["Adapter", "LoraFileError", "MAGNITUDE", "is_dora", "unstack", "stack", "to_diffusers", "from_diffusers", "to_kohya",
           "from_kohya", "kohya_table", "check_finite", "read_adapters", "write_adapters", "save_lora_file",
           "load_lora_file", "detect_format"]
