"""Print the token / position-id layout of a multi-reference sample and its RoPE tables.

    python scripts/layout.py --config configs/demo.py [--refs 3] [--scheme kontext|flux2]

Uses the config's target area, position scheme and the model's rope axes and theta (from ``model.path``'s
transformer config when present, else Flux's (16, 56, 56), θ 10000). A FLUX.2 [klein] ``model.path`` (or
``--scheme flux2``) shows the 4-axis ids ``(T, H, W, L)`` of ``Flux2KleinPipeline`` (axes (32, 32, 32, 32), θ 2000).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dreamomni2_jax import families
from dreamomni2_jax.layout import ids_flux1 as P, ids_klein as P2
from dreamomni2_jax.config import ConfigError, load_config
from dreamomni2_jax.models.rope import FLUX_AXES_DIM, FLUX_THETA, rope_cos_sin

FLUX2_AXES_DIM, FLUX2_THETA = (32, 32, 32, 32), 2000.0  # diffusers Flux2Transformer2DModel defaults


def _rope(model_path: str, scheme: str) -> tuple[tuple[int, ...], float]:
    """(axes_dim, theta) from the model's transformer config, else the scheme's model defaults."""
    axes, theta = (FLUX2_AXES_DIM, FLUX2_THETA) if scheme == P.FLUX2 else (FLUX_AXES_DIM, FLUX_THETA)
    for cfg in (Path(model_path) / "transformer" / "config.json", Path(model_path) / "config.json"):
        if cfg.is_file():
            d = json.loads(cfg.read_text())
            return tuple(d.get("axes_dims_rope", axes)), float(d.get("rope_theta", theta))
    return axes, theta


def segments(target_px, refs_px, scheme: str, text_len: int) -> list[tuple]:
    """``[(name, pixels, latent size, ids)]`` for text, target and each reference, in the model's token order."""
    lat = lambda hw: (hw[0] // 8, hw[1] // 8)  # noqa: E731
    sample = P.SampleLayout(lat(target_px), tuple(lat(r) for r in refs_px))
    ids = P2 if scheme == P.FLUX2 else P
    out = [("text", None, None, ids.text_ids(text_len)), ("target", target_px, sample.target,
                                                           ids.target_ids(*sample.target))]
    if scheme == P.FLUX2:
        ref_ids = P2.reference_ids(sample.references)
    else:
        ref_ids = P.reference_ids(sample.references, scheme)
    start = 0
    for i, (px, lt) in enumerate(zip(refs_px, sample.references)):
        n = P.num_tokens(*lt)
        out.append((f"ref {i + 1}", px, lt, ref_ids[start : start + n]))
        start += n
    return out


def describe(target_px, refs_px, scheme: str, axes_dim, text_len: int, theta: float = FLUX_THETA) -> str:
    flux2 = scheme == P.FLUX2
    lines = [f"scheme={scheme}  rope axes_dim={tuple(axes_dim)}  theta={theta:g}"
             + ("  ids (T, H, W, L)" if flux2 else "  ids (domain, row, col)"),
             f"{'segment':<12}{'pixels':>12}{'latent':>10}{'tokens':>8}  {'T' if flux2 else 'domain':>6}  "
             f"{'rows':>9}  {'cols':>11}" + (f"  {'L':>9}" if flux2 else "")]
    parts = segments(target_px, refs_px, scheme, text_len)
    for name, px, lt, ids in parts:
        px_s = f"{px[0]}x{px[1]}" if px else "-"
        lt_s = f"{lt[0]}x{lt[1]}" if lt else "-"
        lines.append(f"{name:<12}{px_s:>12}{lt_s:>10}{len(ids):>8}  {int(ids[0, 0]):>6}  "
                     f"{int(ids[:, 1].min()):>4}-{int(ids[:, 1].max()):<4}  "
                     f"{int(ids[:, 2].min()):>5}-{int(ids[:, 2].max()):<5}"
                     + (f"  {int(ids[:, 3].min()):>4}-{int(ids[:, 3].max()):<4}" if flux2 else ""))
    all_ids = np.concatenate([s[3] for s in parts])
    cos, sin = rope_cos_sin(all_ids, axes_dim, theta)
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
        cfg = families.resolve_config(load_config(args.config, args.set))  # a klein model.path -> flux2 ids
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    side = int(cfg.data.target_max_area ** 0.5) // 16 * 16
    refs = [(side, side), (side, side * 3 // 4 // 16 * 16), (side * 3 // 4 // 16 * 16, side)][: args.refs]
    refs += [(side, side)] * (args.refs - len(refs))
    scheme = args.scheme or cfg.model.position_scheme
    if scheme not in P.schemes():
        print(f"--scheme {scheme!r}: unknown; known: {sorted(P.schemes())}", file=sys.stderr)
        return 2
    axes_dim, theta = _rope(cfg.model.path, scheme)
    if len(axes_dim) != (4 if scheme == P.FLUX2 else 3):
        print(f"--scheme {scheme}: the model at {cfg.model.path} has {len(axes_dim)} rope axes {axes_dim} "
              f"(FLUX.2 uses the 4-axis scheme {P.FLUX2!r}, FLUX.1 the 3-axis ones)", file=sys.stderr)
        return 2
    print(describe((side, side), refs, scheme, axes_dim, cfg.data.max_sequence_length, theta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
