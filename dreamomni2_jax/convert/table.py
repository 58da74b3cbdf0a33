"""Declarative safetensors -> Flax NNX parameter mapping engine (shared by all converters).

API (small on purpose; every converter uses only this: both transformers and VAEs, CLIP, T5, Qwen3)
----------------------------------------------------------------------------------------------------
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
The output format (``write_checkpoint``, ``restore_params``, ...) lives in :mod:`dreamomni2_jax.weights.store`.

Reader: ``dreamomni2_jax.weights.safetensors_io.open_checkpoint(path)`` -> ``Reader`` with ``keys()``, ``shape(key)``,
``dtype(key)``, ``file_of(key)``, ``read(key) -> np.ndarray`` (single file, sharded folder with
``*.safetensors.index.json``, or a folder with one ``*.safetensors``; BF16 via ml_dtypes; never pickle).
"""
from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from dreamomni2_jax.weights.store import (  # noqa: F401 - re-exported: the engine's error and types
    ConversionError, Shape, TargetSpec, dotted,
)



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
                raise ValueError(f"{dotted(path)}: expected leading layer axis {stacked[name]}, shape {shape}")
            for i in range(stacked[name]):
                spec[dotted((name, i, *path[1:]))] = (shape[1:], dtype)
        else:
            spec[dotted(path)] = (shape, dtype)
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
