"""Tests on a mesh of 8 fake CPU devices (XLA's host-platform device count).

The flag must be set before JAX starts its backend, so this folder runs in a pytest process of its own:
``tests/test_multidevice.py`` starts it (``XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest
tests/multidevice`` does the same by hand); the main run does not collect it (``tests/conftest.py``).
"""
from __future__ import annotations

import os

FLAG = "--xla_force_host_platform_device_count=8"
if FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    assert jax.device_count() == 8, f"needs 8 devices, got {jax.device_count()}: run tests/multidevice in a " \
                                    f"process of its own (XLA_FLAGS={FLAG})"

