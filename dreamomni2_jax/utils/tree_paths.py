"""Dotted names of parameter paths, the one spelling every table, digest and report uses.

A path is a tuple of plain keys (``("transformer_blocks", 0, "attn")``, as ``nnx.to_flat_state`` gives) or of
JAX pytree keys (``DictKey`` / ``GetAttrKey`` / ``SequenceKey``); an NNX variable's own trailing ``value`` /
``raw_value`` entry is not part of the name, so saved and restored states name their leaves alike.
"""
from __future__ import annotations

from typing import Any, Iterable

_VARIABLE_TAIL = ("value", "raw_value")


def path_parts(path: Iterable[Any]) -> list[str]:
    """Names of a path's entries (dict keys, attribute names, sequence indices, plain keys)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return parts


def dotted(path: Iterable[Any]) -> str:
    """``("a", 0, "b")`` -> ``"a.0.b"``, without a trailing NNX ``value`` / ``raw_value``."""
    parts = path_parts(path)
    while parts and parts[-1] in _VARIABLE_TAIL:
        parts.pop()
    return ".".join(parts)
