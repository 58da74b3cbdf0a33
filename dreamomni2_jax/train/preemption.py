"""SIGTERM as a flag: installed by the entry point (``scripts/train.py``) for the duration of a ``with`` block, never
by a library class, so importing or constructing anything in the package leaves the process's signal handling alone.

With several processes JAX's own preemption service owns SIGTERM (``jax.distributed`` registers it) and this
installs nothing; :meth:`dreamomni2_jax.checkpoint.store.RunCheckpointer.should_stop` asks the multi-host sync point then.
"""
from __future__ import annotations

import logging
import signal

import jax

log = logging.getLogger(__name__)


class SigtermFlag:
    """``with SigtermFlag() as flag:`` -- a SIGTERM inside the block sets ``flag.raised`` instead of killing the
    process (single process only); the previous handler is restored on exit."""

    def __init__(self):
        self.raised = False
        self._prev = None

    def __enter__(self) -> "SigtermFlag":
        if jax.process_count() == 1:
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: finishing the current step, then checkpointing and exiting")
        self.raised = True
