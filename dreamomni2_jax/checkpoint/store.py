"""Training checkpoints (Orbax) with exact resume: adapter + optimizer state, step, RNG, data iterator, config.

Layout of a run directory::

    RUN/checkpoints/<step>/state/    Orbax pytree: whatever the loop passes as ``state`` (LoRA params under
                                     ``state["lora"]``, optimizer state, ...); never the frozen base weights
    RUN/checkpoints/<step>/meta/     JSON (process 0): step, RNG key, process count, format version, and a digest of
                                 every saved array (:mod:`dreamomni2_jax.utils.integrity`), verified on every restore
    RUN/checkpoints/<step>/data/     one JSON per process: ``process_<i>-of-<n>.json`` = that host's iterator state
    RUN/checkpoints/<step>/config/   JSON (process 0): the resolved :class:`~dreamomni2_jax.config.Config`

Every save goes to ``<step>.orbax-checkpoint-tmp*`` and is renamed once all of it is written (Orbax's
tmp-dir + finalize protocol), so a save killed at any point never leaves a directory that counts as a
checkpoint. All processes call :meth:`RunCheckpointer.save` / ``restore``; Orbax coordinates the hosts.

Preemption: the entry point turns SIGTERM into a flag (:class:`dreamomni2_jax.train.preemption.SigtermFlag`, single
process); the loop asks :meth:`RunCheckpointer.should_stop` after each step, then saves (``force=True``), waits and
exits 0. With several processes JAX's own preemption sync point is used instead (``jax.distributed`` registers
SIGTERM).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dreamomni2_jax.utils import integrity
from dreamomni2_jax.checkpoint.items import (  # noqa: F401 - CheckpointError, DataStateHandler: public here too
    CheckpointError, DataStateHandler, DataStateRestore, DataStateSave, decode_rng, encode_rng)
from dreamomni2_jax.config import Config, ConfigError, from_dict
from dreamomni2_jax.utils.tree_paths import dotted

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
ITEMS = ("state", "meta", "data", "config")
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ the manager
def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """``RUN`` / ``RUN/checkpoints`` / ``RUN/checkpoints/<step>`` (+ optional ``step``) -> (checkpoints dir, step).

    Without ``step`` the latest complete step is used. Raises :class:`CheckpointError` naming the path.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.name.isdigit() and ((path / "state").exists() or path.parent.name == CHECKPOINTS_DIR):
        if step is not None and step != int(path.name):
            raise CheckpointError(f"{path} is the checkpoint of step {path.name}, but step {step} was requested")
        return path.parent, int(path.name)
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    steps = complete_steps(root)
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {root}" + _tmp_note(root))
    if step is None:
        return root, steps[-1]
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} under {root}; available steps: {steps}")
    return root, step


def complete_steps(root: str | Path) -> list[int]:
    """Steps with a finalized directory under ``root`` (temp dirs of unfinished saves are not steps)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _tmp_note(root: Path) -> str:
    tmps = sorted(p.name for p in root.iterdir() if ".orbax-checkpoint-tmp" in p.name) if root.is_dir() else []
    return f" (unfinished saves, ignored: {tmps})" if tmps else ""


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {dotted(p): tuple(getattr(v, "shape", ())) for p, v in leaves}


def _check_structure(step_dir: Path, saved_metadata, abstract_state) -> None:
    """Saved state vs the one the caller expects: one error listing every missing / extra / reshaped leaf."""
    saved, want = _shapes(saved_metadata), _shapes(abstract_state)
    problems = [f"missing in checkpoint: {k} {list(want[k])}" for k in sorted(set(want) - set(saved))]
    problems += [f"not expected by the model/optimizer: {k} {list(saved[k])}" for k in sorted(set(saved) - set(want))]
    problems += [f"shape {k}: checkpoint {list(saved[k])}, expected {list(want[k])}"
                 for k in sorted(set(saved) & set(want)) if saved[k] != want[k]]
    if problems:
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise CheckpointError(f"{step_dir / 'state'} does not match the current training state (was the LoRA or "
                              f"optimizer config changed?):\n  " + "\n  ".join(problems[:30]) + more)


def _short(err: Exception, limit: int = 400) -> str:
    text = (str(err).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    return text if len(text) <= limit else text[:limit] + " ..."


class RunCheckpointer:
    """Orbax ``CheckpointManager`` for one run directory; see the module docstring. Use :func:`open_run`."""

    def __init__(self, run_dir: str | Path, cfg: Config | None = None, *, every_steps: int | None = None,
                 max_to_keep: int | None = None, async_save: bool | None = None, read_only: bool = False,
                 root: str | Path | None = None, adapter: dict | None = None,
                 after_save: Callable[["RunCheckpointer", int], None] | None = None):
        """``after_save(checkpointer, step)``: called after every save that started (e.g. fault injection in
        tests: wait for the write, then kill the process)."""
        ck = cfg.checkpoint if cfg is not None else None
        self.after_save = after_save
        self.adapter = dict(adapter) if adapter is not None else None  # lora_metadata(model), saved in meta
        self.run_dir = Path(run_dir).absolute()
        self.root = Path(root).absolute() if root is not None else self.run_dir / CHECKPOINTS_DIR
        self.cfg = cfg
        self.every_steps = every_steps if every_steps is not None else (ck.every_steps if ck else 500)
        keep = max_to_keep if max_to_keep is not None else (ck.max_to_keep if ck else 3)
        async_save = async_save if async_save is not None else (ck.async_save if ck else True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)
        self._mgr = ocp.CheckpointManager(epath.Path(self.root), item_names=ITEMS, options=options)
        self._closed = False

    # -------------------------------------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.root / str(step)

    def should_save(self, step: int) -> bool:
        """Periodic save due at ``step`` (every ``checkpoint.every_steps``)."""
        return step > 0 and step % self.every_steps == 0

    # ----------------------------------------------------------------------------------------------- save
    def save(self, step: int, state: Any, data_state: Any = None, rng=None, force: bool = False) -> bool:
        """Save if due (``force`` saves regardless); returns whether a save started. Every process must call it.

        ``state``: pytree of arrays (LoRA params under ``"lora"``, optimizer state, ...); ``data_state``: this
        process's ``iterator.get_state()`` (dict or bytes); ``rng``: a JAX key (typed or raw uint32) or None.
        With async saves the arrays are copied to host before returning and written in the background.
        """
        if not (force or self.should_save(step)) or step in self._mgr.all_steps():
            return False
        if not integrity.tree_finite(state):
            log.error("step %d: the training state holds NaN / inf values; NOT saving it (the last good checkpoint "
                      "stays the latest)", step)
            return False
        meta = {"format": FORMAT_VERSION, "step": int(step), "rng": encode_rng(rng),
                "process_count": jax.process_count(), "lora": self.adapter,
                "digest": integrity.digest_record(state)}
        config = self.cfg.to_dict() if self.cfg is not None else {}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                                  data=DataStateSave(data_state), config=ocp.args.JsonSave(config))
        saved = self._mgr.save(step, args=args, force=True)
        if saved and self.after_save is not None:
            self.after_save(self, step)
        return saved

    # -------------------------------------------------------------------------------------------- restore
    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the ``state`` item of ``step``, onto ``abstract_state``'s shardings (no data / RNG / checks)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._mgr.restore(step, args=args)["state"]

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, Any, Any, int]:
        """-> ``(state, data_state, rng, step)``; latest step when ``step`` is None.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` (with shardings) matching what was saved; arrays
        are restored directly with those shardings. ``None`` restores the saved structure as host arrays.
        A corrupt or incomplete step raises :class:`CheckpointError` naming it and the last intact step.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint under {self.root}" + _tmp_note(self.root))
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} under {self.root}; available steps: {steps}")
        try:
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_dir(step) / "state"))
        except Exception as e:  # noqa: BLE001 - unreadable metadata means the directory is unusable
            raise self._corrupt_error(step, abstract_state, e) from e
        if abstract_state is not None:
            _check_structure(self.step_dir(step), saved, abstract_state)
        data_dir = self.step_dir(step) / "data"
        if data_dir.is_dir() and not DataStateHandler._file(epath.Path(data_dir)).exists():
            DataStateHandler().restore(epath.Path(data_dir))  # raises: written by another number of processes
        try:
            out = self._restore(step, abstract_state)
        except Exception as e:  # noqa: BLE001 - any failure here means the directory is unusable
            raise self._corrupt_error(step, abstract_state, e) from e
        return out

    def _restore(self, step: int, abstract_state: Any):
        d = self.step_dir(step)
        missing = [i for i in ITEMS if not (d / i).is_dir()]
        if missing:
            raise CheckpointError(f"{d}: missing item folder(s) {missing}")
        state_args = ocp.args.StandardRestore(abstract_state) if abstract_state is not None else \
            ocp.args.StandardRestore()
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=state_args, meta=ocp.args.JsonRestore(), data=DataStateRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            named = meta.get("step") if isinstance(meta, dict) else meta
            raise CheckpointError(f"{d / 'meta'}: metadata names step {named!r}")
        verify_digest(d, meta, out["state"])
        try:
            rng = decode_rng(meta.get("rng"))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{d / 'meta'}: unreadable RNG entry ({type(e).__name__}: {e})") from None
        return out["state"], out["data"], rng, step

    def _corrupt_error(self, step: int, abstract_state: Any, err: Exception) -> CheckpointError:
        intact = None
        for s in reversed([s for s in self.all_steps() if s < step]):
            try:
                self._restore(s, abstract_state)
                intact = s
                break
            except Exception:  # noqa: BLE001
                continue
        hint = (f"the last intact checkpoint is step {intact} ({self.step_dir(intact)}): resume from it with "
                f"--resume {self.step_dir(intact)} --branch (later steps are moved aside, not deleted)"
                if intact is not None
                else "no earlier intact checkpoint exists")
        return CheckpointError(f"checkpoint {self.step_dir(step)} is corrupt or incomplete "
                               f"({type(err).__name__}: {_short(err)}); {hint}")

    def restore_config(self, step: int | None = None) -> Config:
        """The resolved config saved with ``step`` (latest by default)."""
        return read_config(self.step_dir(step if step is not None else self.latest_step()))

    # ------------------------------------------------------------------------------------------ preemption
    def should_stop(self, step: int, signalled: bool = False) -> bool:
        """True once a preemption was signalled (same answer on every process at the same step): with one process
        ``signalled`` (e.g. :attr:`dreamomni2_jax.train.preemption.SigtermFlag.raised`), with several the multi-host sync
        point of ``jax.distributed``'s preemption service."""
        if jax.process_count() > 1:
            return bool(self._mgr.reached_preemption(step))
        return signalled

    # ------------------------------------------------------------------------------------------- teardown
    def wait(self) -> None:
        """Block until background saves are committed."""
        self._mgr.wait_until_finished()

    def reload(self) -> None:
        """Re-read the steps on disk (after checkpoints were moved aside)."""
        self._mgr.reload()

    def close(self) -> None:
        """Wait for pending saves and release the manager; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_run(run_dir: str | Path, cfg: Config | None = None, **kwargs) -> RunCheckpointer:
    """Checkpointer for ``run_dir`` (created if needed) using ``cfg.checkpoint``; kwargs override those fields."""
    return RunCheckpointer(run_dir, cfg, **kwargs)


def _read_meta(step_dir: Path) -> dict:
    path = Path(step_dir) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is a {type(meta).__name__}, not a JSON object")
    return meta


def verify_digest(step_dir: Path, meta: dict, state: Any) -> None:
    """The restored ``state`` matches the digest saved in ``meta``, else :class:`CheckpointError` naming the
    damaged arrays. Checkpoints written before digests existed are accepted with a warning."""
    record = meta.get("digest")
    if record is None:
        log.warning("%s: no digest saved (older checkpoint format); its arrays cannot be verified", step_dir)
        return
    if not isinstance(record, dict):
        raise CheckpointError(f"{Path(step_dir) / 'meta'}: 'digest' entry is a {type(record).__name__}")
    bad = integrity.digest_mismatches(record, state)
    if bad:
        raise CheckpointError(f"{step_dir}: saved arrays do not match their digest (damaged on disk): "
                              f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")


def read_config(step_dir: str | Path) -> Config:
    """The :class:`Config` saved in a checkpoint step directory."""
    path = Path(step_dir) / "config" / "metadata"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {step_dir} is not a complete checkpoint")
    try:
        return from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read the saved config ({e})") from None


def load_state(path: str | Path, step: int | None = None) -> tuple[Any, int, Path]:
    """Restore only a checkpoint's ``state`` item onto this host's first device, whatever mesh or number of
    processes wrote it (for export tools): -> (state, step, step_dir)."""
    root, step = resolve_checkpoint(path, step)
    step_dir = root / str(step)
    ckpt = RunCheckpointer(root.parent, read_only=True, async_save=False, root=root)
    try:
        tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir / "state")).tree
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
        state = ckpt.restore_state(step, abstract)
        verify_digest(step_dir, _read_meta(step_dir), state)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable in any way: name the directory
        raise CheckpointError(f"checkpoint {step_dir} is corrupt or incomplete ({type(e).__name__}: {_short(e)}); "
                              f"complete steps under {root}: {complete_steps(root)}") from e
    finally:
        ckpt.close()
    return state, step, step_dir


def load_lora(path: str | Path, step: int | None = None, ema: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """The LoRA adapters of a checkpoint (``state["lora"]``; ``ema``: their EMA, ``state["ema"]``) -> (flat
    ``{module.lora_A|B: array}``, DoRA: also ``module.lora_magnitude_vector``; metadata). A schedule-free run's
    adapters are its evaluation point (``optimizers.saved_eval_params``).

    metadata: ``{"rank", "alpha", "variant", "targets", "step", "step_dir"}``; alpha comes from the adapter metadata
    saved with the checkpoint, else from the saved config (``lora.alpha``).
    """
    state, step, step_dir = load_state(path, step)
    if not isinstance(state, dict) or "lora" not in state:
        raise CheckpointError(f"{step_dir / 'state'} has no 'lora' entry (top-level keys: "
                              f"{sorted(state) if isinstance(state, dict) else type(state).__name__})")
    if ema and "ema" not in state:
        raise CheckpointError(f"{step_dir}: no EMA adapters in this checkpoint (trained with train.ema_decay=0)")
    adapters = state["ema"] if ema else state["lora"]
    if not ema:
        # deferred import, and the one import running up a layer: a schedule-free run's saved evaluation point
        from dreamomni2_jax.train.optimizers import saved_eval_params

        adapters = saved_eval_params(state.get("opt_state"), adapters)
    flat = {dotted(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    bad = sorted(k for k in flat if not k.endswith((".lora_A", ".lora_B", ".lora_magnitude_vector")))
    if bad or not flat:
        raise CheckpointError(f"{step_dir / 'state'}: 'lora' entry has non-adapter leaves {bad[:20]} "
                              f"({len(flat)} leaves)")
    meta = _read_meta(step_dir)
    adapter = meta.get("lora") or {}
    if "alpha" in adapter:
        alpha = float(adapter["alpha"])
    else:
        cfg = read_config(step_dir)
        if cfg.lora.init_from:
            raise CheckpointError(f"{step_dir}: no adapter metadata saved and lora.init_from="
                                  f"{cfg.lora.init_from!r} may have changed alpha; cannot tell the LoRA alpha")
        alpha = cfg.lora.alpha
    rank = int(next(v for k, v in flat.items() if k.endswith(".lora_A")).shape[-1])
    targets = sorted({k.rsplit(".", 1)[0] for k in flat})
    variant = "dora" if any(k.endswith(".lora_magnitude_vector") for k in flat) else "lora"
    return flat, {"rank": rank, "alpha": alpha, "variant": variant, "targets": targets, "step": step,
                  "step_dir": str(step_dir)}


__all__ = ["CheckpointError", "RunCheckpointer", "open_run", "read_config", "load_state", "resolve_checkpoint",
           "complete_steps", "load_lora", "verify_digest"]
