"""One model component: checkpoint -> converted folder (CLI and Python), and loading either into NNX.

Every converter (``convert/flux_transformer.py``, ``vae.py``, ``clip.py``, ``t5.py``) supplies a
``build_plan(src, [config=...,] param_dtype=...) -> (Plan, config)``; this module does the rest the
same way for all of them: dtype names, the metadata written next to the params, the command line, and
``load_component`` (restore a converted folder, or convert a source on the fly, into an abstract
already-sharded template).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from convert.safetensors_io import open_checkpoint
from convert.table import (
    PARAMS_DIR, ConversionError, TargetSpec, is_converted, load_params_from_items, restore_params, write_checkpoint,
)

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}
SOURCE = "source"  # keep the source checkpoint's dtype (the default: a converter is lossless unless asked)
DTYPE_CHOICES = (SOURCE, *sorted(DTYPES))


def source_dtype(reader) -> str:
    """The name in :data:`DTYPES` that holds every float tensor of ``reader`` losslessly (mixed -> fp32)."""
    found = set()
    for k in reader.keys():
        dt = np.dtype(reader.dtype(k))
        if dt == np.dtype(ml_dtypes.bfloat16):
            found.add("bf16")
        elif dt == np.float16:
            found.add("fp16")
        elif dt.kind == "f":
            found.add("fp32")
    return found.pop() if len(found) == 1 else "fp32"


def check_disjoint(src: str | Path, out: str | Path) -> None:
    """Refuse an output that is the source, inside it, or contains it (an overwrite would destroy the source)."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if s == o or s in o.parents or o in s.parents:
        rel = "is" if s == o else ("is inside" if s in o.parents else "contains")
        raise FileExistsError(f"--out {out} {rel} --src {src}: choose an output folder outside the source")


def read_transformers_config(folder: Path, config_cls, architectures, what: str):
    """``config_cls`` from ``folder/config.json``, refusing a transformers ``architectures`` not in the list."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: {what} config missing")
    from dreamomni2_jax.config import read_json

    d = read_json(cfg_path)
    arch = d.get("architectures") or []
    if arch and not any(a in architectures for a in arch):
        raise ValueError(f"{cfg_path}: architectures={arch}, expected one of {list(architectures)}")
    return config_cls.from_dict(d, source=str(cfg_path))


def convert_component(build_plan: Callable, src: str | Path, out: str | Path, dtype: str, *, overwrite: bool = False,
                      progress: bool = True, **plan_kwargs) -> Path:
    """Stream ``src`` through ``build_plan``'s plan into the folder ``out`` (temp folder + rename)."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
    check_disjoint(src, out)
    if Path(out).exists() and not overwrite:  # before reading anything
        raise FileExistsError(f"{out} exists (pass --overwrite to replace a previous output of this converter)")
    if dtype == SOURCE:
        dtype = source_dtype(open_checkpoint(src))
    plan, cfg = build_plan(src, param_dtype=DTYPES[dtype], **plan_kwargs)
    meta = {**cfg.to_dict(), "_converted_from": str(Path(src).absolute()), "_dtype": dtype,
            "_converter": build_plan.__module__}
    return write_checkpoint(out, plan.items(progress=progress), meta, overwrite=overwrite)


def component_main(convert: Callable, *, description: str, src_help: str, default_dtype: str,
                   config_help: str | None = None, argv: list[str] | None = None,
                   before: Callable[[], None] | None = None) -> int:
    """The shared CLI: ``--src --out [--dtype] [--config] [--overwrite] [--no-progress]``; prints ``{"out": ...}``.

    ``convert(src, out, dtype, [config,] overwrite=, progress=)``; ``config_help`` adds ``--config``.
    """
    from dreamomni2_jax import cli

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--src", required=True, help=src_help)
    ap.add_argument("--out", required=True, help="output folder; must not exist, be the source or be inside it")
    ap.add_argument("--dtype", default=default_dtype, choices=DTYPE_CHOICES,
                    help="parameter dtype written; 'source' keeps the checkpoint's own (lossless)")
    if config_help:
        ap.add_argument("--config", default=None, help=config_help)
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is a previous output of this converter (nothing else is ever deleted)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if before:
        before()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    extra = {"config": args.config} if config_help else {}

    def run(_argv) -> int:
        out = convert(args.src, args.out, args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                      **extra)
        print(json.dumps({"out": str(out)}))
        return 0

    return cli.run(run, None, extra=(ValueError,))


def converted_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{param path: shape}`` saved in a ``write_checkpoint`` folder (from Orbax metadata; no data read).
    Raises ``ConversionError`` naming the folder when the metadata is missing or unreadable."""
    import orbax.checkpoint.experimental.v1 as ocp

    params = Path(path).absolute() / PARAMS_DIR
    try:
        tree = ocp.pytree_metadata(params).metadata
    except Exception as e:  # noqa: BLE001 - any failure means the folder is damaged
        raise ConversionError(f"{params}: unreadable Orbax metadata ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:300]})") from None
    out: dict[str, tuple[int, ...]] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = tuple(getattr(node, "shape", ()))

    walk(tree, "")
    return out


def verify_converted(path: str | Path, spec: TargetSpec) -> None:
    """A converted folder holds exactly the params of ``spec`` with their shapes, else ``ConversionError``."""
    path = Path(path)
    if not (path / PARAMS_DIR / "commit_success.txt").is_file():
        raise ConversionError(f"{path / PARAMS_DIR}: incomplete save (no commit_success.txt)")
    saved = converted_shapes(path)
    problems = [f"missing {k}" for k in sorted(set(spec) - set(saved))]
    problems += [f"unexpected {k}" for k in sorted(set(saved) - set(spec))]
    problems += [f"{k}: shape {list(saved[k])}, expected {list(spec[k][0])}" for k in sorted(set(spec) & set(saved))
                 if tuple(saved[k]) != tuple(spec[k][0])]
    if problems:
        raise ConversionError(f"{path}: damaged converted component ({len(problems)} problem(s)): "
                              + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


def load_component(path: str | Path, *, config_cls, build_plan: Callable, make_model: Callable,
                   param_dtype, stacked: Callable = lambda cfg: {}, param_sharding=None, config=None):
    """Restore a converted folder (``config.json`` + Orbax ``params/``) or convert a source in memory.

    ``make_model(cfg)`` builds the module (called under ``nnx.eval_shape``); ``stacked(cfg)`` gives the
    leading-axis length of each scanned module; ``param_sharding(path, shape)`` places each param.
    """
    from flax import nnx

    path = Path(path)
    if is_converted(path):
        cfg = config or config_cls.from_json(path / "config.json")
        items = None
    else:
        kwargs = {"config": config} if config is not None else {}
        plan, cfg = build_plan(path, param_dtype=param_dtype, **kwargs)
        items = plan.items(progress=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make_model(cfg)))
    if items is None:
        state = restore_params(path, state, stacked(cfg), param_sharding)
    else:
        state = load_params_from_items(items, state, stacked(cfg), param_sharding)
    return nnx.merge(graphdef, state)
