"""The non-array items of a training checkpoint (:mod:`dreamomni2_jax.checkpoint.store`): each process's data-iterator
state as an Orbax item (``data/process_<i>-of-<n>.json``) and the RNG key as JSON (typed or raw keys, exactly)."""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the directory and a step to resume from."""


# ------------------------------------------------------------------------------------------ per-process JSON item
def _encode_data_state(state: Any) -> dict:
    if state is None:
        return {"kind": "none"}
    if isinstance(state, (bytes, bytearray)):
        try:
            return {"kind": "bytes_utf8", "value": bytes(state).decode("utf-8")}
        except UnicodeDecodeError:
            return {"kind": "bytes_b64", "value": base64.b64encode(bytes(state)).decode("ascii")}
    return {"kind": "json", "value": state}


def _decode_data_state(blob: dict) -> Any:
    kind = blob.get("kind")
    if kind == "none":
        return None
    if kind == "bytes_utf8":
        return blob["value"].encode("utf-8")
    if kind == "bytes_b64":
        return base64.b64decode(blob["value"])
    if kind == "json":
        return blob["value"]
    raise ValueError(f"unknown data state kind {kind!r}")


class DataStateHandler(ocp.CheckpointHandler):
    """Writes each process's data-iterator state to ``process_<i>-of-<n>.json`` (hosts read their own)."""

    @staticmethod
    def _file(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataStateSave"):
        self._file(directory).write_text(json.dumps(_encode_data_state(args.state)))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
        path = self._file(directory)
        if path.exists():
            return _decode_data_state(json.loads(path.read_text()))
        return self._resplit(directory, path)

    @staticmethod
    def _resplit(directory: epath.Path, path: epath.Path):
        """A checkpoint written by another number of processes: the data position is global (the step of the
        global batch plan; every process takes its share of the same global batches), so every saved process must
        agree on it and any one of them continues exactly; process 0's state is returned."""
        saved = sorted(directory.glob("process_*-of-*.json")) if directory.exists() else []
        states = [_decode_data_state(json.loads(p.read_text())) for p in saved]
        steps = {s.get("step") for s in states if isinstance(s, dict)}
        if not states or len(steps) != 1 or not all(isinstance(s, dict) for s in states):
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise CheckpointError(f"{path} does not exist (files there: {found}); the checkpoint was written by a "
                                  f"different number of processes than the {jax.process_count()} running now and "
                                  "its per-process data positions do not agree, so the data position cannot be "
                                  "re-split")
        first = next(p for p in saved if p.name.startswith("process_0-"))
        log.info("data position of %s (written by %d process(es)) re-split over %d: step %s", directory,
                 len(saved), jax.process_count(), next(iter(steps)))
        return _decode_data_state(json.loads(first.read_text()))

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------------------------------------- RNG
def encode_rng(rng) -> dict | None:
    """A JAX key (typed or raw uint32, or None) -> JSON-able dict (exact round trip with :func:`decode_rng`)."""
    if rng is None:
        return None
    rng = jax.device_get(rng) if not isinstance(rng, jax.Array) else rng
    typed = isinstance(rng, jax.Array) and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.device_get(jax.random.key_data(rng) if typed else rng))
    impl = str(jax.random.key_impl(rng)) if typed else None
    return {"typed": typed, "impl": impl, "dtype": str(data.dtype), "shape": list(data.shape),
            "data": data.ravel().tolist()}


def decode_rng(blob: dict | None):
    if blob is None:
        return None
    data = np.asarray(blob["data"], dtype=blob["dtype"]).reshape(blob["shape"])
    if blob["typed"]:
        return jax.random.wrap_key_data(data, impl=blob["impl"])
    return jax.numpy.asarray(data)


__all__ = ["CheckpointError", "DataStateHandler", "DataStateSave", "DataStateRestore", "encode_rng", "decode_rng"]
