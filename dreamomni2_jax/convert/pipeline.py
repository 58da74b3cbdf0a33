"""Convert a local diffusers Flux Kontext (or FLUX.2 [klein]) pipeline folder into one converted model folder.

    python convert/pipeline.py --src FOLDER --out OUT [--dtype source|bf16|fp16|fp32] [--small-dtype ...]

FOLDER: ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP), ``text_encoder_2/`` (T5),
``tokenizer/``, ``tokenizer_2/``, ``scheduler/``. Everything is validated before anything is written; a missing
component or a wrong ``_class_name`` / ``architectures`` raises one error naming each problem.
OUT: ``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/`` converted (``params/`` Orbax +
``config.json`` each), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/`` copied, the source ``model_index.json``
and ``manifest.json`` (what is there, dtypes, source). ``--dtype`` is for the transformer and T5 / Qwen3,
``--small-dtype`` for the VAE and CLIP (default for both: ``source``, the checkpoint's own dtype).
A ``Flux2KleinPipeline`` folder (``model_index.json`` ``_class_name``) has ``transformer/`` (FLUX.2), ``vae/``
(``AutoencoderKLFlux2``), ``text_encoder/`` (Qwen3, ``--dtype``), ``tokenizer/`` (Qwen2) and ``scheduler/``. The
model family (``flux1`` / ``flux2-klein``) is recorded in the manifest (:mod:`dreamomni2_jax.weights.manifest`, :func:`~dreamomni2_jax.weights.manifest.read_family`), so later commands
read it from the converted folder. Each component is written to a temp folder and renamed; a re-run skips
components already present once their keys and shapes are verified (a damaged or dtype-mismatched one is an error
unless ``--overwrite``), so an interrupted run resumes and never leaves partial outputs. The manifest is written
last. ``--out`` must not be or contain ``--src``, and a folder that is not a (partial) output of this converter is
never written into or deleted.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from dreamomni2_jax.utils.atomic_write import atomic_dir, write_json
from dreamomni2_jax.weights import store
from dreamomni2_jax.weights.manifest import FORMAT, COMPONENTS, Component, FAMILIES, MANIFEST, PIPELINE_CLASSES
from dreamomni2_jax.convert.component import SOURCE, source_dtype
from dreamomni2_jax.weights.safetensors_io import open_checkpoint
from dreamomni2_jax.convert.component import check_disjoint
from dreamomni2_jax.convert.component import DTYPES
from dreamomni2_jax.weights.store import verify_converted
from dreamomni2_jax.convert.component import DTYPE_CHOICES
from dreamomni2_jax import cli

log = logging.getLogger(__name__)
_TOKENIZER_FILES = {"tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),  # CLIP or Qwen2
                    "tokenizer_2": (("tokenizer.json",), ("spiece.model",))}


def _family(index: dict) -> tuple[str, tuple[Component, ...]]:
    return FAMILIES.get(index.get("_class_name"), FAMILIES["FluxKontextPipeline"])


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{path}: missing")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path}: not valid JSON ({e})")
    return None


def validate_source(src: str | Path) -> dict:
    """Check the diffusers folder; returns its model_index. Raises ``ValueError`` listing every problem."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    problems: list[str] = []
    index = _read_json(src / "model_index.json", problems) or {}
    if index and index.get("_class_name") not in PIPELINE_CLASSES:
        problems.append(f"{src / 'model_index.json'}: _class_name is {index.get('_class_name')!r}, "
                        f"expected one of {list(PIPELINE_CLASSES)}")
    for c in _family(index)[1]:
        folder = src / c.name
        entry = index.get(c.name)
        if index and (not isinstance(entry, list) or len(entry) != 2 or entry[1] not in c.classes):
            problems.append(f"{src / 'model_index.json'}: component {c.name!r} is {entry!r}, "
                            f"expected [{c.library!r}, one of {list(c.classes)}]")
        if not folder.is_dir():
            problems.append(f"{folder}: component {c.name!r} missing")
            continue
        if c.config_file is not None:
            cfg = _read_json(folder / c.config_file, problems)
            if cfg is None:
                continue
            got = cfg.get("_class_name") if c.library == "diffusers" else cfg.get("architectures")
            ok = got == c.class_name if c.library == "diffusers" else isinstance(got, list) and c.class_name in got
            if not ok:
                key = "_class_name" if c.library == "diffusers" else "architectures"
                problems.append(f"{folder / c.config_file}: {key} is {got!r}, component {c.name!r} "
                                f"must be {c.class_name!r}")
        if c.name in _TOKENIZER_FILES:
            if not any(all((folder / f).is_file() for f in group) for group in _TOKENIZER_FILES[c.name]):
                problems.append(f"{folder}: component {c.name!r} has no tokenizer files "
                                f"(expected one of {[list(g) for g in _TOKENIZER_FILES[c.name]]})")
    if problems:
        what = index.get("_class_name") or "Flux Kontext"
        raise ValueError(f"{src}: not a usable diffusers {what} folder ({len(problems)} problem(s)):\n  "
                         + "\n  ".join(problems))
    return index


def _copy_dir(src: Path, out: Path) -> None:
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _want_dtype(c: Component, src: Path, dtype: str, small_dtype: str) -> str:
    want = dtype if c.big else small_dtype
    return source_dtype(open_checkpoint(src / c.name)) if want == SOURCE else want


def _check_out(src: Path, out: Path) -> None:
    """``out`` is new, empty, or holds only what this converter writes (a previous or interrupted run)."""
    check_disjoint(src, out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    known = {c.name for _, parts in FAMILIES.values() for c in parts} | {MANIFEST, "model_index.json"}
    other = sorted(p.name for p in out.iterdir() if p.name not in known
                   and not (p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)))
    if other:
        raise FileExistsError(f"--out {out} is not a convert/pipeline.py output (it holds {other[:10]}); "
                              "choose a new or empty folder")


def _check_existing(src: Path, out: Path, dtype: str, small_dtype: str, overwrite: bool,
                    components: tuple[Component, ...] = COMPONENTS) -> None:
    """Before writing anything: components already in ``out`` must be intact and match the requested dtypes."""
    problems = []
    for c in components:
        dst = out / c.name
        if not dst.exists():
            continue
        if not dst.is_dir():
            problems.append(f"{dst}: exists but is not a folder")
            continue
        if c.converter is None or overwrite:
            continue  # copied folders are recopied; converted ones are replaced only if recognisable (table)
        want = _want_dtype(c, src, dtype, small_dtype)
        try:
            have = json.loads((dst / store.CONFIG_FILE).read_text()).get("_dtype") if store.is_converted(dst) \
                else None
        except (ValueError, OSError) as e:
            problems.append(f"{dst / store.CONFIG_FILE}: unreadable ({e}); pass --overwrite to reconvert")
            continue
        if have is None:
            problems.append(f"{dst}: exists but is not a converted component (remove it or pass --overwrite)")
        elif have != want:
            problems.append(f"{dst}: already converted with dtype {have!r}, requested {want!r}")
        else:
            try:
                _verify(c, src, dst, want)
            except store.ConversionError as e:
                problems.append(f"{e} (pass --overwrite to reconvert)")
    if problems:
        raise ValueError("cannot resume into an existing folder (pass --overwrite to reconvert):\n  "
                         + "\n  ".join(problems))


def _verify(c: Component, src: Path, dst: Path, dtype: str) -> None:
    """The converted ``dst`` has every key and shape the converter would write from ``src`` (metadata only)."""
    plan, _ = importlib.import_module(f"dreamomni2_jax.convert.{c.converter}").build_plan(src / c.name, param_dtype=DTYPES[dtype])
    verify_converted(dst, plan.spec)


def _converter(c: Component) -> Callable[..., Path]:
    return importlib.import_module(f"dreamomni2_jax.convert.{c.converter}").convert


def convert_pipeline(src: str | Path, out: str | Path, dtype: str = "source", small_dtype: str = "source",
                     overwrite: bool = False, progress: bool = True) -> Path:
    """Convert / copy every component of ``src`` into ``out`` (see module docstring); returns ``out``."""
    for name, v in (("dtype", dtype), ("small_dtype", small_dtype)):
        if v not in DTYPE_CHOICES:
            raise ValueError(f"{name} must be one of {list(DTYPE_CHOICES)}, got {v!r}")
    src, out = Path(src).absolute(), Path(out).absolute()
    _check_out(src, out)
    index = validate_source(src)
    family, parts = _family(index)
    _check_existing(src, out, dtype, small_dtype, overwrite, parts)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".*.tmp-*"), *out.glob(".*.old-*")]:  # leftovers of an interrupted run
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # the manifest marks a complete folder; it is rewritten at the end
    components = {}
    for k, c in enumerate(parts, 1):
        dst, want = out / c.name, _want_dtype(c, src, dtype, small_dtype) if c.converter else None
        tag = f"[{k}/{len(parts)}] {c.name}"
        if c.converter is None:
            if dst.exists() and overwrite:
                shutil.rmtree(dst)
            if dst.exists():
                log.info("%s: already copied, skipping", tag)
            else:
                log.info("%s: copying", tag)
                _copy_dir(src / c.name, dst)
            components[c.name] = {"class": index[c.name][1], "kind": "copied"}
            continue
        if store.is_converted(dst) and not overwrite:
            log.info("%s: already converted (%s), skipping", tag, want)
        else:
            t0 = time.time()
            log.info("%s: converting (%s)", tag, want)
            _converter(c)(src / c.name, dst, dtype=want, overwrite=overwrite, progress=progress)
            log.info("%s: done in %.1fs", tag, time.time() - t0)
        components[c.name] = {"class": c.class_name, "kind": "converted", "dtype": want,
                              "converter": f"convert.{c.converter}"}
    write_json(out / "model_index.json", index)
    write_json(out / MANIFEST, {"format": FORMAT, "version": 1, "source": str(src),
                                 "pipeline_class": index.get("_class_name"), "family": family,
                                 "components": components})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--src", required=True, help="local diffusers Flux Kontext / FLUX.2 [klein] pipeline folder")
    ap.add_argument("--out", required=True, help="converted folder (created; re-runs skip verified components)")
    ap.add_argument("--dtype", default="source", choices=DTYPE_CHOICES,
                    help="transformer and T5 / Qwen3 params; 'source' keeps the checkpoint's dtype (lossless)")
    ap.add_argument("--small-dtype", default="source", choices=DTYPE_CHOICES, help="VAE and CLIP params")
    ap.add_argument("--overwrite", action="store_true",
                    help="reconvert components already present (only this converter's outputs are replaced)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    def run(_argv) -> int:
        out = convert_pipeline(args.src, args.out, args.dtype, args.small_dtype, args.overwrite,
                               not args.no_progress)
        print(json.dumps({"out": str(out)}))
        return 0

    return cli.run(run, None, extra=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
