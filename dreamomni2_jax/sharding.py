"""Device mesh, sharding rules and multi-host set-up: the one place where placement is decided.

Mesh axes are ``("data", "fsdp", "tensor")``; with ``mesh.dcn_data > 1`` (several TPU slices over the data-center
network) a leading ``"dcn_data"`` axis, one entry per slice, comes first. Logical axes map onto them through
:data:`LOGICAL_RULES`:

* ``batch`` (activations / data) -> ``("data", "fsdp")``, on a multi-slice mesh ``("dcn_data", "data", "fsdp")``
  (:func:`batch_axes`); parameters and optimizer state are never sharded over ``dcn_data`` (replicated per slice);
* ``heads`` / ``mlp`` (the output dim of q/k/v/MLP-up projections, the input dim of out/MLP-down) -> ``tensor``;
* ``layers`` (the leading axis of stacked blocks) -> never sharded (``lax.scan`` slices it);
* every other parameter dim is a candidate for ``fsdp``: the largest one divisible by the fsdp size is sharded.

Which Linear gets ``heads`` / ``mlp`` on which dim follows from its role in the model schema
(``models/<model>_schema.py``, :data:`dreamomni2_jax.models.roles.ROLE_AXES`); a Linear ``kernel`` / ``bias`` that
no schema declares raises :class:`dreamomni2_jax.models.roles.SchemaError` (a renamed module is never silently
FSDP-only).

:func:`param_sharding` gives ``(dotted path, shape) -> NamedSharding``, the callable ``load_flux`` takes, so base
weights are created sharded (nothing unsharded on one host). Adapters and optimizer moments use the shape-only
FSDP rule, so a moment is placed like its parameter.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dreamomni2_jax.config import MeshConfig
from dreamomni2_jax.models.schemas import declared_linear, stacked_groups
from dreamomni2_jax.utils.tree_paths import dotted

AXES = ("data", "fsdp", "tensor")
DCN_AXIS = "dcn_data"  # leading axis of a multi-slice mesh (mesh.dcn_data > 1): data parallel across slices
BATCH_AXES = ("data", "fsdp")  # within a slice; see batch_axes()
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "embed": "fsdp",
}
STACKED_PREFIXES = tuple(f"{g}." for g in stacked_groups())


class MeshError(ValueError):
    """The mesh config does not fit the devices, or a batch does not fit the mesh."""


# --------------------------------------------------------------------------- mesh and processes


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve ``-1`` to the remaining devices; the product must equal ``n_devices``."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise MeshError(f"mesh (data, fsdp, tensor)={tuple(sizes)}: {n_devices} devices not divisible by {fixed}")
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise MeshError(f"mesh (data, fsdp, tensor)={tuple(sizes)} needs {math.prod(sizes)} devices, "
                        f"have {n_devices}")
    return tuple(sizes)


def device_grid(mesh_cfg: MeshConfig, devices) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(devices as an array of the mesh shape, axis names)``: :func:`make_mesh` without the ``Mesh``.

    ``mesh.dcn_data == 1``: axes :data:`AXES` over all devices (``mesh_utils.create_device_mesh``, topology-aware on
    TPU/GPU, else a plain reshape). ``> 1``: ``("dcn_data", *AXES)``, one ``dcn_data`` entry per slice
    (``mesh_utils.create_hybrid_device_mesh`` on the devices' ``slice_index``), data / fsdp / tensor within a slice."""
    from jax.experimental import mesh_utils

    devices = list(devices)
    n_dcn = int(getattr(mesh_cfg, "dcn_data", 1))
    if n_dcn == 1:
        shape = mesh_shape(mesh_cfg, len(devices))
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices, dtype=object).reshape(shape)
        return grid, AXES
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None in slices or len(slices) != n_dcn:
        found = "have no slice_index" if None in slices else f"are in {len(slices)} slice(s)"
        raise MeshError(f"mesh.dcn_data={n_dcn} needs {n_dcn} TPU slices (devices with slice_index 0..{n_dcn - 1}); "
                        f"the {len(devices)} devices {found} (GPU hosts are not slices: use mesh.data for data "
                        "parallelism across hosts)")
    if len(devices) % n_dcn:
        raise MeshError(f"mesh.dcn_data={n_dcn}: {len(devices)} devices do not split evenly over the slices")
    ici = mesh_shape(mesh_cfg, len(devices) // n_dcn)
    try:
        grid = mesh_utils.create_hybrid_device_mesh((1, *ici), (n_dcn, 1, 1, 1), devices=devices)
    except ValueError as e:  # slices of different sizes
        raise MeshError(f"mesh.dcn_data={n_dcn}, per slice (data, fsdp, tensor)={ici}: {e}") from e
    return grid, (DCN_AXIS, *AXES)


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    """``Mesh`` over all (or the given) devices with axes ``("data", "fsdp", "tensor")`` (multi-slice:
    ``("dcn_data", "data", "fsdp", "tensor")``, see :func:`device_grid`), Auto axis types."""
    grid, axes = device_grid(mesh_cfg, jax.devices() if devices is None else devices)
    return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))


def multihost_env(environ: Mapping[str, str] | None = None) -> str | None:
    """Name of the detected multi-process launcher (``"jax"``, ``"openmpi"``, ``"slurm"``, ``"tpu-gke"``,
    ``"tpu-vm"``) or None; see :mod:`dreamomni2_jax.multihost` for the detection order."""
    from dreamomni2_jax import multihost

    launch = multihost.detect(environ)
    return None if launch is None else launch.launcher


def initialize_distributed(mesh_cfg: MeshConfig, environ: Mapping[str, str] | None = None) -> bool:
    """``jax.distributed.initialize()`` when ``mesh.distributed`` is "on", or "auto" and a multi-host launcher
    is detected (:func:`dreamomni2_jax.multihost.initialize`). Must run before any other JAX call. Returns whether
    it initialized."""
    from dreamomni2_jax import multihost

    return multihost.initialize(mesh_cfg, environ) is not None


# --------------------------------------------------------------------------- parameter shardings


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def fsdp_spec(shape: tuple[int, ...], mesh: Mesh, spec: list | None = None, skip: tuple[int, ...] = ()) -> P:
    """Shard the largest dim divisible by the fsdp size (ties -> the last one) that ``spec`` leaves free."""
    spec = list(spec) if spec is not None else [None] * len(shape)
    n = mesh.shape["fsdp"]
    if n > 1:
        free = [i for i, d in enumerate(shape) if spec[i] is None and i not in skip and d % n == 0 and d >= n]
        if free:
            best = max(free, key=lambda i: (shape[i], i))
            spec[best] = LOGICAL_RULES["embed"]
    return P(*spec)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of the base param at dotted ``path`` (layer axis included in ``shape`` for stacked blocks)."""
    shape = tuple(int(d) for d in shape)
    spec: list = [None] * len(shape)
    if path.endswith("lora_dropout_key"):  # PRNG key data: replicated
        return P(*spec)
    skip = (0,) if path.startswith(STACKED_PREFIXES) and len(shape) >= 2 else ()
    module, _, name = path.rpartition(".")
    if name in ("kernel", "bias"):
        din, dout = declared_linear(module).axes
        dims = {}
        if name == "kernel" and len(shape) >= 2:
            dims = {len(shape) - 2: din, len(shape) - 1: dout}
        elif name == "bias" and len(shape) >= 1:
            dims = {len(shape) - 1: dout}
        for i, logical in dims.items():
            axis = LOGICAL_RULES.get(logical) if logical in ("heads", "mlp") else None
            if axis is not None and shape[i] % _axis_size(mesh, axis) == 0 and _axis_size(mesh, axis) > 1:
                spec[i] = axis
    return fsdp_spec(shape, mesh, spec, skip)


def param_sharding(mesh: Mesh) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """``(dotted path, shape) -> NamedSharding`` for base params; pass it to ``load_flux(param_sharding=...)``."""
    return lambda path, shape: NamedSharding(mesh, param_spec(path, shape, mesh))


def shape_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Shape-only FSDP rule (adapters, optimizer moments, small state); scalars are replicated."""
    return NamedSharding(mesh, fsdp_spec(tuple(shape), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def model_state_shardings(state, mesh: Mesh, *, by_path: bool = True):
    """Shardings for an ``nnx.State`` (or any pytree) of params: :func:`param_spec` by dotted path
    (``by_path=False``: shape-only rule)."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if by_path:
            return NamedSharding(mesh, param_spec(dotted(path), shape, mesh))
        return shape_sharding(mesh, shape)

    return jax.tree_util.tree_map_with_path(one, state)


def shard(tree, shardings):
    """``jax.device_put`` every leaf with its sharding (a jitted identity, so nothing is gathered on one host)."""
    return jax.jit(lambda t: t, out_shardings=shardings)(tree)


def shardings_of(tree):
    """The sharding of every (already placed) array leaf."""
    return jax.tree.map(lambda x: x.sharding, tree)


# --------------------------------------------------------------------------- batches


def batch_axes(mesh) -> tuple[str, ...]:
    """Mesh axes the batch (leading) axis is split over: ``("data", "fsdp")``, preceded by ``"dcn_data"`` on a
    multi-slice mesh."""
    return ((DCN_AXIS,) if DCN_AXIS in mesh.shape else ()) + BATCH_AXES


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over :func:`batch_axes`, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    return _axis_size(mesh, batch_axes(mesh))


def check_batch_size(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """Each micro-batch (``global_batch / grad_accum``) must split evenly over the (dcn_data x) data x fsdp
    devices."""
    n = batch_shards(mesh)
    if global_batch % grad_accum or (global_batch // grad_accum) % n:
        raise MeshError(f"data.batch_size={global_batch} with optim.grad_accum={grad_accum} gives micro-batches of "
                        f"{global_batch / grad_accum:g} samples, which must be a multiple of "
                        f"{' x '.join(batch_axes(mesh))} = {n}")


def put_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of the batch (leading axis = local samples), sharded on batch.

    Single-process: the slice is the whole batch. Multi-process: each process passes its own consecutive shard
    (``jax.make_array_from_process_local_data``)."""
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, global_shape)
    return out


def like_params(tree, params, param_shardings, mesh: Mesh):
    """Shardings for a pytree that embeds copies of ``params``' structure (e.g. optimizer state: Adam ``mu`` /
    ``nu``): in those subtrees a leaf of its parameter's shape gets the parameter's sharding (a factored moment
    of another shape, e.g. Adafactor's ``v_row``, is replicated); every other leaf is replicated."""
    target = jax.tree.structure(params)
    shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
    specs = target.flatten_up_to(param_shardings)

    def one(sub):
        if jax.tree.structure(sub) == target:
            leaves = [s if tuple(x.shape) == shape else replicated(mesh)
                      for x, shape, s in zip(jax.tree.leaves(sub), shapes, specs)]
            return target.unflatten(leaves)
        return replicated(mesh)

    return jax.tree.map(one, tree, is_leaf=lambda x: jax.tree.structure(x) == target)


def place(tree, shardings):
    """Put every leaf on its sharding, leaving already-placed leaves untouched (no copy of loaded weights).

    Host / single-device values are copied in with ``device_put`` (one process) or built shard by shard from the
    (identical on every process) host value with ``make_array_from_callback`` (multi-process). Abstract leaves
    (``jax.ShapeDtypeStruct``, ahead-of-time compilation) get the sharding attached; nothing is allocated."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    out = []
    for x, s in zip(leaves, targets):
        if isinstance(x, jax.ShapeDtypeStruct):
            out.append(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        elif isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
            out.append(x)
        elif jax.process_count() == 1:
            out.append(jax.device_put(x, s))
        else:
            host = np.asarray(x)
            out.append(jax.make_array_from_callback(host.shape, s, lambda idx, h=host: h[idx]))
    return treedef.unflatten(out)


def init_sharded(build: Callable[[], object], mesh: Mesh, *, by_path: bool = True):
    """Create an NNX module directly sharded: ``build()`` (a module constructor, e.g. random init + LoRA) runs
    under ``jax.jit`` with out_shardings from :func:`model_state_shardings`, so no full copy exists on a host.
    ``build`` must create its own ``nnx.Rngs`` (it is traced)."""
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = model_state_shardings(abstract, mesh, by_path=by_path)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
