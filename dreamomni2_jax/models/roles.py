"""The module schema of a transformer: one declaration per ``nnx.Linear`` of its role, from which the LoRA presets,
the tensor-parallel sharding axes, the FLOP model and the kohya/BFL LoRA tables are derived.

A model declares a :class:`ModelSchema` next to its code (``models/flux_schema.py``, ``models/flux2_schema.py``):
its stacked groups (module name -> BFL name) and one :class:`Linear` per Linear with

* ``path``: the module path inside its group (ours = diffusers', e.g. ``attn.to_q``), ``group``: the stacked group
  (``transformer_blocks``) or ``None`` for a top-level module;
* ``stream``: which rows it acts on per sample: ``image`` (target + reference tokens), ``text``, ``joint`` (the
  concatenated text + image stream of the single blocks), ``output`` (the target tokens whose outputs are computed)
  or ``vector`` (one row: time / modulation embeddings);
* ``role``: ``q`` / ``k`` / ``v`` / ``out`` (attention), ``mlp_in`` / ``mlp_out``, ``qkv_mlp`` (one fused
  q | k | v | mlp input projection), ``attn_mlp_out`` (one fused output projection over [attention | mlp]),
  ``mod`` (adaLN modulation), ``embed`` (input / time / text embedders), ``final`` (output projection);
* ``dims``: ``(in, out)`` as expressions over the schema's sizes (``"d"``, ``"3*d+2*m"``) of a config;
* ``bfl``: the BFL module name inside the BFL group (``img_attn.qkv``); Linears sharing one BFL name are the
  fused parts of it, in ``part`` order with relative output sizes ``ratio``; ``swapped``: BFL stores the two
  output halves in the other order (final-layer shift/scale);
* ``full_rows``: in the last single block it still runs on every row (keys / values), not only the output rows;
* ``when``: the config flag the Linear exists under (``guidance_embeds``), or empty.

Nothing here imports a model, so config, sharding, perf and the LoRA file formats can use the schemas cheaply.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

STREAMS = ("image", "text", "joint", "output", "vector")
ROLES = ("q", "k", "v", "out", "mlp_in", "mlp_out", "qkv_mlp", "attn_mlp_out", "mod", "embed", "final")
# (in, out) logical axes of a kernel by role (see sharding.LOGICAL_RULES); roles not listed: FSDP only.
ROLE_AXES: dict[str, tuple[str, str]] = {
    "q": ("embed", "heads"), "k": ("embed", "heads"), "v": ("embed", "heads"), "out": ("heads", "embed"),
    "mlp_in": ("embed", "mlp"), "mlp_out": ("mlp", "embed"), "qkv_mlp": ("embed", "mlp"),
}
# Roles whose inputs never depend on the adapters of other modules (no activation gradient in the backward pass).
NO_BACKWARD_ROLES = ("mod", "embed")


class SchemaError(ValueError):
    """A module path that no model schema declares, or an inconsistent schema; the message names the path."""


@dataclass(frozen=True)
class Linear:
    path: str
    group: str | None
    stream: str
    role: str
    dims: tuple[str, str]
    bfl: str
    part: int = 0
    ratio: int = 1
    swapped: bool = False
    full_rows: bool = False
    when: str = ""

    def __post_init__(self):
        if self.stream not in STREAMS or self.role not in ROLES:
            raise SchemaError(f"{self.module}: stream {self.stream!r} / role {self.role!r} not in {STREAMS} / {ROLES}")

    @property
    def module(self) -> str:
        """Our module path without layer index (``transformer_blocks.attn.to_q``, ``proj_out``)."""
        return f"{self.group}.{self.path}" if self.group else self.path

    @property
    def axes(self) -> tuple[str | None, str | None]:
        return ROLE_AXES.get(self.role, (None, None))


@dataclass(frozen=True)
class Select:
    """Linears with a role in ``roles``, a stream in ``streams`` (empty: any) and a group in ``groups`` (empty:
    any stacked group; ``(None,)``: top level)."""

    roles: tuple[str, ...]
    streams: tuple[str, ...] = ()
    groups: tuple[str | None, ...] = ()

    def __call__(self, lin: Linear) -> bool:
        groups_ok = lin.group in self.groups if self.groups else lin.group is not None
        return lin.role in self.roles and (not self.streams or lin.stream in self.streams) and groups_ok


@dataclass(frozen=True)
class ModelSchema:
    name: str  # "flux" | "flux2"
    config_class: str  # class name of the model's config dataclass
    groups: dict[str, tuple[str, str]]  # stacked group -> (config field with its layer count, BFL group name)
    linears: tuple[Linear, ...]
    presets: dict[str, tuple[Select, ...]] = field(default_factory=dict)
    sizes: Mapping[str, str] = field(default_factory=dict)  # size name -> expression over config fields
    kohya_version: str = ""  # kohya ``ss_base_model_version``

    def __post_init__(self):
        seen = set()
        for lin in self.linears:
            if lin.module in seen:
                raise SchemaError(f"{self.name}: {lin.module} declared twice")
            if lin.group is not None and lin.group not in self.groups:
                raise SchemaError(f"{self.name}: {lin.module}: unknown stacked group {lin.group!r}")
            seen.add(lin.module)

    # ---------------------------------------------------------------------------------------- lookups
    @property
    def stacked(self) -> tuple[str, ...]:
        return tuple(self.groups)

    def by_module(self) -> dict[str, Linear]:
        return {lin.module: lin for lin in self.linears}

    def find(self, module: str) -> Linear | None:
        """The Linear at our module path; a layer index after a stacked group is ignored."""
        head, _, rest = module.partition(".")
        if head in self.groups and rest.split(".", 1)[0].isdigit():
            module = f"{head}.{rest.split('.', 1)[1]}"
        return self.by_module().get(module)

    def present(self, config) -> tuple[Linear, ...]:
        """The Linears a model of ``config`` has (``when`` flags honoured)."""
        return self.with_flags(**{lin.when: bool(getattr(config, lin.when)) for lin in self.linears if lin.when})

    def with_flags(self, **flags: bool) -> tuple[Linear, ...]:
        """The Linears present when the config flags are ``flags`` (``guidance_embeds=False``); missing: off."""
        return tuple(lin for lin in self.linears if not lin.when or flags.get(lin.when, False))

    def layer_counts(self, config) -> dict[str, int]:
        return {g: int(getattr(config, f)) for g, (f, _) in self.groups.items()}

    def count(self, lin: Linear, config) -> int:
        return int(getattr(config, self.groups[lin.group][0])) if lin.group else 1

    def size_values(self, config) -> dict[str, int]:
        return {k: int(eval(expr, {"__builtins__": {}}, {"c": config})) for k, expr in self.sizes.items()}

    def dims(self, lin: Linear, config) -> tuple[int, int]:
        sizes = self.size_values(config)
        return tuple(int(eval(e, {"__builtins__": {}}, sizes)) for e in lin.dims)

    # ---------------------------------------------------------------------------------------- derived
    def preset_modules(self, name: str) -> tuple[str, ...]:
        sel = self.presets[name]
        return tuple(lin.module for lin in self.linears if any(s(lin) for s in sel))

    def preset_patterns(self, name: str) -> tuple[str, ...]:
        """``re.search`` patterns selecting exactly the preset's modules (anchored full paths)."""
        return tuple(f"^{re.escape(m)}$" for m in self.preset_modules(name))

    def placeholder(self, group: str, per_group: bool) -> str:
        """Layer-index placeholder of a stacked group in name templates: ``{i}``, or with ``per_group`` one letter
        per group in declaration order (``{i}`` double, ``{j}`` single blocks: the converters' rule tables)."""
        return "{" + ("ij"[list(self.groups).index(group)] if per_group else "i") + "}"

    def template(self, lin: Linear, per_group: bool = True) -> str:
        """Our (= diffusers') module path with a layer placeholder (``transformer_blocks.{i}.attn.to_q``)."""
        return f"{lin.group}.{self.placeholder(lin.group, per_group)}.{lin.path}" if lin.group else lin.path

    def bfl_module(self, lin: Linear, per_group: bool = False) -> str:
        """BFL module path with a layer placeholder (``double_blocks.{i}.img_attn.qkv``)."""
        if not lin.group:
            return lin.bfl
        return f"{self.groups[lin.group][1]}.{self.placeholder(lin.group, per_group)}.{lin.bfl}"

    def bfl_fused(self, per_group: bool = False) -> list[tuple[str, str | None, tuple[Linear, ...]]]:
        """``[(bfl module template, group, parts in order)]``: Linears grouped by their BFL module."""
        out: dict[tuple[str | None, str], list[Linear]] = {}
        for lin in self.linears:
            out.setdefault((lin.group, lin.bfl), []).append(lin)
        return [(self.bfl_module(parts[0], per_group), g, tuple(sorted(parts, key=lambda p: p.part)))
                for (g, _), parts in out.items()]


def match_schema(schemas: Iterable[ModelSchema], modules: Iterable[str]) -> ModelSchema:
    """The first schema declaring every one of ``modules`` (our paths, layer indices allowed)."""
    modules = list(modules)
    schemas = list(schemas)
    for s in schemas:
        if all(s.find(m) is not None for m in modules):
            return s
    best = min(schemas, key=lambda s: sum(s.find(m) is None for m in modules))
    raise SchemaError(f"modules not declared by any model schema ({', '.join(s.name for s in schemas)}): "
                      f"{sorted(m for m in modules if best.find(m) is None)[:20]}")
