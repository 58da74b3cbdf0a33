"""The cache's on-disk record format: one record's arrays + metadata, shard names, the index (``index.json``) and its checks."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from dreamomni2_jax.utils.dtypes import np_dtype

FORMAT = "dreamomni2-cache"
VERSION = 3  # 2: editing source and target resized together (v1 caches trained on misaligned pairs);
# 3: the prompt embeddings are stored as "text" (FLUX.1: T5, klein: Qwen3), not "t5"
READABLE = (2, VERSION)  # a v2 record's "t5" is read as "text" (decode_record): nothing to re-cache
_LEGACY_KEYS = {"t5": "text"}
_MAGIC = b"DO2R"
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access


class CacheError(RuntimeError):
    """The cache folder is inconsistent with this run (other settings / inputs) or incomplete."""


# --------------------------------------------------------------------------- record format


def encode_record(arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    """``MAGIC | u32 header length | JSON header | raw C-order buffers`` (dtypes incl. bfloat16 kept)."""
    header, buffers, offset = {"arrays": [], "meta": meta or {}}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        header["arrays"].append([name, a.dtype.name, list(a.shape), offset, a.nbytes])
        buffers.append(a.tobytes())
        offset += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(h)), h, *buffers])


def decode_record(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`encode_record` (arrays are read-only views into ``data``)."""
    if data[:4] != _MAGIC:
        raise CacheError("not a dreamomni2 cache record (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    arrays = {_LEGACY_KEYS.get(name, name):
              np.frombuffer(data, np_dtype(dt), count=int(np.prod(shape)), offset=base + off).reshape(shape)
              for name, dt, shape, off, _ in header["arrays"]}
    return arrays, header["meta"]


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m`` (``m <= 1``: ``n`` unchanged)."""
    return -(-n // m) * m if m > 1 else n


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.array_record"


def _read_first(path: Path) -> dict[str, np.ndarray]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return decode_record(reader.read([0])[0])[0]
    finally:
        reader.close()


def check_local(path: str | Path, what: str) -> None:
    """Cache folders are local / FUSE paths: ArrayRecord reads files through the OS (mount buckets with gcsfuse)."""
    if "://" in str(path):
        raise CacheError(f"{what}={path}: URLs are not supported; mount the bucket (e.g. gcsfuse) and pass the "
                         f"mounted path")


def load_index(cache_dir: str | Path) -> dict:
    """``index.json`` of a finished cache (:class:`CacheError` if missing or of another format)."""
    check_local(cache_dir, "data.cache_dir")
    p = Path(cache_dir) / "index.json"
    if not p.is_file():
        raise CacheError(f"{p} not found: the cache is missing or incomplete (re-run scripts/cache.py)")
    index = _read_json(p)
    if not isinstance(index, dict):
        raise CacheError(f"{p}: not a {FORMAT} v{VERSION} index")
    if index.get("format") == FORMAT and index.get("version") == 1:
        raise CacheError(f"{p}: a v1 cache (editing targets not resized with their source); re-run scripts/cache.py "
                         f"into a new --out")
    if index.get("format") != FORMAT or index.get("version") not in READABLE:
        raise CacheError(f"{p}: not a {FORMAT} v{VERSION} index")
    missing = [k for k in ("shards", "records", "num_records", "empty_prompt") if k not in index]
    if missing:
        raise CacheError(f"{p}: damaged index (no {missing}); re-run scripts/cache.py into a new folder")
    return index


def _read_json(path: Path):
    """JSON of a cache file; :class:`CacheError` naming it when unreadable or damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable or damaged ({type(e).__name__}: {e})") from None
