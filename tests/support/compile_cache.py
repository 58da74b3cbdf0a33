"""A persistent XLA compilation cache for one test module (its runs and their subprocesses compile the same step)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import jax

_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def persistent_compile_cache(path: Path) -> Iterator[Path]:
    """Cache every compilation under ``path`` while the context is open; the previous settings come back after."""
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # (re)initialised lazily from the settings below
    old = {n: getattr(jax.config, n) for n in _OPTIONS}
    for n, v in zip(_OPTIONS, (str(path), 0.0, 0)):
        jax.config.update(n, v)
    try:
        yield path
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()
