"""Streaming safetensors reader/writer in pure numpy (no torch, never pickle).

``open_checkpoint(path)`` accepts a ``.safetensors`` file, a folder with a ``*.safetensors.index.json`` (sharded
diffusers/transformers layout), or a folder with exactly one ``*.safetensors``. Only the JSON headers are parsed up
front; ``Reader.read(key)`` reads one tensor with a positioned read into a fresh array (BF16 / FP8 via ml_dtypes),
so memory use is one tensor at a time. ``write_safetensors`` streams tensors to a file one at a time.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from dreamomni2_jax.utils.atomic_write import atomic_file

log = logging.getLogger(__name__)

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """Malformed or inconsistent safetensors file / index (message names the file and key)."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one file's header -> ({key: TensorInfo}, __metadata__), validating offsets against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} is invalid (file size {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    base, infos = 8 + n, {}
    meta = header.pop("__metadata__", None) or {}
    for key, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            begin, end = (int(o) for o in h["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: {key}: bad header entry {h!r} ({e!r})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise SafetensorsError(
                f"{path}: {key}: data_offsets {[begin, end]} do not fit dtype {h['dtype']} shape {list(shape)} "
                f"(file size {size})")
        infos[key] = TensorInfo(path, dtype, shape, base + begin, nbytes)
    return infos, meta


class Reader:
    """Read-only view over one or more safetensors files (``keys``, ``shape``, ``dtype``, ``file_of``, ``read``)."""

    def __init__(self, infos: dict[str, TensorInfo], source: Path):
        self.infos, self.source = infos, source

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def keys(self) -> list[str]:
        return list(self.infos)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def count(self, prefix: str) -> int:
        """Number of indexed children under ``prefix`` (``"double_blocks."`` -> highest ``N`` of
        ``double_blocks.N.*`` + 1; 0 when none)."""
        idx = {int(k[len(prefix):].split(".", 1)[0]) for k in self.infos if k.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    def dtype(self, key: str) -> np.dtype:
        return self.infos[key].dtype

    def file_of(self, key: str) -> Path:
        return self.infos[key].file

    def nbytes(self, key: str) -> int:
        return self.infos[key].nbytes

    def under_prefix(self, prefixes: tuple[str, ...]) -> "Reader":
        """Keys under the first of ``prefixes`` present, with it stripped (e.g. BFL ``model.diffusion_model.``).

        Keys outside it are left out with a warning naming how many and a few examples; if no prefix is present
        the reader is returned unchanged.
        """
        for prefix in prefixes:
            if any(k.startswith(prefix) for k in self.infos):
                others = [k for k in self.infos if not k.startswith(prefix)]
                if others:
                    log.warning("%s: ignoring %d keys outside %r (e.g. %s)", self.source, len(others), prefix,
                                others[:3])
                return Reader({k[len(prefix):]: v for k, v in self.infos.items() if k.startswith(prefix)}, self.source)
        return self

    def read(self, key: str) -> np.ndarray:
        """Fresh (owned, writable) array for ``key``; reads only that tensor's bytes."""
        info = self.infos[key]
        out = np.empty(info.shape, info.dtype)
        buf = out.reshape(-1).view(np.uint8)
        with open(info.file, "rb", buffering=0) as f:
            got = 0
            while got < info.nbytes:  # readinto may return short counts for big reads
                n = os.preadv(f.fileno(), [buf[got:]], info.offset + got)
                if n <= 0:
                    raise SafetensorsError(f"{info.file}: {key}: unexpected end of file")
                got += n
        return out


def _from_index(index: Path) -> Reader:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise SafetensorsError(f"{index}: not a safetensors index ({e!r})") from None
    infos, problems, headers = {}, [], {}
    for fname in sorted(set(weight_map.values())):
        if not (index.parent / fname).is_file():
            problems.append(f"{index}: shard {fname} listed but missing")
            continue
        headers[fname] = read_header(index.parent / fname)[0]
    for key, fname in weight_map.items():
        if fname in headers:
            if key not in headers[fname]:
                problems.append(f"{index}: {key} mapped to {fname} but not in that file")
            else:
                infos[key] = headers[fname][key]
    for fname, h in headers.items():
        for key in h:
            if weight_map.get(key) != fname:
                problems.append(f"{index.parent / fname}: {key} present but not mapped to this file by the index")
    if problems:
        raise SafetensorsError("inconsistent sharded checkpoint:\n  " + "\n  ".join(problems))
    return Reader(infos, index)


def open_checkpoint(path: str | Path) -> Reader:
    """Open a safetensors file, a sharded folder (via its ``*.safetensors.index.json``) or a one-file folder."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _from_index(path)
        if path.suffix != ".safetensors":
            raise SafetensorsError(f"{path}: only .safetensors files are supported (never pickle / .bin / .ckpt)")
        return Reader(read_header(path)[0], path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    files = sorted(path.glob("*.safetensors"))
    if len(indexes) == 1:
        return _from_index(indexes[0])
    if len(indexes) > 1:
        raise SafetensorsError(f"{path}: several index files {[i.name for i in indexes]}; pass one explicitly")
    if len(files) == 1:
        return Reader(read_header(files[0])[0], files[0])
    raise SafetensorsError(
        f"{path}: expected one *.safetensors file or a *.safetensors.index.json, found {[f.name for f in files]}")


def write_safetensors(path: str | Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Stream tensors into ``path``: header from ``specs`` (key -> (shape, dtype)), then ``produce(key)`` one at a
    time in ``specs`` order. Written to a temporary sibling and renamed."""
    path = Path(path)
    header, offset = {}, 0
    for key, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, (shape, dtype) in specs.items():
            arr = np.ascontiguousarray(produce(key))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{key}: produced {arr.dtype}{list(arr.shape)}, "
                                 f"declared {np.dtype(dtype)}{list(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)


def save_arrays(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write an in-memory dict of numpy arrays as one safetensors file."""
    write_safetensors(path, {k: (v.shape, v.dtype) for k, v in tensors.items()}, tensors.__getitem__, metadata)



def limit_malloc_caching(mmap_threshold: int = 1 << 20, arena_max: int = 2) -> bool:
    """glibc only: serve big allocations with mmap (returned to the OS on free) and cap malloc arenas.

    For converter CLIs: without it, freed tensor buffers stay in per-thread arenas (Orbax / TensorStore write from
    thread pools) and the process RSS creeps to several times the largest tensor. Returns False if unavailable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold, m_arena_max = -3, -8  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_arena_max, arena_max))
    except (OSError, AttributeError):
        return False
