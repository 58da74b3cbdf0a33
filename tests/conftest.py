"""Shared tiny-model fixtures: one tiny random Flux Kontext pipeline folder per session.

The folder is written by :mod:`dreamomni2_jax.testing.tiny_flux1` with the real diffusers / transformers
classes (``save_pretrained``, safetensors), so every test runs our real converters and
loaders on real on-disk formats. Per-area fixtures live in ``tests/support/fixtures_*.py``
modules, registered here as pytest plugins (``pytest_plugins``).
"""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# tests/multidevice/ needs 8 fake devices, set before JAX starts its backend: it runs in a process of its own
# (tests/test_multidevice.py), not in this one.
if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore = ["multidevice"]

import pytest

from dreamomni2_jax.testing import tiny_flux1 as tiny

# Converted tiny model, real tiny encoders and a tiny cache (fixtures_data: built on first use, shared by all
# modules); a PEFT LoRA file on the tiny transformer (fixtures_lora).
pytest_plugins = ["support.fixtures_data", "support.fixtures_lora"]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """Tiny diffusers Flux Kontext pipeline folder (guidance-distilled transformer, like Kontext dev)."""
    return tiny.build_pipeline(tmp_path_factory.mktemp("tiny") / "flux-kontext", seed=0, guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_pipeline_dir_noguidance(tmp_path_factory):
    """Same layout, transformer without a guidance embedder."""
    return tiny.build_pipeline(tmp_path_factory.mktemp("tiny") / "flux-noguid", seed=10, guidance_embeds=False)

