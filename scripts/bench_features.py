"""Step-time overhead of the training features (masked loss, EMA, each optimizer) vs the plain AdamW step.

    python scripts/bench_features.py --config configs/demo.py [--model-size mid] [--steps 5] [--out f.json]

Every variant runs ``scripts/bench.py``'s ``bench_jax`` (same model size, synthetic batch and timing) in one
process, back to back; the baseline runs first and last, and each variant's ratio is its median step time over
the mean of the two baseline medians (on a shared CPU, absolute times drift; ratios measured back to back less).
"""
from __future__ import annotations

import argparse
import json
import runpy
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from dreamomni2_jax.config import apply_overrides, load_config

VARIANTS = {
    "masked loss": ["train.loss_mask=difference", "train.mask_floor=0.1"],
    "EMA": ["train.ema_decay=0.999"],
    "prodigy": ["optim.name=prodigy", "optim.lr=1.0"],
    "schedule_free_adamw": ["optim.name=schedule_free_adamw", "optim.schedule=constant", "optim.warmup_steps=0"],
    "muon": ["optim.name=muon"],
    "adafactor": ["optim.name=adafactor"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--model-size", choices=("tiny", "mid", "full"), default="mid")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bench = runpy.run_path(str(Path(__file__).with_name("bench.py")))
    cfg = load_config(args.config)
    if args.model_size == "mid":
        cfg = replace(cfg, data=replace(cfg.data, **bench["MID_DATA"]))
    fc = bench["flux_config"](args.model_size, cfg)
    batch = bench["make_batch"](cfg, fc)
    runs = [("baseline", [])] + list(VARIANTS.items()) + [("baseline", [])]
    med = {}
    for name, sets in runs:
        r = bench["bench_jax"](apply_overrides(cfg, sets), fc, batch, args.steps)
        med.setdefault(name, []).append(r["step_s_median"])
        print(f"{name}: step {r['step_s_median'] * 1e3:.1f} ms (compile {r['compile_s']:.1f}s)", flush=True)
    base = statistics.mean(med["baseline"])
    table = {name: {"step_s_median": statistics.mean(v), "ratio": statistics.mean(v) / base}
             for name, v in med.items()}
    print("| variant | step (ms) | vs AdamW |\n|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['step_s_median'] * 1e3:.0f} | {row['ratio']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model_size": args.model_size, "steps": args.steps,
                                              "baseline_runs_s": med["baseline"], "variants": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
