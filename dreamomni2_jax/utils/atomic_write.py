"""Write-to-temp-then-rename: a file or folder appears complete under its final name, or not at all.

Every temporary lives next to its destination (same file system, so the rename is atomic) under the one name
:func:`temp_name` gives, ``.<name>.tmp-<pid>``: hidden, tied to the writing process, and recognisable by the
stages that clean up after a killed run (they glob ``*.tmp-*``).

* :func:`atomic_file`: a context manager yielding the temporary path to write; renamed on success, removed on error.
* :func:`write_bytes` / :func:`write_text` / :func:`write_json`: one-call forms.
* :func:`atomic_dir`: the same for a folder (``replace=True`` swaps out an existing one via ``.<name>.old-<pid>``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def temp_name(path: str | Path, kind: str = "tmp") -> Path:
    """``dir/.<name>.<kind>-<pid>``: the temporary sibling of ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit rename it onto ``path``, on error delete it."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes | str) -> Path:
    """Atomically write ``data`` (a ``str`` is UTF-8 encoded) to ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON (``indent=2`` and a final newline by default)."""
    return write_bytes(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on normal exit rename it to ``out``, on error delete it.

    ``replace=True``: an existing ``out`` is moved aside (``.<name>.old-<pid>``), the new folder renamed in, and the
    old one deleted; otherwise an existing ``out`` makes the rename fail (``OSError``) and nothing changes.
    """
    out = Path(out)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if replace and out.exists():
            old = temp_name(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
