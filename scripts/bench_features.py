"""Step-time overhead of the training features (masked loss, EMA, each optimizer, DoRA) vs the plain AdamW LoRA step.

    python scripts/bench_features.py --config configs/demo.py [--model-size mid] [--steps 5] [--out f.json]

Every variant runs ``scripts/bench.py``'s ``bench_jax`` (same model size, synthetic batch and timing) in one
process, back to back, with a baseline run before the first variant and after every variant; each variant's ratio
is its median step time over the mean of the medians of the baselines just before and just after it (on a shared
CPU absolute times drift; a ratio against its neighbouring baselines drifts least). ``--only NAME`` (repeatable)
runs a subset of the variants.
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
    "DoRA": ["lora.variant=dora"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--model-size", choices=("tiny", "mid", "full"), default="mid")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", action="append", default=[], choices=list(VARIANTS), help="variant(s) to run")
    args = ap.parse_args(argv)
    bench = runpy.run_path(str(Path(__file__).with_name("bench.py")))
    cfg = load_config(args.config)
    if args.model_size == "mid":
        cfg = replace(cfg, data=replace(cfg.data, **bench["MID_DATA"]))
    fc = bench["flux_config"](args.model_size, cfg)
    batch = bench["make_batch"](cfg, fc)
    variants = [(n, s) for n, s in VARIANTS.items() if not args.only or n in args.only]

    def timed(name, sets) -> float:
        r = bench["bench_jax"](apply_overrides(cfg, sets), fc, batch, args.steps)
        print(f"{name}: step {r['step_s_median'] * 1e3:.1f} ms (compile {r['compile_s']:.1f}s)", flush=True)
        return r["step_s_median"]

    baselines = [timed("baseline", [])]
    table = {}
    for name, sets in variants:
        t = timed(name, sets)
        baselines.append(timed("baseline", []))
        base = statistics.mean(baselines[-2:])
        table[name] = {"step_s_median": t, "baseline_s": baselines[-2:], "ratio": t / base}
    print("| variant | step (ms) | baselines before / after (ms) | vs AdamW |\n|---|---|---|---|")
    for name, row in table.items():
        b0, b1 = row["baseline_s"]
        print(f"| {name} | {row['step_s_median'] * 1e3:.0f} | {b0 * 1e3:.0f} / {b1 * 1e3:.0f} | {row['ratio']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model_size": args.model_size, "steps": args.steps,
                                              "baseline_runs_s": baselines, "variants": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
