"""The one closeness check of the tests: error relative to the reference's largest magnitude.

Tolerances are explicit at every call site (no default), so a reader sees what each comparison allows.
"""
from __future__ import annotations

import jax
import numpy as np


def rel_err(got, want) -> float:
    """``max |got - want| / max |want|`` (float32 math; ``got`` may be a JAX array or bfloat16)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_close(got, want, rtol: float, what: str = "") -> None:
    """``max |got - want| <= rtol * max |want|``; the message names ``what``, the error and the scale."""
    err = rel_err(got, want)
    assert err <= rtol, f"{what + ': ' if what else ''}relative error {err:.3g} > {rtol:g}"


def assert_adapter_close(got, want, rtol: float, base=None) -> None:
    """:func:`assert_close` for an adapted model's output against a reference implementation's; with ``base`` (the
    output without the adapter), also that the adapter moves the output by more than 100 times the error, so a
    comparison cannot pass because the adapter does nothing."""
    assert_close(got, want, rtol)
    if base is not None:
        got, want, base = (np.asarray(a, np.float32) for a in (got, want, base))
        err, moved = np.abs(got - want).max(), np.abs(want - base).max()
        assert moved > 100 * err, f"the adapter moves the output by {moved:.3g}, not > 100 x the error {err:.3g}"


def assert_trees_close(got, want, rtol: float, *, scaled: bool = False) -> None:
    """Leafwise ``np.testing.assert_allclose(rtol=rtol, atol=rtol)``; ``scaled``: atol ``rtol`` times each
    reference leaf's largest magnitude (optimizer moments span many orders of magnitude)."""
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * (np.abs(y).max() if scaled and y.size else 1))
