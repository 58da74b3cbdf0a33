"""LoRA files in the kohya/ComfyUI layout with BFL module names (numpy only, no torch, no jax).

``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up`` / ``.alpha``. BFL fuses q/k/v
(``img_attn.qkv``, ``txt_attn.qkv``) and q/k/v/mlp (single ``linear1``); their adapters are fused as ``lora_down`` =
stacked downs ``[sum r, in]`` and ``lora_up`` = block diagonal ``[sum out, sum r]`` (missing parts get zero blocks),
which diffusers' ``_convert_kohya_flux_lora_to_diffusers`` splits back exactly (its "sparse" path). The final-layer
modulation swaps halves (BFL shift/scale order). The kohya/BFL names, fused parts and swaps come from the model's
schema (``models/<model>_schema.py``): FLUX.1 (``ss_base_model_version`` ``flux1``) or FLUX.2 (``flux2``: single
blocks' ``linear1`` / ``linear2`` are already one Linear each in diffusers, ``to_qkv_mlp_proj`` / ``to_out``).
The kohya layout has no DoRA form here: exporting DoRA as kohya is refused. Files are read and written by
:mod:`dreamomni2_jax.lora.files`.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Mapping

import numpy as np

from dreamomni2_jax.lora.adapters import STACKED, Adapter, LoraFileError, is_dora, uniform_rank_alpha
from dreamomni2_jax.models.roles import ModelSchema, SchemaError
from dreamomni2_jax.models.schemas import schema_for, schema_of_modules


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
    rank, alpha = uniform_rank_alpha(adapters)
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


__all__ = ["kohya_table", "to_kohya", "from_kohya"]
