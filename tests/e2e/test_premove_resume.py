"""A run directory written before the move-only restructure (commit d9c5347) resumes and exports with this code.

The fixture ``tests/data/premove_run/run`` (how it was made: ``tests/data/premove_run/README.md``) was trained by the
pre-move code on the tiny model and cache of ``tests/support/fixtures_data.py``; its Orbax step metadata names the data
item's handler by its old module path, ``dreamomni2_jax.checkpoint_items.DataStateHandler``. Orbax only resolves a
saved handler name when an item is restored without ``CheckpointArgs``; every restore here passes them, so the
recorded path is never imported. These tests resume the run the way a user does (``scripts/train.py`` with
``--set model.path=... --set data.cache_dir=...`` pointing at this session's freshly built tiny model and cache) and
require the old code's losses bit for bit wherever this machine reproduces the old run from scratch bit for bit (see
``exact``).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.asserts import assert_adapter_close, assert_trees_close
from support.compile_cache import persistent_compile_cache

from dreamomni2_jax.checkpoint import store as C
from dreamomni2_jax.convert.loaders import load_flux
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.lora.files import load_lora_file
from dreamomni2_jax.lora.layers import lora_state
from dreamomni2_jax.tools.export_lora import main as export_main
from test_lora_io import _jax_out, _torch_out, inputs  # noqa: F401 - inputs: fixture over base_model below

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "premove_run"
OLD_HANDLER = "dreamomni2_jax.checkpoint_items.DataStateHandler"
NEW_HANDLER = "dreamomni2_jax.checkpoint.items.DataStateHandler"


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _data_handler(step_dir: Path) -> str:
    return json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]["data"]


OLD_LOSSES = _losses(FIXTURE / "run")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Persistent XLA cache for this module's runs (they compile the same steps)."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")) as path:
        yield path


@pytest.fixture(scope="module")
def inputs_dirs(tiny_converted_dir, tiny_cache, compile_cache) -> tuple[Path, Path]:
    """(model, cache): this session's tiny converted model and tiny cache, built like the fixture's."""
    return Path(tiny_converted_dir), Path(tiny_cache[2])


# Tolerance where this machine does not reproduce the fixture's run from scratch bit for bit (``exact`` False): the
# inputs are the same arrays (seeded builders), but XLA:CPU compiles for the host's vector width and version, so a
# different CPU or XLA release may round reductions differently; 4 AdamW steps amplify such 1e-7 differences far less
# than this. On the machine and versions that made the fixture everything below is bitwise.
LOSS_RTOL = 1e-4
STATE_RTOL = 1e-3  # of each leaf's largest magnitude (Adam moments span orders of magnitude)


@pytest.fixture(scope="module")
def exact(inputs_dirs, tmp_path_factory) -> bool:
    """Whether the current code trains the fixture's first 4 steps from scratch to the very floats the old code
    recorded (then every comparison with the old run is bitwise). True where the fixture was made; elsewhere the
    comparisons use the tolerances above (with a warning)."""
    run = tmp_path_factory.mktemp("scratch") / "run"
    assert _train(run, inputs_dirs) == 0
    fresh = _losses(run)
    assert sorted(fresh) == sorted(OLD_LOSSES)
    _assert_losses(fresh, OLD_LOSSES, exact=False)
    if fresh != OLD_LOSSES:
        warnings.warn(f"this machine does not reproduce the pre-move run bit for bit ({fresh} vs {OLD_LOSSES}); "
                      f"comparing within rtol {LOSS_RTOL}")
    return fresh == OLD_LOSSES


def _assert_losses(got: dict, want: dict, exact: bool) -> None:
    if exact:
        assert got == want  # bitwise: same floats, not just close
    else:
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], rtol=LOSS_RTOL)


def _copy_run(tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    shutil.copytree(FIXTURE / "run", run)
    return run


def _train(run: Path, inputs_dirs, *extra: str) -> int:
    """``scripts/train.py`` in this process, with the fixture's config and this session's model and cache."""
    import importlib.util

    model, cache = inputs_dirs
    spec = importlib.util.spec_from_file_location("_train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--config", str(FIXTURE / "train_config.py"), "--set", f"model.path={model}",
                        "--set", f"data.cache_dir={cache}", "--set", f"train.run_dir={run}", "--no-progress",
                        *extra])


def _assert_trees_equal(got, want, exact: bool = True) -> None:
    if not exact:
        return assert_trees_close(got, want, STATE_RTOL, scaled=True)
    got_leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    want_leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    assert got_leaves.keys() == want_leaves.keys()
    for k, v in want_leaves.items():
        np.testing.assert_array_equal(got_leaves[k], v, err_msg=k)


def test_fixture_is_a_premove_run():
    """What the other tests rely on: two complete steps written by the pre-move module layout, four losses."""
    root = FIXTURE / "run" / "checkpoints"
    assert C.complete_steps(root) == [2, 4]
    assert {_data_handler(root / str(s)) for s in (2, 4)} == {OLD_HANDLER}
    assert sorted(OLD_LOSSES) == [1, 2, 3, 4]


def test_premove_run_resumes_exactly(inputs_dirs, exact, tmp_path):
    """--resume from the old step 2 (--branch: the old step 4 moves aside) redoes steps 3 and 4 with the old
    losses, bitwise, and writes a step 4 equal to the old one array for array. Re-running without --resume on an
    untouched copy continues from the old latest step (4) exactly as from the new step 4."""
    run = _copy_run(tmp_path)
    assert _train(run, inputs_dirs, "--resume", str(run / "checkpoints" / "2"), "--branch") == 0
    # same inputs (the tiny builders are seeded), same compiled step, same restored state and data position
    _assert_losses(_losses(run), OLD_LOSSES, exact)
    (branch,) = (run / "branches").iterdir()
    assert C.complete_steps(branch / "checkpoints") == [4] and _losses(branch) == {k: OLD_LOSSES[k] for k in (3, 4)}
    assert _data_handler(run / "checkpoints" / "4") == NEW_HANDLER
    assert _data_handler(branch / "checkpoints" / "4") == OLD_HANDLER
    old4, step, _ = C.load_state(branch / "checkpoints" / "4")
    new4, _, _ = C.load_state(run)
    assert step == 4 and int(new4["step"]) == 4
    _assert_trees_equal(new4, old4, exact)
    assert (json.loads((branch / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text())
            == json.loads((run / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text()))

    # the default resume (same command, more steps): from the old latest checkpoint of an untouched copy ...
    old_latest = _copy_run(tmp_path, "old_latest")
    assert _train(old_latest, inputs_dirs, "--set", "train.steps=6") == 0
    assert C.complete_steps(old_latest / "checkpoints") == [2, 4, 6]
    continued = _losses(old_latest)
    assert sorted(continued) == [1, 2, 3, 4, 5, 6] and {k: continued[k] for k in OLD_LOSSES} == OLD_LOSSES
    # ... and from the step 4 the new code wrote above: the same steps 5 and 6
    assert _train(run, inputs_dirs, "--set", "train.steps=6") == 0
    _assert_losses(_losses(run), continued, exact)
    _assert_trees_equal(C.load_state(old_latest)[0], C.load_state(run)[0], exact)


@pytest.fixture(scope="module")
def base_model(tiny_converted_dir):
    """The tiny transformer the fixture was trained on (``inputs`` of test_lora_io runs it)."""
    return load_flux(Path(tiny_converted_dir) / "transformer", dtype=jnp.float32)


def test_premove_run_exports_and_its_adapters_load(base_model, inputs, tiny_pipeline_dir, tmp_path):
    """convert/export_lora.py's code exports the old run (diffusers and kohya, fp32: the checkpoint's adapters
    exactly); the diffusers file loads in diffusers' FluxKontextPipeline and in our model (from the file and from
    the old run folder itself) with the same output."""
    from diffusers import FluxKontextPipeline
    import torch

    run = _copy_run(tmp_path)
    flat, meta = C.load_lora(run)
    assert meta["step"] == 4 and (meta["rank"], meta["alpha"]) == (2, 4.0) and len(meta["targets"]) == 7
    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"{fmt}.safetensors"
        assert export_main(["--ckpt", str(run), "--out", str(out), "--dtype", "fp32", "--format", fmt]) == 0
        got, file_meta = load_lora_file(out)
        assert (file_meta["rank"], file_meta["alpha"]) == (2, 4.0) and got.keys() == flat.keys(), fmt
        for k in flat:
            np.testing.assert_array_equal(got[k], flat[k], err_msg=f"{fmt}: {k}")

    from_file = _attached(base_model, tmp_path / "diffusers.safetensors")
    from_run = _attached(base_model, run)
    for k, v in flat.items():
        np.testing.assert_array_equal(np.asarray(lora_state(from_run)[k]), v, err_msg=k)
    ours = _jax_out(from_file, inputs)
    np.testing.assert_array_equal(_jax_out(from_run, inputs), ours)

    pipe = FluxKontextPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)
    base = _torch_out(pipe.transformer, inputs)
    pipe.load_lora_weights(str(tmp_path / "diffusers.safetensors"), adapter_name="premove")
    # torch vs XLA float32: test_lora_io's 1e-4 of scale
    assert_adapter_close(ours, _torch_out(pipe.transformer, inputs), 1e-4, base)


def _attached(base_model, source):
    from flax import nnx

    model = nnx.clone(base_model)
    attach_lora(model, source)
    return model
