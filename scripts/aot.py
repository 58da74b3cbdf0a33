"""Will this config fit? Compile the real train step (or the sampler) for a TPU slice or an NVIDIA host, here.

    python scripts/aot.py --config configs/tpu_v5.py --topology v5p-8 [--set k=v ...] [--mode train|sample]
                          [--model kontext|klein-4b|klein-9b] [--refs N] [--layers DOUBLE SINGLE] [--fit]
                          [--json OUT]
    python scripts/aot.py --config configs/klein_tpu_v5.py --model klein-4b --topology v6e-8 --refs 2 --fit

No accelerator and no weights are needed: the model is abstract (shapes only) and the program is compiled for the
target's device descriptions (``libtpu`` for TPU: ``pip install -e '.[aot]'``; the CUDA plugin for h100/h200:
``pip install -e '.[cuda12]'``). Prints one JSON object (per-chip bytes from XLA's memory analysis, ``fits``,
the headroom, the attention kernel in the program, lower / compile seconds). ``--fit``: the largest per-chip batch
that fits for each remat policy at the config's resolution and references. ``--layers 2 4`` compiles a
full-width model with 2 double and 4 single blocks (quick checks). The transformer is ``model.path``'s (its
family read from the folder) or, with ``--model``, a published config without any checkpoint: ``kontext`` (FLUX.1
Kontext dev), ``klein-4b`` / ``klein-9b`` (FLUX.2 [klein]: its transformer class, 4-axis ids, no guidance; the
klein configs train the ``klein_wide`` LoRA preset). Exit code 0, or 2 for bad input.

Several hosts: ``v5p-64`` / ``v6e-64`` are slices of 8 / 16 hosts (the report's ``hosts``; the compile sees every
chip: ``program_devices``), ``h100x16`` (= ``2xh100x8``) two hosts of 8 GPUs. Several slices: ``2xv5p-8`` compiles
for two v5p-8 slices over the data-center network with ``mesh.dcn_data`` set to the slice count (data parallel
across slices; ``--set mesh.dcn_data=1`` for one flat mesh over both).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="Python config file defining get_config()")
    ap.add_argument("--topology", required=True, help="v5p-8, v5p-64, v5e-16, v6e-8, v6e-64, 2xv5p-8 (two slices), "
                    "h100x1, h100x8, h200x1, h200x8, h100x16 (two hosts of 8), ...")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    ap.add_argument("--mode", choices=("train", "sample"), default="train")
    ap.add_argument("--model", choices=("kontext", "klein-4b", "klein-9b"), default=None,
                    help="a published transformer config instead of model.path's")
    ap.add_argument("--refs", type=int, default=None, metavar="N",
                    help="N references of data.synthetic_resolution (instead of data.synthetic_refs)")
    ap.add_argument("--layers", nargs=2, type=int, metavar=("DOUBLE", "SINGLE"), default=None,
                    help="full-width model with this many double / single blocks")
    ap.add_argument("--fit", action="store_true", help="largest per-chip batch that fits, per remat policy")
    ap.add_argument("--max-batch", type=int, default=64, help="--fit: largest per-chip batch tried")
    ap.add_argument("--remat-policies", default=None, metavar="A,B",
                    help="--fit: policies to try (default: none,dots_no_batch_saveable,full)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dreamomni2_jax.tools.aot import AOTError, parse_target
    from dreamomni2_jax.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
        target = parse_target(args.topology)
        if args.refs is not None:
            if args.refs < 0:
                raise ConfigError(f"--refs must be >= 0, got {args.refs}")
            res = cfg.data.synthetic_resolution
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, synthetic_refs=(res,) * args.refs))
        if target.slices > 1 and not any(s.strip().startswith("mesh.dcn_data") for s in args.set):
            # several slices: data parallel across them (mesh.dcn_data), data / fsdp / tensor within each
            cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, dcn_data=target.slices))
    except (ConfigError, AOTError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The program is compiled for the target's device descriptions; this process itself only needs the host (and
    # the CUDA plugin must not look for a GPU to compile for one).
    os.environ["JAX_PLATFORMS"] = "cpu"
    if args.layers and min(args.layers) < 1:
        print("error: --layers needs at least one double and one single block", file=sys.stderr)
        return 2
    from dreamomni2_jax.tools import aot
    from dreamomni2_jax.sharding import MeshError

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.fit:
            out = aot.fit(cfg, target, layers=args.layers, max_batch_per_chip=args.max_batch, log=log,
                          model=args.model,
                          remats=args.remat_policies.split(",") if args.remat_policies else None)
        else:
            out = aot.compile_report(cfg, target, mode=args.mode, layers=args.layers, model=args.model)
    except (AOTError, MeshError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
