"""End-to-end demo on a tiny random model, CPU only (the README's `make demo`).

    python scripts/demo.py --out demo_out
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run("scripts/layout.py", "--config", "configs/demo.py", "--refs", "3")
    run("scripts/train.py", "--config", "configs/demo.py", "--print-config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
