"""Tiny CPU demo: trains a LoRA on the tiny random model and data that `make demo` generates.

    make demo                                  # does everything below
    python scripts/train.py --config configs/demo.py \
        --set model.path=demo_out/model --set data.cache_dir=demo_out/cache --set train.run_dir=demo_out/run

Paths are under ``$DREAMOMNI2_DEMO_OUT`` (default ``demo_out``; ``scripts/demo.py --out`` sets it).
"""
import os

from dreamomni2_jax.config import Config
from dreamomni2_jax.config_common import tiny_demo


def get_config() -> Config:
    return tiny_demo(os.environ.get("DREAMOMNI2_DEMO_OUT", "demo_out"), size=128)
