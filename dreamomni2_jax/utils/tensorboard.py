"""A tensorboardX ``SummaryWriter`` that never imports torch."""
from __future__ import annotations

from pathlib import Path


def summary_writer(logdir: Path):
    """A tensorboardX ``SummaryWriter`` without importing torch: tensorboardX does ``try: import torch`` when it
    is imported (only to recognise torch tensors), which would pull torch into the runtime path whenever it is
    installed. ``sys.modules["torch"] = None`` makes that import fail fast for the duration of the import; numpy
    images need nothing from torch. If torch is already imported (by the caller), it is left alone."""
    import sys

    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=str(logdir))
