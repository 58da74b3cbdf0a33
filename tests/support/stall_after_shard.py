"""Fault injection for tests/test_cache_multiprocess.py: run scripts/cache.py's ``main`` with a ``build_cache`` hook
that stops this process (it sleeps until killed) once it has written its first shard, so a test can SIGKILL every
process of a multi-process cache run at a known point (each process's first shard finished, the rest not).

    python tests/support/stall_after_shard.py <scripts/cache.py arguments>
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import time
from pathlib import Path


def stall(event: str, shard: int) -> None:
    if event == "shard":
        print(f"stalled after shard {shard}", flush=True)
        time.sleep(3600)


if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("_cache_script", Path(__file__).resolve().parents[2] / "scripts" /
                                                  "cache.py")
    cache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache)
    cache.build_cache = functools.partial(cache.build_cache, hook=stall)
    sys.exit(cache.main(sys.argv[1:]))
