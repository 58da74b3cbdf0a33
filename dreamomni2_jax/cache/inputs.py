"""Training inputs for the cache stage: manifest / folder parsing, image loading and resizing.

Three input formats (all give a list of :class:`Record`):

* JSONL manifest, one record per line ``{"instruction": str, "target": path, "references": [path, ...]}``
  plus an optional ``"task": "editing" | "generation"`` and an optional ``"mask": path`` (a loss mask for
  ``train.loss_mask="manifest"``: white = the edited region, same size as the target). Relative paths resolve
  against the manifest's folder. For editing the source image is the first reference.
* qflux dataset folder (:func:`read_qflux`): ``training_images/NAME.png`` target + ``NAME.txt``,
  ``control_images/NAME.png`` first reference, ``control_images/NAME_control_1.png``, ... the others.
* flat folder: ``name.png`` target, ``name.txt`` instruction, ``name_control.png``,
  ``name_control_1.png``, ``name_control_2.png``, ... references in that order (``.jpg``,
  ``.jpeg``, ``.webp``, ``.bmp`` also accepted).

Task rule (used by the instruction enhancer and stored in the cache): a record is an editing
task when it has at least one reference and its task is ``"editing"`` (the ``"task"`` key, else
the cache's default task, ``editing``); a record without references is always ``generation``.

Sizes (multiples of ``multiple`` = 2 x VAE downscale = 16 pixels):

* editing (source = first reference, and target): one size for both, :func:`editing_size` of the
  source at ``target_max_area`` (its Kontext preferred resolution, scaled by
  ``sqrt(area / 1024**2)``): a pixel-aligned pair at the geometry DreamOmni2 edits at. A target
  whose aspect ratio differs from its source's by more than ``data.pair_aspect_tolerance`` is bad
  input (:func:`check_record`);
* generation target: scaled (up or down) to ``target_max_area`` keeping its aspect ratio, as
  diffusers' ``FluxKontextPipeline`` computes its output size, then floored to the multiple;
* other references: snapped to the closest aspect ratio of :data:`PREFERRED_KONTEXT_RESOLUTIONS`
  (as the DreamOmni2 / Kontext pipelines do with ``_auto_resize``), floored to the multiple, at
  ``reference_max_area`` (default 1024**2, independent of the target area). The list is for a
  1024 x 1024 budget; when the reference area budget is smaller (tiny test / demo configs) the
  chosen entry is scaled by ``sqrt(area / 1024**2)`` first.

Pixels become float32 NHWC in [-1, 1] exactly as diffusers' ``VaeImageProcessor`` (PIL lanczos
resize, ``x / 255 * 2 - 1``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dreamomni2_jax.images.io import BadInput, image_size
from dreamomni2_jax.images.sizes import pair_aspect_mismatch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TASKS = ("editing", "generation")
TASK_SUFFIX = {"editing": " It is editing task.", "generation": " It is generation task."}


@dataclass(frozen=True)
class Record:
    """One training sample before encoding."""

    instruction: str
    target: str
    references: tuple[str, ...]
    where: str  # "manifest.jsonl:3" or "folder/name" (for error messages and the index)
    line: int | None = None  # 1-based manifest line (None for folders)
    task: str | None = None  # "editing" | "generation" | None (use the default)
    mask: str | None = None  # loss-mask image (white = weight 1), same size as the target
    raw: dict = field(default_factory=dict, compare=False)  # what was read (for the skipped report)

    def resolved_task(self, default: str = "editing") -> str:
        if not self.references:
            return "generation"
        return self.task or default


# --------------------------------------------------------------------------- input formats


def _manifest_record(obj, base: Path, where: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise BadInput(where, f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"instruction", "target", "references", "task", "mask"}
    if unknown:
        raise BadInput(where, f"unknown keys {sorted(unknown)} (expected instruction, target, references, task, "
                              "mask)")
    mask = obj.get("mask")
    if mask is not None and (not isinstance(mask, str) or not mask):
        raise BadInput(where, "'mask' must be a non-empty path string")
    instruction = obj.get("instruction")
    if not isinstance(instruction, str):
        raise BadInput(where, "'instruction' must be a string")
    target = obj.get("target")
    if not isinstance(target, str) or not target:
        raise BadInput(where, "'target' must be a non-empty path string")
    refs = obj.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise BadInput(where, "'references' must be a list of path strings")
    task = obj.get("task")
    if task is not None and task not in TASKS:
        raise BadInput(where, f"'task'={task!r} is not one of {list(TASKS)}")
    return Record(instruction=instruction, target=str(base / target), references=tuple(str(base / r) for r in refs),
                  where=where, line=line, task=task, mask=str(base / mask) if mask else None, raw=obj)


def read_manifest(path: str | Path) -> tuple[list[Record], list[BadInput]]:
    """Parse a JSONL manifest; unparsable lines come back as :class:`BadInput` (blank lines ignored)."""
    path = Path(path)
    records, bad = [], []
    base = path.resolve().parent
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{i}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadInput(where, f"not UTF-8 text ({e})"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad.append(BadInput(where, f"invalid JSON ({e})"))
            continue
        try:
            records.append(_manifest_record(obj, base, where, i))
        except BadInput as e:
            bad.append(e)
    return records, bad


_CONTROL = re.compile(r"^(?P<name>.+)_control(?:_(?P<k>\d+))?$")


def read_folder(path: str | Path) -> tuple[list[Record], list[BadInput]]:
    """Parse a qflux-style folder (sorted by name). Orphan files are reported as :class:`BadInput`."""
    root = Path(path)
    images: dict[str, Path] = {}
    controls: dict[str, dict[int, Path]] = {}
    texts: dict[str, Path] = {}
    bad: list[BadInput] = []
    for f in sorted(root.iterdir()):
        if f.is_dir() or f.name.startswith("."):
            continue
        ext = f.suffix.lower()
        if ext == ".txt":
            texts[f.stem] = f
        elif ext in IMAGE_EXTS:
            m = _CONTROL.match(f.stem)
            if m:
                k = 0 if m.group("k") is None else int(m.group("k"))
                prev = controls.setdefault(m.group("name"), {}).get(k)
                if prev is not None:
                    bad.append(BadInput(str(root / m.group("name")), f"two files for control index {k}", str(f)))
                controls[m.group("name")][k] = f
            elif f.stem in images:
                bad.append(BadInput(str(root / f.stem), "two target images with the same name", str(f)))
            else:
                images[f.stem] = f
    records = []
    for name, img in images.items():
        where = str(root / name)
        ctrl = controls.get(name, {})
        idx = sorted(ctrl)
        if idx and idx != list(range(len(idx))):
            bad.append(BadInput(where, f"control images must be numbered name_control, name_control_1, ... "
                                       f"without gaps; found indices {idx}", str(img)))
            continue
        text = texts.get(name)
        if text is None:
            bad.append(BadInput(where, "instruction file missing", str(root / f"{name}.txt")))
            continue
        try:
            instruction = text.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            bad.append(BadInput(where, f"instruction file is not UTF-8 text ({e})", str(text)))
            continue
        records.append(Record(instruction=instruction, target=str(img), references=tuple(str(ctrl[k]) for k in idx),
                              where=where, raw={"name": name}))
    for name in sorted(set(controls) - set(images)):
        bad.append(BadInput(str(root / name), "control images without a target image",
                            str(next(iter(controls[name].values())))))
    for name in sorted(set(texts) - set(images)):
        bad.append(BadInput(str(root / name), "instruction file without a target image", str(texts[name])))
    return records, bad


# qflux ``ImageDataset._find_directories``: the first existing name of each list.
QFLUX_IMAGE_DIRS = ("training_images", "images", "target_images", "target", "targets")
QFLUX_CONTROL_DIRS = ("control_images", "control", "condition_images", "controls")
_QFLUX_EXTRA = re.compile(r"^(?P<name>.+)_control_(?P<k>\d+)$")


def qflux_dirs(root: str | Path) -> tuple[Path, Path] | None:
    """``(images_dir, control_dir)`` when ``root`` has qflux's dataset layout, else None."""
    root = Path(root)
    img = next((root / n for n in QFLUX_IMAGE_DIRS if (root / n).is_dir()), None)
    ctl = next((root / n for n in QFLUX_CONTROL_DIRS if (root / n).is_dir()), None)
    return (img, ctl) if img is not None and ctl is not None else None


def _by_stem(folder: Path, bad: list[BadInput], skip=lambda stem: False) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_dir() or f.name.startswith(".") or f.suffix.lower() not in IMAGE_EXTS or skip(f.stem):
            continue
        if f.stem in out:
            bad.append(BadInput(str(folder / f.stem), "two images with the same name", str(f)))
            continue
        out[f.stem] = f
    return out


def read_qflux(path: str | Path) -> tuple[list[Record], list[BadInput]]:
    """Parse qflux's dataset layout (``qflux.data.dataset.ImageDataset._scan_image_files``), sorted by name:

    ``training_images/NAME.{png,jpg,...}`` target, ``NAME.txt`` instruction (in ``training_images/``, else in
    ``control_images/``), ``control_images/NAME.{png,jpg,...}`` first reference (the source for editing), then
    ``control_images/NAME_control_1.png``, ``NAME_control_2.png``, ... (folder aliases: :data:`QFLUX_IMAGE_DIRS`,
    :data:`QFLUX_CONTROL_DIRS`). A target without controls is a generation record. ``NAME_mask.png`` (qflux's
    optional loss mask, next to the target, else in the controls folder) is the record's loss mask. Unlike qflux, which skips them silently, a target without an instruction,
    numbered controls without a first control or with gaps, and controls without a target are reported as
    :class:`BadInput`."""
    dirs = qflux_dirs(path)
    if dirs is None:
        raise FileNotFoundError(f"{path}: no qflux layout ({QFLUX_IMAGE_DIRS[0]}/ and {QFLUX_CONTROL_DIRS[0]}/)")
    img_dir, ctl_dir = dirs
    bad: list[BadInput] = []
    is_mask = lambda stem: stem.endswith("_mask")  # noqa: E731
    targets = _by_stem(img_dir, bad, lambda stem: is_mask(stem) or _QFLUX_EXTRA.match(stem) is not None)
    controls = _by_stem(ctl_dir, bad, is_mask)
    masks = {**_by_stem(ctl_dir, [], lambda stem: not is_mask(stem)),
             **_by_stem(img_dir, [], lambda stem: not is_mask(stem))}  # the target's folder wins
    extras: dict[str, dict[int, Path]] = {}
    firsts: dict[str, Path] = {}
    for stem, f in controls.items():
        m = _QFLUX_EXTRA.match(stem)
        if m and stem not in targets:
            extras.setdefault(m.group("name"), {})[int(m.group("k"))] = f
        else:
            firsts[stem] = f
    records = []
    for name, img in targets.items():
        where = str(img_dir / name)
        refs = [firsts[name]] if name in firsts else []
        idx = sorted(extras.get(name, {}))
        if idx and (not refs or idx != list(range(1, len(idx) + 1))):
            bad.append(BadInput(where, f"controls must be {ctl_dir.name}/{name}.<ext>, then {name}_control_1, "
                                       f"{name}_control_2, ... without gaps; found first={bool(refs)}, numbered {idx}",
                                str(img)))
            continue
        refs += [extras[name][k] for k in idx]
        text = next((d / f"{name}.txt" for d in (img_dir, ctl_dir) if (d / f"{name}.txt").is_file()), None)
        if text is None:
            bad.append(BadInput(where, "instruction file missing", str(img_dir / f"{name}.txt")))
            continue
        records.append(Record(instruction=text.read_text(encoding="utf-8").strip(), target=str(img),
                              references=tuple(str(r) for r in refs), where=where, raw={"name": name},
                              mask=str(masks[f"{name}_mask"]) if f"{name}_mask" in masks else None))
    for name in sorted((set(firsts) | set(extras)) - set(targets)):
        f = firsts.get(name) or next(iter(extras[name].values()))
        bad.append(BadInput(str(ctl_dir / name), "control images without a target image", str(f)))
    return records, bad


def read_inputs(path: str | Path) -> tuple[list[Record], list[BadInput]]:
    """A JSONL manifest file, a qflux dataset folder (:func:`read_qflux`) or a flat folder (:func:`read_folder`)."""
    p = Path(path)
    if p.is_dir():
        return read_qflux(p) if qflux_dirs(p) is not None else read_folder(p)
    if p.is_file():
        return read_manifest(p)
    raise FileNotFoundError(f"--data {p}: no such manifest file or folder")


def check_record(rec: Record, max_refs: int, min_size: int, *, default_task: str = "editing",
                 aspect_tolerance: float | None = None) -> None:
    """Cheap checks before encoding (no full decode): instruction, reference count, files and sizes; with
    ``aspect_tolerance``, that an editing record's target has its source's (first reference's) aspect ratio."""
    if not rec.instruction.strip():
        raise BadInput(rec.where, "empty instruction", rec.target)
    if len(rec.references) > max_refs:
        raise BadInput(rec.where, f"{len(rec.references)} references, more than data.max_refs={max_refs}",
                       rec.references[max_refs])
    sizes = []
    for p in (rec.target, *rec.references):
        w, h = image_size(p, rec.where)
        if min(w, h) < min_size:
            raise BadInput(rec.where, f"image {w}x{h} is below data.min_image_size={min_size}", p)
        sizes.append((w, h))
    if aspect_tolerance is not None and rec.resolved_task(default_task) == "editing":
        rel = pair_aspect_mismatch(sizes[1], sizes[0], aspect_tolerance)
        if rel is not None:
            raise BadInput(rec.where, f"editing pair not aligned: target {sizes[0][0]}x{sizes[0][1]} and source (first "
                                      f"reference) {sizes[1][0]}x{sizes[1][1]} differ in aspect ratio by {rel:.1%} "
                                      f"(> data.pair_aspect_tolerance={aspect_tolerance}); crop them to one aspect "
                                      f"or mark the record \"task\": \"generation\"", rec.target)
