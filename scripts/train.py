"""Train a DreamOmni2 / Flux Kontext LoRA.

    python scripts/train.py --config configs/tpu_v5.py [--set section.key=value ...] [--print-config]
"""
from __future__ import annotations

import argparse
import sys

from dreamomni2_jax.config import ConfigError, load_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--config", required=True, help="Python config file defining get_config()")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(cfg.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
