"""The converted-weights format: ``config.json`` + an Orbax ``params/`` checkpoint, written once by a converter
and restored, streaming and already sharded, by every model load.

``write_checkpoint(out_dir, items, config: dict, group_bytes=16 MiB, overwrite=False)`` writes
    ``out_dir/params`` (Orbax, one ``orbax.checkpoint.experimental.v1.partial`` save per ~group_bytes; stacked
    params stored as per-layer slices) and ``out_dir/config.json``, all into a temp dir next to ``out_dir``
    renamed at the end (never a partial ``out_dir``). Host memory ~ 2 x (largest tensor + group_bytes).
    ``overwrite=True`` replaces ``out_dir`` only if ``check_replaceable`` recognises it as a previous output of
    the same converter (``config["_converter"]``); anything else is refused, never deleted.
``is_converted(path)`` -> bool (``config.json`` + ``params/`` present).
``restore_params(ckpt_dir, abstract_state, stacked, param_sharding=None)`` restores into the abstract
    (``nnx.split(nnx.eval_shape(...))[1]``) state: every param is placed with ``param_sharding(path, shape)
    -> Sharding`` (dotted path of the *stacked* param and its full shape; ``replicated(mesh)`` by default =
    replicated on ``mesh`` or on the first device); stacked params are restored slice by slice (slice sharding
    = the param's NamedSharding spec without its leading axis) and stacked on device. Values are cast to the
    abstract dtypes. Returns the filled ``nnx.State``: ``nnx.merge(graphdef, state)``.
``load_params_from_items(items, abstract_state, stacked, param_sharding=None)`` does the same from an
    in-memory ``plan.items()`` stream (convert on the fly, nothing written).

"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from dreamomni2_jax.utils.atomic_write import atomic_dir
from dreamomni2_jax.utils.tree_paths import dotted

Shape = tuple[int, ...]
TargetSpec = dict[str, tuple[Shape, np.dtype]]
ParamSharding = Callable[[str, Shape], Any]  # (dotted path, full shape) -> jax.sharding.Sharding


class ConversionError(ValueError):
    """All problems found while validating a conversion, one per line."""


# --------------------------------------------------------------------------------------------- output format
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"  # Orbax checkpoint; per-layer slices of stacked params under "<module>.<i>.<rest>"


def _nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def is_converted(path: str | Path) -> bool:
    """True if ``path`` is a ``write_checkpoint`` output folder."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


# Converters recorded under an earlier module name in folders they wrote (``config.json`` ``_converter``).
RENAMED_CONVERTERS = {"convert.vae2": "convert.vae_flux2"}


def check_replaceable(out: Path, converter: str | None = None) -> None:
    """``--overwrite`` only ever replaces a previous output of the same converter: a folder holding exactly
    ``config.json`` (with the converter's ``_converted_from`` / ``_converter`` entries) and ``params/``.
    Anything else (an unrelated folder, a file, a source checkpoint) raises ``FileExistsError`` naming it."""
    out = Path(out)
    what = "refusing to overwrite"
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{out}: {what} it: not a folder written by this converter (remove it yourself)")
    extra = sorted(p.name for p in out.iterdir() if p.name not in (CONFIG_FILE, PARAMS_DIR))
    if not is_converted(out) or extra:
        raise FileExistsError(f"{out}: {what} it: not a converted component folder (only {CONFIG_FILE} and "
                              f"{PARAMS_DIR}/ expected; found {extra or sorted(p.name for p in out.iterdir())})")
    try:
        meta = json.loads((out / CONFIG_FILE).read_text())
    except (ValueError, OSError) as e:
        raise FileExistsError(f"{out / CONFIG_FILE}: {what} {out}: unreadable ({e})") from None
    if not isinstance(meta, dict) or "_converted_from" not in meta:
        raise FileExistsError(f"{out}: {what} it: {CONFIG_FILE} has no _converted_from entry, so it was not "
                              "written by a converter of this project")
    written_by = RENAMED_CONVERTERS.get(meta.get("_converter"), meta.get("_converter", converter))
    if converter and written_by != converter:
        raise FileExistsError(f"{out}: {what} it: written by {meta.get('_converter')}, not {converter}")


def write_checkpoint(out_dir: str | Path, items: Iterable[tuple[str, np.ndarray]], config: Mapping[str, Any],
                     group_bytes: int = 16 << 20, overwrite: bool = False) -> Path:
    """Write ``items`` as an Orbax checkpoint ``out_dir/params`` plus ``out_dir/config.json``.

    Arrays are flushed with an Orbax partial save as soon as the pending group reaches ``group_bytes`` (so big
    tensors are saved alone, small ones together). Orbax copies a group while saving, so host memory peaks at
    about 2 x (largest tensor + ``group_bytes``). Everything goes to a temp folder next to ``out_dir`` that is
    renamed at the end: ``out_dir`` is either complete or absent.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists():
        check_replaceable(out, config.get("_converter"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, replace=True) as tmp:
        group: dict[str, np.ndarray] = {}
        size, saves = 0, 0
        for path, arr in items:
            group[path] = arr
            size += arr.nbytes
            del arr
            if size >= group_bytes:  # flush before pulling the next item (Orbax copies the group while saving)
                ocp.partial.save(tmp / PARAMS_DIR, _nest(group))
                group, size, saves = {}, 0, saves + 1
        if group or not saves:
            ocp.partial.save(tmp / PARAMS_DIR, _nest(group))
        del group
        ocp.partial.finalize(tmp / PARAMS_DIR)
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------------- restore
def replicated(mesh=None) -> ParamSharding:
    """Default ``param_sharding``: replicated over ``mesh`` or on the first local device."""
    import jax

    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return lambda path, shape: sharding


def _slice_sharding(sharding):
    """Sharding of one layer slice of a stacked param (drop the leading axis of a NamedSharding spec)."""
    import jax

    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise TypeError(f"param_sharding must return NamedSharding or SingleDeviceSharding, got {type(sharding)}")


@functools.lru_cache(maxsize=None)
def _stacker(sharding):
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def _stack(slices, sharding):
    """Stack per-layer device arrays into one array placed with ``sharding`` (compiled once per shape)."""
    return _stacker(sharding)(*slices)


@functools.lru_cache(maxsize=None)
def _caster(sharding, dtype):
    import jax

    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


def _placed(array, dtype, sharding):
    """``array`` as ``dtype`` placed with ``sharding``. A restored ``jax.Array`` may span devices of other processes
    (it is never fetched to the host); a host array gives each process only its own shards."""
    import jax

    if isinstance(array, jax.Array):
        return _caster(sharding, np.dtype(dtype))(array)
    host = np.asarray(array).astype(dtype, copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class _Filler:
    """Collects restored arrays per (possibly stacked) param and rebuilds the ``nnx.State``."""

    def __init__(self, abstract_state, stacked: Mapping[str, int], param_sharding: ParamSharding):
        from flax import nnx

        self.flat = list(nnx.to_flat_state(abstract_state))
        self.stacked, self.values, self.pending = dict(stacked), {}, {}
        self.info = {}  # dotted full path -> (shape, dtype, sharding)
        for path, var in self.flat:
            v = var.get_value()
            key = dotted(path)
            self.info[key] = (tuple(v.shape), np.dtype(v.dtype), param_sharding(key, tuple(v.shape)))

    def locate(self, target: str) -> tuple[str, int | None]:
        """Per-layer target path -> (full param path, layer index or None)."""
        head, _, rest = target.partition(".")
        if head in self.stacked:
            idx, _, rest = rest.partition(".")
            return f"{head}.{rest}", int(idx)
        return target, None

    def abstract(self, target: str):
        import jax

        full, idx = self.locate(target)
        shape, dtype, sharding = self.info[full]
        if idx is None:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(shape[1:], dtype, sharding=_slice_sharding(sharding))

    def put(self, target: str, array) -> None:
        full, idx = self.locate(target)
        shape, dtype, sharding = self.info[full]
        if idx is None:
            self.values[full] = _placed(array, dtype, sharding)
            return
        slices = self.pending.setdefault(full, [None] * shape[0])
        slices[idx] = _placed(array, dtype, _slice_sharding(sharding))
        if all(s is not None for s in slices):
            self.values[full] = _stack(self.pending.pop(full), sharding)

    def state(self):
        from flax import nnx

        missing = [p for p in self.info if p not in self.values]
        if missing:
            raise ConversionError(f"{len(missing)} parameter(s) were not restored: {missing[:20]}")
        return nnx.from_flat_state([(path, var.replace(self.values[dotted(path)])) for path, var in self.flat])


def load_params_from_items(items: Iterable[tuple[str, np.ndarray]], abstract_state, stacked: Mapping[str, int],
                           param_sharding: ParamSharding | None = None):
    """Fill ``abstract_state`` from a ``(target_path, array)`` stream (e.g. ``Plan.items()``), nothing written."""
    filler = _Filler(abstract_state, stacked, param_sharding or replicated())
    for target, array in items:
        filler.put(target, array)
    return filler.state()


def restore_params(ckpt_dir: str | Path, abstract_state, stacked: Mapping[str, int],
                   param_sharding: ParamSharding | None = None):
    """Restore a ``write_checkpoint`` folder into ``abstract_state`` (see module docstring)."""
    import orbax.checkpoint.experimental.v1 as ocp

    ckpt_dir = Path(ckpt_dir).absolute()  # Orbax refuses relative paths
    filler = _Filler(abstract_state, stacked, param_sharding or replicated())
    groups: dict[str, list[str]] = {}  # one Orbax load per stacked param, one for all unstacked params
    for full, (shape, _, _) in filler.info.items():
        head = full.partition(".")[0]
        if head in filler.stacked:
            rest = full.partition(".")[2]
            groups[full] = [f"{head}.{i}.{rest}" for i in range(shape[0])]
        else:
            groups.setdefault("", []).append(full)
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    params = Path(ckpt_dir) / PARAMS_DIR
    with ctx:
        for targets in groups.values():
            tree = ocp.load(params, _nest({t: filler.abstract(t) for t in targets}))
            for t in targets:
                node = tree
                for p in t.split("."):
                    node = node[p]
                filler.put(t, node)
            del tree
    return filler.state()


def converted_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{param path: shape}`` saved in a ``write_checkpoint`` folder (from Orbax metadata; no data read).
    Raises ``ConversionError`` naming the folder when the metadata is missing or unreadable."""
    import orbax.checkpoint.experimental.v1 as ocp

    params = Path(path).absolute() / PARAMS_DIR
    try:
        tree = ocp.pytree_metadata(params).metadata
    except Exception as e:  # noqa: BLE001 - any failure means the folder is damaged
        raise ConversionError(f"{params}: unreadable Orbax metadata ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:300]})") from None
    out: dict[str, tuple[int, ...]] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = tuple(getattr(node, "shape", ()))

    walk(tree, "")
    return out


def verify_converted(path: str | Path, spec: TargetSpec) -> None:
    """A converted folder holds exactly the params of ``spec`` with their shapes, else ``ConversionError``."""
    path = Path(path)
    if not (path / PARAMS_DIR / "commit_success.txt").is_file():
        raise ConversionError(f"{path / PARAMS_DIR}: incomplete save (no commit_success.txt)")
    saved = converted_shapes(path)
    problems = [f"missing {k}" for k in sorted(set(spec) - set(saved))]
    problems += [f"unexpected {k}" for k in sorted(set(saved) - set(spec))]
    problems += [f"{k}: shape {list(saved[k])}, expected {list(spec[k][0])}" for k in sorted(set(spec) & set(saved))
                 if tuple(saved[k]) != tuple(spec[k][0])]
    if problems:
        raise ConversionError(f"{path}: damaged converted component ({len(problems)} problem(s)): "
                              + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


def load_component(path: str | Path, *, config_cls, build_plan: Callable, make_model: Callable,
                   param_dtype, stacked: Callable = lambda cfg: {}, param_sharding=None, config=None,
                   progress: bool = False):
    """Restore a converted folder (``config.json`` + Orbax ``params/``) or convert a source in memory.

    ``make_model(cfg)`` builds the module (called under ``nnx.eval_shape``); ``stacked(cfg)`` gives the
    leading-axis length of each scanned module; ``param_sharding(path, shape)`` places each param; ``progress``
    shows a bar while converting a source.
    """
    from flax import nnx

    path = Path(path)
    if is_converted(path):
        cfg = config or config_cls.from_json(path / "config.json")
        items = None
    else:
        kwargs = {"config": config} if config is not None else {}
        plan, cfg = build_plan(path, param_dtype=param_dtype, **kwargs)
        items = plan.items(progress=progress)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make_model(cfg)))
    if items is None:
        state = restore_params(path, state, stacked(cfg), param_sharding)
    else:
        state = load_params_from_items(items, state, stacked(cfg), param_sharding)
    return nnx.merge(graphdef, state)
