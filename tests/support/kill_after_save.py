"""Fault injection for tests/e2e/test_resume.py and test_klein_e2e.py: run scripts/train.py's ``main`` with a
checkpoint ``after_save`` hook that SIGKILLs this process once the checkpoint of step N is committed.

    python tests/support/kill_after_save.py N <scripts/train.py arguments>
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path


def kill_after(n: int):
    def hook(checkpointer, step: int) -> None:
        if step == n:
            checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("_train_script", Path(__file__).resolve().parents[2] / "scripts" /
                                                  "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    sys.exit(train.main(sys.argv[2:], after_save=kill_after(int(sys.argv[1]))))
