"""Print the token / position-id layout of a multi-reference sample and its RoPE tables.

    python scripts/layout.py --config configs/demo.py [--refs 3] [--scheme kontext]

Uses the config's target area, position scheme and the model's rope axes (from
``model.path``'s transformer config when present, else Flux's (16, 56, 56)).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dreamomni2_jax import positions as P
from dreamomni2_jax.config import ConfigError, load_config
from dreamomni2_jax.rope import FLUX_AXES_DIM, FLUX_THETA, rope_cos_sin


def _axes_dim(model_path: str) -> tuple[int, ...]:
    for cfg in (Path(model_path) / "transformer" / "config.json", Path(model_path) / "config.json"):
        if cfg.is_file():
            return tuple(json.loads(cfg.read_text()).get("axes_dims_rope", FLUX_AXES_DIM))
    return FLUX_AXES_DIM


def describe(target_px, refs_px, scheme: str, axes_dim, text_len: int) -> str:
    lat = lambda hw: (hw[0] // 8, hw[1] // 8)  # noqa: E731
    sample = P.SampleLayout(lat(target_px), tuple(lat(r) for r in refs_px))
    lines = [f"scheme={scheme}  rope axes_dim={tuple(axes_dim)}  theta={FLUX_THETA:g}",
             f"{'segment':<12}{'pixels':>12}{'latent':>10}{'tokens':>8}  {'domain':>6}  {'rows':>9}  {'cols':>11}"]
    segments = [("text", None, None, P.text_ids(text_len))]
    segments.append(("target", target_px, sample.target, P.target_ids(*sample.target)))
    ref_ids = P.reference_ids(sample.references, scheme)
    start = 0
    for i, (px, lt) in enumerate(zip(refs_px, sample.references)):
        n = P.num_tokens(*lt)
        segments.append((f"ref {i + 1}", px, lt, ref_ids[start : start + n]))
        start += n
    for name, px, lt, ids in segments:
        px_s = f"{px[0]}x{px[1]}" if px else "-"
        lt_s = f"{lt[0]}x{lt[1]}" if lt else "-"
        lines.append(f"{name:<12}{px_s:>12}{lt_s:>10}{len(ids):>8}  {int(ids[0, 0]):>6}  "
                     f"{int(ids[:, 1].min()):>4}-{int(ids[:, 1].max()):<4}  {int(ids[:, 2].min()):>5}-{int(ids[:, 2].max()):<5}")
    all_ids = np.concatenate([s[3] for s in segments])
    cos, sin = rope_cos_sin(all_ids, axes_dim, FLUX_THETA)
    lines.append(f"total tokens {len(all_ids)} (text {text_len} + image {len(all_ids) - text_len}); ids int32 {all_ids.shape}")
    lines.append(f"rope cos {tuple(cos.shape)} {cos.dtype} range [{float(cos.min()):.4f}, {float(cos.max()):.4f}]; "
                 f"sin {tuple(sin.shape)} range [{float(sin.min()):.4f}, {float(sin.max()):.4f}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--refs", type=int, default=3, help="number of references to lay out")
    ap.add_argument("--scheme", default=None, help="override model.position_scheme")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    side = int(cfg.data.target_max_area ** 0.5) // 16 * 16
    refs = [(side, side), (side, side * 3 // 4 // 16 * 16), (side * 3 // 4 // 16 * 16, side)][: args.refs]
    refs += [(side, side)] * (args.refs - len(refs))
    print(describe((side, side), refs, args.scheme or cfg.model.position_scheme, _axes_dim(cfg.model.path),
                   cfg.data.max_sequence_length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
