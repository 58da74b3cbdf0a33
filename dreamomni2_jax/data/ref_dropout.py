"""Reference dropout (``data.reference_dropout``): robustness to a varying number of references.

Per sample, each reference after the first is dropped with probability ``p``. The draw depends only on
``(data.shuffle_seed, global sample index)`` (global sample index = ``step * data.batch_size + row``), so a
resumed run and any ``grad_accum`` split see the same drops. The kept references are renumbered (domains and
column offsets recomputed by :func:`positions.batch_layout`), exactly like a record that had fewer references; the
dropped tokens become padding (mask False), and the batch keeps the reference length it had without dropout, so
shapes (and compiled steps) do not change.
"""
from __future__ import annotations

import numpy as np

_SALT = 0x52454644  # "REFD": a stream of its own


def kept(n_refs: int, p: float, seed: int, global_index: int) -> list[int]:
    """Indices of the references sample ``global_index`` keeps (reference 0 always)."""
    if n_refs <= 1 or p <= 0:
        return list(range(n_refs))
    u = np.random.default_rng([seed, _SALT, int(global_index)]).random(n_refs - 1)
    return [0] + [j + 1 for j in range(n_refs - 1) if u[j] >= p]


def apply(sample: dict, p: float, seed: int, global_index: int) -> dict:
    """``sample`` (``target``, ``ref0``.. arrays, ...) with the dropped references removed and the rest renumbered."""
    n = sum(k.startswith("ref") and k[3:].isdigit() for k in sample)
    keep = kept(n, p, seed, global_index)
    if len(keep) == n:
        return sample
    out = {k: v for k, v in sample.items() if not (k.startswith("ref") and k[3:].isdigit())}
    out.update({f"ref{i}": sample[f"ref{j}"] for i, j in enumerate(keep)})
    return out
