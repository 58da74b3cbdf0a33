"""One model component: checkpoint -> converted folder, from the command line or from Python.

Every converter (``flux_transformer``, ``flux2_transformer``, ``vae``, ``vae_flux2``, ``clip``, ``t5``, ``qwen3``
in this package) supplies a ``build_plan(src, [config=...,] param_dtype=...) -> (Plan, config)``; this module does
the rest the same way for all of them: dtype names, the metadata written next to the params and the command line.
Loading a converted folder (or a source converted on the fly) into an abstract, already-sharded template is
:func:`dreamomni2_jax.weights.store.load_component`, called by :mod:`dreamomni2_jax.convert.loaders`.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from dreamomni2_jax.utils.dtypes import SHORT, short_name
from dreamomni2_jax.weights.safetensors_io import open_checkpoint
from dreamomni2_jax.weights.store import write_checkpoint
from dreamomni2_jax.config import read_json
from dreamomni2_jax import cli

DTYPES = SHORT  # converter --dtype names
SOURCE = "source"  # keep the source checkpoint's dtype (the default: a converter is lossless unless asked)
DTYPE_CHOICES = (SOURCE, *sorted(DTYPES))


def source_dtype(reader) -> str:
    """The name in :data:`DTYPES` that holds every float tensor of ``reader`` losslessly (mixed -> fp32)."""
    found = set()
    for k in reader.keys():
        dt = np.dtype(reader.dtype(k))
        if dt.kind == "f" or dt == SHORT["bf16"]:
            found.add(short_name(dt) or "fp32")
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
            "_converter": build_plan.__module__.removeprefix("dreamomni2_jax.")}
    return write_checkpoint(out, plan.items(progress=progress), meta, overwrite=overwrite)


def component_main(convert: Callable, *, description: str, src_help: str, default_dtype: str,
                   config_help: str | None = None, argv: list[str] | None = None,
                   before: Callable[[], None] | None = None) -> int:
    """The shared CLI: ``--src --out [--dtype] [--config] [--overwrite] [--no-progress]``; prints ``{"out": ...}``.

    ``convert(src, out, dtype, [config,] overwrite=, progress=)``; ``config_help`` adds ``--config``.
    """
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


def component_cli(build_plan: Callable, doc: str, *, src_help: str, config_help: str | None = None,
                  before: Callable[[], None] | None = None) -> tuple[Callable[..., Path], Callable[..., int]]:
    """A converter module's ``(convert, main)`` from its ``build_plan`` and module docstring ``doc``.

    ``convert(src, out, dtype="source", *, config=None, overwrite=False, progress=True) -> out`` streams ``src``
    into the folder ``out`` (:func:`convert_component`; ``config`` only where ``config_help`` offers it);
    ``main(argv)`` is the command line of :func:`component_main`.
    """
    def convert(src: str | Path, out: str | Path, dtype: str = SOURCE, *, config=None, overwrite: bool = False,
                progress: bool = True) -> Path:
        if config is not None and not config_help:
            raise TypeError("this converter takes no config")
        kw = {"config": config} if config_help else {}
        return convert_component(build_plan, src, out, dtype, overwrite=overwrite, progress=progress, **kw)

    def main(argv: list[str] | None = None) -> int:
        return component_main(convert, description=doc.split("\n\n")[0], default_dtype=SOURCE, argv=argv,
                              src_help=src_help, config_help=config_help, before=before)

    convert.__doc__ = f"Convert ``src`` into the folder ``out``: {doc.split(chr(10))[0]}"
    return convert, main
