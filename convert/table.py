"""Declarative safetensors -> Flax NNX parameter mapping engine (shared by all converters).

API (small on purpose; the Flux, VAE, CLIP and T5 converters all use only this)
-----------------------------------------------------------------------------
Target side: a converter describes the Flax parameters it must produce as ``TargetSpec``:
``dict[str, tuple[tuple[int, ...], np.dtype]]`` mapping a dotted param path (as in
``nnx.state(model, nnx.Param)`` flattened with "." joins, e.g. ``"x_embedder.kernel"``) to its shape. Params
stacked along a leading layer axis (nnx.scan / vmap-created blocks) are described *per layer*, with the layer index
spliced into the path right after the stacked module's name: ``"transformer_blocks.3.attn.to_q.kernel"``.
``target_spec(abstract_state, stacked={"transformer_blocks": 19, ...})`` builds this from ``nnx.eval_shape`` output.

Rules: ``Rule(targets, sources, hook=IDENTITY)`` — ``targets`` / ``sources`` are tuples of key *templates*;
``{name}`` placeholders (e.g. ``{i}``) are expanded by ``expand(rules, {"i": 19})`` into one concrete rule per
index. ``sources`` name keys in the safetensors checkpoint, ``targets`` name TargetSpec paths. A rule may be
1->1 (rename), 1->N (split a fused tensor) or N->1 (custom hook); the hook maps the list of source arrays to the list of
target arrays (same order as the templates).

Hooks (``Hook`` objects, composable with ``chain(h1, h2, ...)`` applied left to right) know both directions:
``hook(arrays: list[np.ndarray], target_shapes: list[shape]) -> list[np.ndarray]`` converts, and
``hook.source_shapes(target_shapes) -> list[source_shape]`` predicts the source shapes, so every shape is
validated from the safetensors headers before any data is read. Built-ins (elementwise ones act on every array):
  ``IDENTITY``                    copy (norm weight -> ``scale``, bias -> ``bias``, embeddings)
  ``LINEAR``                      torch Linear weight [out, in] -> Flax kernel [in, out]
  ``CONV``                        torch Conv weight [O, I, *k] -> Flax kernel [*k, I, O]
  ``split(axis=0)``               one fused source -> N targets split along ``axis``, sizes from the target
                                  shapes; e.g. fused qkv weight: ``chain(split(0), LINEAR)``, its bias: ``split(0)``
  ``swap_halves(axis=0)``         [a; b] -> [b; a] (BFL final-layer shift/scale order vs diffusers scale/shift)
  ``reshape(source_shape_fn)``    reshape to the target shape; ``source_shape_fn(target_shape)`` gives the
                                  expected source shape (e.g. 1x1 conv weight -> linear)
Write your own by subclassing ``Hook`` (override ``__call__`` and ``source_shapes``).

Engine:
  ``plan = Plan(reader, rules, spec, ignore=())`` validates everything at once and raises ONE ``ConversionError``
      listing every missing source key, unused source key (unless it fully matches an ``ignore`` regex), target
      path not produced, target produced twice, non-float source and shape mismatch (file + key + expected +
      actual). Nothing is read yet.
  ``plan.items(dtype=None, progress=True)`` yields ``(target_path, np.ndarray)`` rule by rule (sources read one
      at a time, tqdm bar over tensors), cast to ``dtype`` (default: the spec's dtype of that param).
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

Reader: ``convert.safetensors_io.open_checkpoint(path)`` -> ``Reader`` with ``keys()``, ``shape(key)``,
``dtype(key)``, ``file_of(key)``, ``read(key) -> np.ndarray`` (single file, sharded folder with
``*.safetensors.index.json``, or a folder with one ``*.safetensors``; BF16 via ml_dtypes; never pickle).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Shape = tuple[int, ...]
TargetSpec = dict[str, tuple[Shape, np.dtype]]
ParamSharding = Callable[[str, Shape], Any]  # (dotted path, full shape) -> jax.sharding.Sharding


class ConversionError(ValueError):
    """All problems found while validating a conversion, one per line."""


# ----------------------------------------------------------------------------------------------------- hooks
class Hook:
    """Source arrays -> target arrays, plus the inverse shape map used for validation."""

    name = "hook"

    def __call__(self, arrays: list[np.ndarray], target_shapes: list[Shape]) -> list[np.ndarray]:
        raise NotImplementedError

    def source_shapes(self, target_shapes: list[Shape]) -> list[Shape]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class _Elementwise(Hook):
    def __init__(self, name: str, fwd: Callable[[np.ndarray], np.ndarray], inv: Callable[[Shape], Shape]):
        self.name, self.fwd, self.inv = name, fwd, inv

    def __call__(self, arrays, target_shapes):
        return [self.fwd(a) for a in arrays]

    def source_shapes(self, target_shapes):
        return [self.inv(tuple(t)) for t in target_shapes]


def _conv_inv(t: Shape) -> Shape:
    return (t[-1], t[-2], *t[:-2])


IDENTITY = _Elementwise("identity", lambda a: a, lambda t: t)
LINEAR = _Elementwise("linear", lambda a: a.T, lambda t: t[::-1] if len(t) == 2 else ("<2-d>", *t))
CONV = _Elementwise("conv", lambda a: a.transpose(*range(2, a.ndim), 1, 0), _conv_inv)


def swap_halves(axis: int = 0) -> Hook:
    """[a; b] -> [b; a] along ``axis`` (its own inverse)."""
    return _Elementwise(f"swap_halves({axis})", lambda a: np.concatenate(np.split(a, 2, axis)[::-1], axis), lambda t: t)


def reshape(source_shape: Callable[[Shape], Shape]) -> Hook:
    """Reshape each source to its target shape; ``source_shape(target_shape)`` gives the expected source shape."""
    return _ReshapeHook(source_shape)


class _ReshapeHook(Hook):
    name = "reshape"

    def __init__(self, source_shape):
        self.inv = source_shape

    def __call__(self, arrays, target_shapes):
        return [a.reshape(t) for a, t in zip(arrays, target_shapes)]

    def source_shapes(self, target_shapes):
        return [tuple(self.inv(tuple(t))) for t in target_shapes]


class _Split(Hook):
    def __init__(self, axis: int):
        self.axis, self.name = axis, f"split({axis})"

    def __call__(self, arrays, target_shapes):
        (a,) = arrays
        cuts = np.cumsum([t[self.axis] for t in target_shapes])[:-1]
        return np.split(a, cuts, axis=self.axis)

    def source_shapes(self, target_shapes):
        ax, first = self.axis, list(target_shapes[0])
        rest = [tuple(np.delete(np.array(t, dtype=object), ax)) for t in target_shapes]
        if any(r != rest[0] for r in rest):
            return [("<targets differ off the split axis>",)]
        first[ax] = sum(t[ax] for t in target_shapes)
        return [tuple(first)]


def split(axis: int = 0) -> Hook:
    """One fused source -> N targets, split along ``axis`` with sizes from the (pre-split) target shapes."""
    return _Split(axis)


class _Chain(Hook):
    def __init__(self, hooks: Sequence[Hook]):
        self.hooks, self.name = tuple(hooks), "chain(" + ", ".join(map(repr, hooks)) + ")"

    def _shapes(self, target_shapes):
        shapes = [list(target_shapes)]  # shapes[k] = output shapes of hook len-1-k
        for h in reversed(self.hooks):
            shapes.append(h.source_shapes(shapes[-1]))
        return shapes[::-1]  # shapes[0] = sources, shapes[i+1] = output of hook i

    def __call__(self, arrays, target_shapes):
        shapes = self._shapes(target_shapes)
        for i, h in enumerate(self.hooks):
            arrays = h(arrays, shapes[i + 1])
        return arrays

    def source_shapes(self, target_shapes):
        return self._shapes(target_shapes)[0]


def chain(*hooks: Hook) -> Hook:
    """Apply hooks left to right (e.g. ``chain(split(0), LINEAR)``)."""
    return _Chain(hooks)


# ----------------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    targets: tuple[str, ...]
    sources: tuple[str, ...]
    hook: Hook = IDENTITY

    def __post_init__(self):
        for name in ("targets", "sources"):
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))


def _placeholders(templates: Iterable[str]) -> list[str]:
    names = []
    for t in templates:
        for _, field, _, _ in string.Formatter().parse(t):
            if field is not None and field not in names:
                names.append(field)
    return names


def expand(rules: Iterable[Rule], counts: Mapping[str, int]) -> list[Rule]:
    """Expand ``{name}`` placeholders over ``range(counts[name])`` (rule by rule, index-major)."""
    out = []
    for rule in rules:
        names = _placeholders(rule.targets + rule.sources)
        missing = [n for n in names if n not in counts]
        if missing:
            raise KeyError(f"no count for placeholder(s) {missing} in {rule}")
        for values in itertools.product(*(range(counts[n]) for n in names)):
            kw = dict(zip(names, values))
            out.append(Rule(tuple(t.format(**kw) for t in rule.targets),
                            tuple(s.format(**kw) for s in rule.sources), rule.hook))
    return out


# ------------------------------------------------------------------------------------------------ target spec
def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def target_spec(state, stacked: Mapping[str, int] = ()) -> TargetSpec:
    """Per-layer TargetSpec from an (abstract) ``nnx.State``; ``stacked`` = {top-level module: layer count}."""
    from flax import nnx

    spec: TargetSpec = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        name = str(path[0])
        if name in stacked:
            if not shape or shape[0] != stacked[name]:
                raise ValueError(f"{_dotted(path)}: expected leading layer axis {stacked[name]}, shape {shape}")
            for i in range(stacked[name]):
                spec[_dotted((name, i, *path[1:]))] = (shape[1:], dtype)
        else:
            spec[_dotted(path)] = (shape, dtype)
    return spec


# ------------------------------------------------------------------------------------------------------- plan
class Plan:
    """Validated conversion: ``Plan(reader, rules, spec, ignore=())``; ``items()`` streams the targets."""

    def __init__(self, reader, rules: Sequence[Rule], spec: TargetSpec, ignore: Sequence[str] = ()):
        self.reader, self.rules, self.spec = reader, list(rules), spec
        problems, produced, used = [], {}, set()
        for rule in self.rules:
            for t in rule.targets:
                if t in produced:
                    problems.append(f"target {t} produced twice: from {produced[t]} and {list(rule.sources)}")
                elif t not in spec:
                    problems.append(f"target {t} (from {list(rule.sources)}) is not a parameter of the model")
                produced[t] = list(rule.sources)
            missing = [s for s in rule.sources if s not in reader]
            used.update(rule.sources)
            for s in missing:
                problems.append(f"{reader.source}: missing key {s} (needed for {list(rule.targets)})")
            if missing or any(t not in spec for t in rule.targets):
                continue
            expected = rule.hook.source_shapes([spec[t][0] for t in rule.targets])
            for s, e in zip(rule.sources, expected):
                if tuple(reader.shape(s)) != tuple(e):
                    problems.append(f"{reader.file_of(s)}: {s}: expected shape {list(e)}, got "
                                    f"{list(reader.shape(s))} (for {list(rule.targets)})")
                elif reader.dtype(s).kind not in "fV":  # ml_dtypes floats (bf16, fp8) are kind "V"
                    problems.append(f"{reader.file_of(s)}: {s}: expected a float tensor, got {reader.dtype(s)}")
        for t, (shape, _) in spec.items():
            if t not in produced:
                problems.append(f"model parameter {t} {list(shape)} is not produced by any rule")
        pats = [re.compile(p) for p in ignore]
        for k in reader.keys():
            if k not in used and not any(p.fullmatch(k) for p in pats):
                problems.append(f"{reader.file_of(k)}: {k} {list(reader.shape(k))} is not used by any rule")
        if problems:
            raise ConversionError(f"cannot convert {reader.source} ({len(problems)} problem(s)):\n  "
                                  + "\n  ".join(problems))
        self.num_sources = sum(len(r.sources) for r in self.rules)
        self.max_source_bytes = max((reader.nbytes(s) for r in self.rules for s in r.sources), default=0)

    def items(self, dtype=None, progress: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(target_path, array)`` cast to ``dtype`` (default: the spec's dtype), one rule at a time."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.num_sources, unit="tensor", desc="convert", disable=not progress)
        try:
            for rule in self.rules:
                arrays = []
                for s in rule.sources:
                    arrays.append(self.reader.read(s))
                    bar.update(1)
                outs = rule.hook(arrays, [self.spec[t][0] for t in rule.targets])
                del arrays
                # Materialize owned, contiguous outputs and drop the sources (views may pin them) before yielding,
                # and keep no reference to a yielded array: memory here peaks at ~2x one source tensor.
                ready = []
                for t in rule.targets:
                    a = outs.pop(0)
                    want = np.dtype(dtype if dtype is not None else self.spec[t][1])
                    a = np.array(a, dtype=want, order="C", copy=None if a.flags.owndata else True)
                    if a.shape != self.spec[t][0]:
                        raise ConversionError(f"hook {rule.hook} produced {t} with shape {a.shape}, "
                                              f"expected {self.spec[t][0]}")
                    ready.append((t, a))
                del outs, a
                while ready:
                    yield ready.pop(0)
        finally:
            bar.close()


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
    if converter and meta.get("_converter", converter) != converter:
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
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
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
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


class _Filler:
    """Collects restored arrays per (possibly stacked) param and rebuilds the ``nnx.State``."""

    def __init__(self, abstract_state, stacked: Mapping[str, int], param_sharding: ParamSharding):
        from flax import nnx

        self.flat = list(nnx.to_flat_state(abstract_state))
        self.stacked, self.values, self.pending = dict(stacked), {}, {}
        self.info = {}  # dotted full path -> (shape, dtype, sharding)
        for path, var in self.flat:
            v = var.get_value()
            dotted = _dotted(path)
            self.info[dotted] = (tuple(v.shape), np.dtype(v.dtype), param_sharding(dotted, tuple(v.shape)))

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
        import jax

        full, idx = self.locate(target)
        shape, dtype, sharding = self.info[full]
        if idx is None:
            self.values[full] = jax.device_put(np.asarray(array).astype(dtype, copy=False), sharding)
            return
        slices = self.pending.setdefault(full, [None] * shape[0])
        if not isinstance(array, jax.Array):
            array = jax.device_put(np.asarray(array).astype(dtype, copy=False), _slice_sharding(sharding))
        slices[idx] = array
        if all(s is not None for s in slices):
            self.values[full] = _stack(self.pending.pop(full), sharding)

    def state(self):
        from flax import nnx

        missing = [p for p in self.info if p not in self.values]
        if missing:
            raise ConversionError(f"{len(missing)} parameter(s) were not restored: {missing[:20]}")
        return nnx.from_flat_state([(path, var.replace(self.values[_dotted(path)])) for path, var in self.flat])


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
