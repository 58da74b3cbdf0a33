"""Issue-16 keys end to end through scripts/train.py on the tiny model: EMA + reference dropout + masked loss +
schedule-free AdamW + DoRA resume bitwise from a checkpoint; export of the EMA and of the schedule-free evaluation point
(DoRA magnitudes included)."""
from __future__ import annotations

import jax
import numpy as np

from dreamomni2_jax.tools.export_lora import main as export_main
from dreamomni2_jax.checkpoint import store as C
from dreamomni2_jax.lora.files import load_lora_file
from dreamomni2_jax.utils.tree_paths import dotted
from test_resume import _argv, _losses, _train_in_process, compile_cache, config_file  # noqa: F401

FEATURES = [f"--set={kv}" for kv in (
    "train.ema_decay=0.9", "train.ema_warmup=true", "data.reference_dropout=0.5",
    "data.synthetic_refs=[[32,32],[32,32],[32,32]]", "train.loss_mask=difference", "train.mask_floor=0.2",
    "optim.name=schedule_free_adamw", "optim.schedule_free_warmup=2", "lora.variant=dora")]


def test_features_resume_exactly_and_export(config_file, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    assert _train_in_process(_argv(config_file, straight, *FEATURES)) == 0
    losses = _losses(straight)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and len(set(losses.values())) == 6
    resumed = tmp_path / "resumed"
    assert _train_in_process(_argv(config_file, resumed, *FEATURES, "--resume",
                                   str(straight / "checkpoints" / "3"))) == 0
    assert _losses(resumed) == {k: losses[k] for k in (4, 5, 6)}  # bitwise
    a, step_a, _ = C.load_state(straight)
    b, step_b, _ = C.load_state(resumed)
    assert step_a == step_b == 6 and sorted(a) == ["ema", "lora", "nonfinite", "opt_state", "skipped", "step"]
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    # exports: --ema writes the EMA; the plain export is schedule-free's x = (y - (1 - b1) z) / b1
    sf = a["opt_state"][1]
    for ema, want_tree in ((True, a["ema"]),
                           (False, jax.tree.map(lambda y, z: (y - (1 - sf["b1"]) * z) / sf["b1"], a["lora"], sf["z"]))):
        out = tmp_path / f"ema{ema}.safetensors"
        assert export_main(["--ckpt", str(straight), "--out", str(out), "--dtype", "fp32",
                            *(["--ema"] if ema else [])]) == 0
        got, _ = load_lora_file(out)
        want = {dotted(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(want_tree)[0]}
        assert got.keys() == want.keys() and any(k.endswith(".lora_magnitude_vector") for k in want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-8, err_msg=k)
    y = np.asarray(jax.tree.leaves(a["lora"])[1])
    assert not np.allclose(np.asarray(jax.tree.leaves(a["ema"])[1]), y)
    assert not np.allclose(load_lora_file(tmp_path / "emaFalse.safetensors")[0][dotted(
        jax.tree_util.tree_flatten_with_path(a["lora"])[0][1][0])], y)
