"""Every model schema, and finding the one of a config, a model or a set of module paths."""
from __future__ import annotations

from typing import Iterable

from dreamomni2_jax.config import ConfigError
from dreamomni2_jax.models.flux2_schema import FLUX2_SCHEMA
from dreamomni2_jax.models.flux_schema import FLUX_SCHEMA
from dreamomni2_jax.models.roles import Linear, ModelSchema, SchemaError, match_schema

SCHEMAS: dict[str, ModelSchema] = {s.name: s for s in (FLUX_SCHEMA, FLUX2_SCHEMA)}


def schema_for(obj) -> ModelSchema:
    """The schema of a schema name, a config (``FluxConfig`` / ``Flux2Config``) or a model with ``.config``."""
    if isinstance(obj, ModelSchema):
        return obj
    if isinstance(obj, str):
        if obj not in SCHEMAS:
            raise SchemaError(f"unknown model schema {obj!r}; known: {sorted(SCHEMAS)}")
        return SCHEMAS[obj]
    config = getattr(obj, "config", obj)
    for s in SCHEMAS.values():
        if type(config).__name__ == s.config_class:
            return s
    raise SchemaError(f"no model schema for {type(config).__name__}; known: "
                      f"{[s.config_class for s in SCHEMAS.values()]}")


def schema_of_modules(modules: Iterable[str]) -> ModelSchema:
    """The first schema (FLUX.1, then FLUX.2) declaring every module path (e.g. of a LoRA's adapters)."""
    return match_schema(SCHEMAS.values(), modules)


def declared_linear(module: str) -> Linear:
    """The declaration of our module path in any schema (they agree where they share a path); raises
    :class:`SchemaError` for a path no schema declares."""
    for s in SCHEMAS.values():
        lin = s.find(module)
        if lin is not None:
            return lin
    raise SchemaError(f"{module}: no model schema ({', '.join(SCHEMAS)}) declares this Linear; declare its role in "
                      "models/<model>_schema.py")


def lora_presets(model="flux") -> dict[str, tuple[str, ...]]:
    """``{preset name: target patterns}`` of a model (schema name, schema, config or model), derived from its module
    roles: FLUX.1 ``attention`` (the release config) / ``kontext_wide`` (diffusers' Kontext script default); FLUX.2
    ``attention`` / ``klein_wide`` (diffusers' klein script default)."""
    schema = schema_for(model)
    return {name: schema.preset_patterns(name) for name in schema.presets}


def lora_target_patterns(lora_cfg, model="flux") -> tuple[str, ...]:
    """The target patterns of a ``LoraConfig`` for ``model``: its preset's plus ``lora.targets`` (``custom``: the
    targets only). An unknown preset raises ``ConfigError`` naming ``lora.preset`` and the model's presets."""
    if lora_cfg.preset == "custom":
        return tuple(lora_cfg.targets)
    presets = lora_presets(model)
    if lora_cfg.preset not in presets:
        raise ConfigError(f"lora.preset={lora_cfg.preset!r} is not a preset of the {schema_for(model).name} model; "
                          f"choose one of {sorted(presets)} or 'custom'")
    return presets[lora_cfg.preset] + tuple(lora_cfg.targets)


def stacked_groups() -> tuple[str, ...]:
    """Stacked group names over every schema (their params carry a leading layer axis)."""
    return tuple(dict.fromkeys(g for s in SCHEMAS.values() for g in s.groups))
