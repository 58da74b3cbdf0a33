"""LoRA adapters in their neutral in-memory form, and the LoRA error classes (numpy only, no torch, no jax).

Our training state (:func:`dreamomni2_jax.lora.layers.lora_state`) holds ``transformer_blocks.attn.to_q.lora_A``
``[L, in, r]`` / ``.lora_B`` ``[L, r, out]`` (stacked blocks keep the layer axis; DoRA adds
``.lora_magnitude_vector`` ``[L, out]``), ``delta = x @ A @ B * alpha / r``. The file layouts
(:mod:`dreamomni2_jax.lora.files`: diffusers/PEFT; :mod:`dreamomni2_jax.lora.kohya`: kohya/BFL) read and write the
neutral form ``{unstacked diffusers module path: Adapter(down [r, in], up [out, r], alpha[, magnitude [out]])}``;
:func:`unstack` / :func:`stack` convert between it and our state.

Errors: :class:`LoraError` (a LoRA does not fit: bad targets, adapter state, rank, variant) and its subclass
:class:`LoraFileError` (a LoRA file or exported state is unreadable, has unknown keys or does not fit the model);
``except LoraError`` catches both.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from dreamomni2_jax.models.schemas import stacked_groups

log = logging.getLogger(__name__)

STACKED = stacked_groups()
MAGNITUDE = "lora_magnitude_vector"  # = dreamomni2_jax.lora.dora.MAGNITUDE (peft's name)
STATE_SUFFIXES = (".lora_A", ".lora_B", f".{MAGNITUDE}")


class LoraError(ValueError):
    """A LoRA does not fit: bad targets, adapter state, rank or variant; the message names the path/key."""


class LoraFileError(LoraError):
    """A LoRA file (or a state to export) is unreadable, has unknown keys, or does not fit the model; the message
    names the file and the keys."""


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



def _split_stacked(path: str) -> tuple[str, str] | None:
    head, _, rest = path.partition(".")
    return (head, rest) if head in STACKED and rest else None


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


def alphas_close(a: float, b: float) -> bool:
    """Equal alphas up to float rounding (relative 1e-6)."""
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b))


def uniform_rank_alpha(adapters: Mapping[str, Adapter]) -> tuple[int, float]:
    """Common (rank, alpha) to store all adapters with: the shared one, else max rank and the most common scale."""
    first = next(iter(adapters.values()))
    if all(a.rank == first.rank and alphas_close(a.alpha, first.alpha) for a in adapters.values()):
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
    rank, alpha = uniform_rank_alpha(adapters)
    dora = is_dora(adapters)

    def fit(ad: Adapter) -> tuple[np.ndarray, np.ndarray]:
        a, b = ad.down.T.astype(np.float32), ad.up.T.astype(np.float32)  # [in, r], [r, out]
        if ad.rank != rank or not alphas_close(ad.alpha, alpha):
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


__all__ = ["LoraError", "LoraFileError", "Adapter", "MAGNITUDE", "STACKED", "is_dora", "unstack", "stack", "uniform_rank_alpha", "alphas_close"]
