"""Cache stage: VAE latents + text embeddings of every training record, written to ArrayRecord shards.

Layout of a cache folder (``scripts/cache.py`` writes it, :mod:`dreamomni2_jax.data.stream` streams it):

* ``shard-NNNNN.array_record``: one record per sample (:func:`encode_record`: named arrays
  ``target`` [h, w, C] and ``ref0``, ``ref1``, ... normalised latents ``(z - shift) * scale``
  in the VAE dtype, ``t5`` [L, D], ``pooled`` [Dp]; plus JSON metadata: instruction (and
  ``instruction_original`` when enhanced), task, source paths, manifest line, pixel sizes);
* ``shard-NNNNN.json``: that shard's index entries and skipped inputs (its completion marker);
* ``empty_prompt.rec``: embeddings of ``""`` (caption dropout), same record format;
* ``settings.json``: what the cache was built with (a re-run with other settings is refused);
* ``index.json`` (written last): per-record latent shapes, reference counts, sources, lines;
* ``skipped.jsonl``: every input left out with ``--skip-bad`` and why (empty when none).

Input record ``k`` belongs to shard ``k // shard_size``, so a killed run re-run skips finished
shards and redoes the rest. Every file is written to a temporary name and renamed. Position ids
are not stored: :mod:`dreamomni2_jax.layout.ids_flux1` rebuilds them from the latent shapes.

Several processes (``jax.distributed``: one per host) build one cache in a folder every host sees:
process 0 checks / writes ``settings.json`` and lists the unfinished shards, the processes encode
disjoint shares of them (round-robin, each on its own local devices) and write each shard's files
and marker, then process 0 alone writes ``empty_prompt.rec``, ``skipped.jsonl`` and ``index.json``.
A shard's contents depend only on its records, so the cache is the one a single process writes, and
a killed run resumes with any number of processes. The processes agree (an all-gather) after each
step, so an error in one stops all of them, each with one line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from dreamomni2_jax.utils.atomic_write import temp_name, write_bytes
from dreamomni2_jax.images.io import BadInput, open_image
from dreamomni2_jax.cache.inputs import Record, check_record, read_inputs
from dreamomni2_jax.images.sizes import editing_size, reference_size, target_size
from dreamomni2_jax.cache.records import (FORMAT, CacheError, VERSION, _read_json, WRITER_OPTIONS, _read_first,
    check_local, decode_record, encode_record, shard_name)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- encoders


class Encoders(Protocol):
    """What the cache stage needs from the models (real: :mod:`dreamomni2_jax.cache.encoders`, picked by the model
    family; tests may use fakes)."""

    downscale: int  # pixels per latent side (8 for Flux)
    image_batch: int  # images per encode_images call the cache makes (optional; default 8)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """float32 NHWC pixels in [-1, 1], all one shape -> normalised latents ``[N, H/8, W/8, C]``."""

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> ``(t5 [N, L, D], pooled [N, Dp])``."""


# --------------------------------------------------------------------------- settings / files


@dataclass(frozen=True)
class CacheSettings:
    """Everything that changes the cache contents (stored in ``settings.json``; re-runs must match)."""

    inputs: str
    model: str
    dtype: str
    target_max_area: int
    reference_max_area: int
    min_image_size: int
    max_refs: int
    pair_aspect_tolerance: float
    max_sequence_length: int
    shard_size: int
    default_task: str = "editing"
    enhancer: str = ""

    @classmethod
    def from_config(cls, cfg, data: str | Path, shard_size: int, enhancer: str = "", default_task: str = "editing"):
        d = cfg.data
        model = str(Path(cfg.model.path).resolve()) if cfg.model.path else ""
        return cls(inputs=str(Path(data).resolve()), model=model,
                   dtype=cfg.model.param_dtype, target_max_area=d.target_max_area,
                   reference_max_area=d.reference_max_area, min_image_size=d.min_image_size, max_refs=d.max_refs,
                   pair_aspect_tolerance=d.pair_aspect_tolerance, max_sequence_length=d.max_sequence_length,
                   shard_size=shard_size, default_task=default_task, enhancer=str(enhancer or ""))


def _digest(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.where, r.instruction, r.target, list(r.references), r.task]
                            + ([r.mask] if r.mask else [])).encode())
    return h.hexdigest()[:16]


def _bad_entry(e: BadInput, rec: Record | None) -> dict:
    return {"where": e.where, "path": e.path, "reason": e.reason, "line": rec.line if rec else None,
            "record": rec.raw if rec else None}


# --------------------------------------------------------------------------- processes


class _Processes:
    """This process's place among the processes (``jax.distributed``) building one cache, and their agreement
    steps (collectives over every process's devices: each process must reach the same steps in the same order).
    One process: no collectives, no JAX calls."""

    def __init__(self, index: int | None = None, count: int | None = None):
        if index is None or count is None:
            import jax

            index, count = jax.process_index(), jax.process_count()
        self.index, self.count = int(index), int(count)

    def __str__(self) -> str:
        return f"process {self.index} of {self.count}"

    def gather(self, row: Sequence[int]) -> np.ndarray:
        """Every process's ``row`` (int32, same length everywhere): ``[count, len(row)]``."""
        row = np.asarray(row, np.int32).reshape(1, -1)
        if self.count == 1:
            return row
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(row[0])).reshape(self.count, -1)

    def agree(self, err: Exception | None, step: str, row: Sequence[int] = ()) -> np.ndarray:
        """Raise ``err`` here, and in every other process a :class:`CacheError` naming the failed processes; else
        every process's ``row`` (:meth:`gather`)."""
        rows = self.gather([int(err is not None), *row])
        if err is not None:
            raise err
        failed = [i for i in range(self.count) if rows[i, 0]]
        if failed:
            raise CacheError(f"{step}: process{'es' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of "
                             f"{self.count} failed (see {'their' if len(failed) > 1 else 'its'} output); "
                             f"process {self.index} stops too")
        return rows[:, 1:]


def _unseen(path: Path, writer: str) -> CacheError:
    return CacheError(f"{path} not found although {writer} wrote it: the cache folder must be on storage every host "
                      f"sees (a shared file system, or the same bucket mounted with gcsfuse on every host)")


# --------------------------------------------------------------------------- the stage


@dataclass
class _Prepared:
    rec: Record
    instruction: str
    task: str
    pixels: list[np.ndarray]  # uint8 [H, W, 3]: target then references
    mask: np.ndarray | None = None  # float32 [H, W] in [0, 1]: the loss mask at the target's pixel size


def _resized(img, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(img if img.size == size else img.resize(size, resample=Image.Resampling.LANCZOS))


def _check(rec: Record, s: CacheSettings) -> None:
    check_record(rec, s.max_refs, s.min_image_size, default_task=s.default_task,
                 aspect_tolerance=s.pair_aspect_tolerance)


def _prepare(rec: Record, s: CacheSettings, multiple: int) -> _Prepared:
    """Editing: target and source resized together to :func:`editing_size` of the source at the target area
    (pixel-aligned pair); generation: target to its own aspect at the target area. Other references: Kontext
    resolutions at the reference area."""
    _check(rec, s)
    tgt = open_image(rec.target, rec.where, s.min_image_size)
    refs = [open_image(p, rec.where, s.min_image_size) for p in rec.references]
    task = rec.resolved_task(s.default_task)
    try:
        if task == "editing":
            size = editing_size(*refs[0].size, s.target_max_area, multiple)
            pixels = [_resized(tgt, size), _resized(refs[0], size)]
        else:
            pixels = [_resized(tgt, target_size(*tgt.size, s.target_max_area, multiple))]
        pixels += [_resized(r, reference_size(*r.size, s.reference_max_area, multiple))
                   for r in refs[len(pixels) - 1:]]
    except ValueError as e:  # an extreme aspect ratio or area: a bad input like any other (skippable)
        raise BadInput(rec.where, str(e), rec.target) from None
    mask = None
    if rec.mask:
        m = open_image(rec.mask, rec.where)
        if m.size != tgt.size:
            raise BadInput(rec.where, f"mask {m.size[0]}x{m.size[1]} is not the target's size "
                                      f"{tgt.size[0]}x{tgt.size[1]}", rec.mask)
        h, w = pixels[0].shape[:2]
        mask = _resized(m.convert("L"), (w, h)).astype(np.float32) / 255.0
    return _Prepared(rec, rec.instruction.strip(), task, pixels, mask)


def _try_prepare(rec: Record, s: CacheSettings, multiple: int) -> _Prepared | BadInput:
    try:
        return _prepare(rec, s, multiple)
    except BadInput as e:
        return e


def _encode_group(items: list[_Prepared], enc: Encoders) -> list[dict[str, np.ndarray]]:
    """Latents (same-shape images batched together) and text embeddings for ``items``, in order."""
    out = [dict() for _ in items]
    by_shape: dict[tuple, list[tuple[int, int]]] = {}
    for i, it in enumerate(items):
        for j, px in enumerate(it.pixels):
            by_shape.setdefault(px.shape, []).append((i, j))
    step = max(1, int(getattr(enc, "image_batch", 8)))
    for shape, slots in by_shape.items():
        for k in range(0, len(slots), step):  # uint8 -> float32 per encoder batch (bounded host memory)
            part = slots[k:k + step]
            x = np.stack([items[i].pixels[j] for i, j in part]).astype(np.float32) / 255.0 * 2.0 - 1.0
            z = np.asarray(enc.encode_images(x))
            for (i, j), zi in zip(part, z):
                out[i]["target" if j == 0 else f"ref{j - 1}"] = zi
    f = int(getattr(enc, "downscale", 8))
    for i, it in enumerate(items):  # loss mask at latent resolution: the average of each f x f pixel block
        if it.mask is not None:
            h, w = it.mask.shape
            out[i]["loss_mask"] = it.mask.reshape(h // f, f, w // f, f).mean(axis=(1, 3)).astype(np.float32)
    t5, pooled = enc.encode_text([it.instruction for it in items])
    for i in range(len(items)):
        out[i]["text"], out[i]["pooled"] = np.asarray(t5[i]), np.asarray(pooled[i])
    return out


def build_cache(
    cfg,
    data: str | Path,
    out: str | Path,
    encoders: Encoders | Callable[[], Encoders],
    *,
    skip_bad: bool = False,
    shard_size: int = 256,
    group_size: int = 32,
    enhancer: Callable[[list, str, str], str] | None = None,
    enhancer_name: str = "",
    default_task: str = "editing",
    progress: bool = True,
    hook: Callable[[str, int], None] | None = None,
    processes: tuple[int, int] | None = None,
) -> dict:
    """Encode every record of ``data`` (manifest or folder) into ``out``; returns the index dict.

    ``encoders`` may be a zero-argument factory, called only when something is left to encode.
    ``enhancer(reference_paths, instruction, task) -> instruction`` rewrites instructions (the
    original is kept in the record's ``instruction_original``). ``hook(event, shard)`` is called
    after every record written (``"record"``) and every finished shard (``"shard"``) (tests use it
    to simulate a killed run). Bad inputs raise :class:`BadInput` unless ``skip_bad``.

    ``processes``: ``(index, count)`` of this process among those building the cache together (default:
    ``jax.process_index(), jax.process_count()``); every one of them calls this with the same arguments.
    """
    from tqdm import tqdm

    check_local(out, "--out")
    out = Path(out)
    group = _Processes(*(processes or (None, None)))
    settings = CacheSettings.from_config(cfg, data, shard_size, enhancer_name, default_task)
    sfile = out / "settings.json"
    first = group.index == 0
    # step 1: process 0 checks / writes settings.json and finds the finished shards; everyone reads the inputs
    err, digest, done, chunks, pre_bad = None, "0" * 16, [], [], []
    try:
        if first:
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob("*.tmp-*"):  # a killed run's temporaries (nobody writes before step 3)
                stale.unlink()
            _check_settings(sfile, settings, out, write=True)
        records, parse_bad = read_inputs(data)
        if parse_bad and not skip_bad:
            raise parse_bad[0]
        pre_bad = [_bad_entry(e, None) for e in parse_bad]
        if not skip_bad:  # cheap checks of everything before hours of encoding
            for rec in records:
                _check(rec, settings)
        chunks = [records[i:i + shard_size] for i in range(0, len(records), shard_size)]
        digest = _digest(records)
        if first:
            done = [_finished(out, k, chunk) for k, chunk in enumerate(chunks)]
    except Exception as e:  # noqa: BLE001 - re-raised by agree (here; the other processes stop with one line)
        err = e
    rows = group.agree(err, "cache setup", [len(chunks), *np.frombuffer(bytes.fromhex(digest), np.int32)])
    if (rows != rows[0]).any():
        other = int(np.flatnonzero((rows != rows[0]).any(axis=1))[0])
        raise CacheError(f"{data}: process {other} reads other inputs than process 0 ({int(rows[other, 0])} vs "
                         f"{int(rows[0, 0])} shards): every host must see the same --data")
    # step 2: every process sees process 0's settings.json (shared storage, the same command) and process 0's list
    # of the finished shards
    err = None
    try:
        if not first:
            if not sfile.is_file():
                raise _unseen(sfile, "process 0")
            _check_settings(sfile, settings, out, write=False)
    except Exception as e:  # noqa: BLE001 - re-raised by agree
        err = e
    done = group.agree(err, "cache folder check", done if first else [0] * len(chunks))[0]
    # step 3: each process encodes its share of the unfinished shards (round-robin), each on its own devices
    todo = [k for k in range(len(chunks)) if not done[k]]
    mine = todo[group.index::group.count]
    err, enc, multiple = None, None, None
    try:
        who = f"{group}: " if group.count > 1 else ""
        if todo:
            log.info("%s%d of %d shards to encode%s", who, len(mine), len(chunks),
                     f" (of the {len(todo)} left; the others encode the rest)" if group.count > 1 else "")
        n_images = sum(1 + len(r.references) for k in mine for r in chunks[k])
        bar = tqdm(total=n_images, unit="img", disable=not progress or not first, smoothing=0.1,
                   desc="cache" if group.count == 1 else f"cache ({group}: its share)")
        for k in mine:
            if enc is None:
                enc = _make(encoders)
                multiple = 2 * enc.downscale
            _write_shard(out, k, chunks[k], settings, enc, multiple, skip_bad, group_size, enhancer, bar, hook)
            if hook:
                hook("shard", k)
        bar.close()
    except Exception as e:  # noqa: BLE001 - re-raised by agree
        err = e
    group.agree(err, "cache encoding")
    # step 4: process 0 alone writes the single files from every process's shard markers
    err, index = None, None
    try:
        if first:
            if not (out / "empty_prompt.rec").exists():
                if enc is None:
                    enc = _make(encoders)
                t5, pooled = enc.encode_text([""])
                empty = {"text": np.asarray(t5[0]), "pooled": np.asarray(pooled[0])}
                write_bytes(out / "empty_prompt.rec", encode_record(empty))
            owners = {k: f"process {i % group.count}" if group.count > 1 else "this run"
                      for i, k in enumerate(todo)}
            index = _finalize(out, settings, len(chunks), pre_bad, owners)
    except Exception as e:  # noqa: BLE001 - re-raised by agree
        err = e
    group.agree(err, "cache index")
    if index is None:  # the other processes: process 0's index (which they must see too)
        if not (out / "index.json").is_file():
            raise _unseen(out / "index.json", "process 0")
        index = _read_json(out / "index.json")
    return index


def _make(encoders) -> Encoders:
    return encoders() if callable(encoders) and not hasattr(encoders, "encode_images") else encoders


def _check_settings(sfile: Path, settings: CacheSettings, out: Path, write: bool) -> None:
    """``settings.json`` must hold ``settings`` (written when absent and ``write``)."""
    if sfile.exists():
        old = _read_json(sfile)
        if old != asdict(settings):
            diff = {k: (old.get(k), v) for k, v in asdict(settings).items() if old.get(k) != v}
            raise CacheError(f"{out} holds a cache built with other settings {diff} (old, new); use a new --out"
                             + ("" if write else " (or process 0 runs another command than this one)"))
    elif write:
        write_bytes(sfile, json.dumps(asdict(settings), indent=1))


def _finished(out: Path, k: int, chunk: list[Record]) -> bool:
    """Whether shard ``k`` is complete (its marker exists; :class:`CacheError` if it is of other inputs)."""
    side = out / f"shard-{k:05d}.json"
    if not side.exists():
        return False
    meta = _read_json(side)
    if meta["digest"] != _digest(chunk):
        raise CacheError(f"{side}: inputs changed since this shard was written; use a new --out")
    if meta["num_records"] and not (out / shard_name(k)).exists():
        raise CacheError(f"{out / shard_name(k)} missing although {side} marks it complete")
    return True


def _write_shard(out: Path, k: int, chunk: list[Record], s: CacheSettings, enc: Encoders, multiple: int,
                 skip_bad: bool, group_size: int, enhancer, bar, hook) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    path = out / shard_name(k)
    tmp = temp_name(path)
    entries, skipped = [], []
    writer = None
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # PIL decode/resize release the GIL
    try:
        for g in range(0, len(chunk), group_size):
            items = []
            group = chunk[g:g + group_size]
            for rec, got in zip(group, pool.map(lambda r: _try_prepare(r, s, multiple), group)):
                if isinstance(got, BadInput):
                    if not skip_bad:
                        raise got
                    log.warning("skipping %s", got)
                    skipped.append(_bad_entry(got, rec))
                    bar.update(1 + len(rec.references))
                else:
                    items.append(got)
            if not items:
                continue
            if enhancer is not None:
                for it in items:
                    it.instruction = enhancer(list(it.rec.references), it.instruction, it.task).strip()
                    if not it.instruction:
                        raise CacheError(f"{it.rec.where}: the instruction enhancer returned an empty instruction")
            arrays = _encode_group(items, enc)
            for it, arr in zip(items, arrays):
                if writer is None:
                    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
                lat = [arr["target"].shape[:2]] + [arr[f"ref{j}"].shape[:2] for j in range(len(it.pixels) - 1)]
                meta = {"instruction": it.instruction, "instruction_original": it.rec.instruction, "task": it.task,
                        "where": it.rec.where, "line": it.rec.line, "target": it.rec.target,
                        "references": list(it.rec.references), "mask": it.rec.mask,
                        "pixels": [[int(p.shape[1]), int(p.shape[0])] for p in it.pixels]}
                writer.write(encode_record(arr, meta))
                entries.append({"shard": k, "target_latent": list(lat[0]),
                                "reference_latents": [list(x) for x in lat[1:]],
                                "num_references": len(lat) - 1, "task": it.task, "where": it.rec.where,
                                "line": it.rec.line, "target": it.rec.target, "references": list(it.rec.references),
                                "mask": it.rec.mask})
                bar.update(len(it.pixels))
                if hook:
                    hook("record", k)
        if writer is not None:
            writer.close()
            writer = None
            os.replace(tmp, path)
    finally:
        pool.shutdown(cancel_futures=True)
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    write_bytes(out / f"shard-{k:05d}.json", json.dumps({"digest": _digest(chunk), "num_records": len(entries),
                                                          "records": entries, "skipped": skipped}))


def _finalize(out: Path, s: CacheSettings, num_chunks: int, pre_bad: list[dict],
              owners: dict[int, str] | None = None) -> dict:
    """``index.json`` and ``skipped.jsonl`` from the shard markers (``owners``: who wrote shard k in this run, named
    when its files are not visible here)."""
    records, skipped, shards = [], list(pre_bad), []
    for k in range(num_chunks):
        side = out / f"shard-{k:05d}.json"
        if not side.is_file():
            raise _unseen(side, (owners or {}).get(k, "an earlier run"))
        meta = _read_json(side)
        skipped += meta["skipped"]
        if meta["num_records"]:
            if not (out / shard_name(k)).is_file():
                raise _unseen(out / shard_name(k), (owners or {}).get(k, "an earlier run"))
            shards.append({"file": shard_name(k), "num_records": meta["num_records"]})
            records += meta["records"]
    if not records:
        raise CacheError(f"{out}: no usable records (skipped {len(skipped)}; see skipped.jsonl)")
    arrays, _ = decode_record((out / "empty_prompt.rec").read_bytes())
    first = _read_first(out / shards[0]["file"])
    index = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": asdict(s),
        "latent_channels": int(first["target"].shape[-1]), "latent_dtype": first["target"].dtype.name,
        "text_shape": list(arrays["text"].shape), "pooled_dim": int(arrays["pooled"].shape[0]),
        "empty_prompt": "empty_prompt.rec", "skipped_report": "skipped.jsonl",
        "num_records": len(records), "num_skipped": len(skipped), "shards": shards, "records": records,
    }
    write_bytes(out / "skipped.jsonl", "".join(json.dumps(e) + "\n" for e in skipped))
    write_bytes(out / "index.json", json.dumps(index))
    if skipped:
        log.warning("%d bad inputs skipped; listed in %s", len(skipped), out / "skipped.jsonl")
    return index
