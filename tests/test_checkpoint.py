"""Orbax run checkpoints: round trip, schedule, atomicity under kill -9, corruption, preemption, config."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamomni2_jax.checkpoint import store as C
from dreamomni2_jax.config import Config, apply_overrides
from dreamomni2_jax.lora.layers import LoRAParam, apply_lora
from dreamomni2_jax.train.preemption import SigtermFlag


class _Tiny(nnx.Module):
    def __init__(self):
        self.attn = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
        self.mlp = nnx.List([nnx.Linear(6, 3, rngs=nnx.Rngs(1))])


def _state(seed: float = 1.0):
    model = _Tiny()
    apply_lora(model, [r"attn", r"mlp\.0"], rank=2, alpha=4.0)
    lora = nnx.state(model, LoRAParam)
    lora = jax.tree.map(lambda x: x + seed, lora)
    return {"step": jnp.asarray(int(seed), jnp.int32), "lora": lora,
            "opt_state": (jnp.arange(5.0) * seed, {"count": jnp.asarray(3)}), "skipped": jnp.asarray(0)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _cfg(**kw) -> Config:
    return apply_overrides(Config(), [f"checkpoint.{k}={v}" for k, v in kw.items()] + ["lora.alpha=4"])


def test_round_trip_typed_and_raw_rng(tmp_path):
    cfg = _cfg(every_steps=2, max_to_keep=5, async_save=True)
    ck = C.open_run(tmp_path / "run", cfg, adapter={"rank": 2, "alpha": 4.0})
    s2, s4 = _state(2.0), _state(4.0)
    assert not ck.save(1, _state(1.0), {"pos": 1}, jax.random.key(1))  # not due
    assert ck.save(2, s2, b'{"grain": 2}', jax.random.key_data(jax.random.key(2)))
    assert ck.save(4, s4, {"pos": [4, "x"]}, jax.random.key(4, impl="rbg"))
    assert not ck.save(4, s4, None, None, force=True)  # never overwrites
    assert ck.save(5, _state(5.0), None, None, force=True)
    ck.wait()
    assert ck.all_steps() == [2, 4, 5] and ck.latest_step() == 5
    state, data, rng, step = ck.restore(4, _abstract(s4))
    assert step == 4 and data == {"pos": [4, "x"]} and _equal(state, s4)
    assert isinstance(state["lora"], nnx.State)
    assert jax.random.key_impl(rng) == jax.random.key_impl(jax.random.key(0, impl="rbg"))
    assert np.array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(4, impl="rbg")))
    state, data, rng, step = ck.restore(2, _abstract(s2))
    assert data == b'{"grain": 2}' and _equal(state, s2)
    assert rng.dtype == jnp.uint32 and np.array_equal(rng, jax.random.key_data(jax.random.key(2)))
    ck.close()
    saved = C.read_config(tmp_path / "run" / "checkpoints" / "4")
    assert saved == cfg
    files = os.listdir(tmp_path / "run" / "checkpoints" / "4" / "data")
    assert "process_0-of-1.json" in files


def test_max_to_keep_and_resolve(tmp_path):
    ck = C.open_run(tmp_path / "run", _cfg(every_steps=1, max_to_keep=2, async_save=False))
    for s in range(1, 5):
        ck.save(s, _state(float(s)), {"pos": s}, None)
    ck.close()
    root = tmp_path / "run" / "checkpoints"
    assert C.complete_steps(root) == [3, 4]
    assert C.resolve_checkpoint(tmp_path / "run") == (root, 4)
    assert C.resolve_checkpoint(root, 3) == (root, 3)
    assert C.resolve_checkpoint(root / "3") == (root, 3)
    with pytest.raises(C.CheckpointError, match=r"step 1 .*available steps: \[3, 4\]"):
        C.resolve_checkpoint(tmp_path / "run", 1)
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.resolve_checkpoint(tmp_path / "nope")
    state, step, step_dir = C.load_state(tmp_path / "run")
    assert step == 4 and step_dir == root / "4"
    assert np.array_equal(np.asarray(state["opt_state"][0]), np.arange(5.0) * 4)


_KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from dreamomni2_jax.checkpoint import store as C
    ck = C.open_run(sys.argv[1], None, every_steps=1, async_save=True)
    ck.save(1, {"lora": {"a": jnp.ones((8, 8))}}, {"pos": 1}, None)
    ck.wait()
    orig = C.DataStateHandler.save
    def dying_save(self, directory, args):
        orig(self, directory, args)  # part of step 2 is on disk, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)
    C.DataStateHandler.save = dying_save
    ck.save(2, {"lora": {"a": jnp.zeros((8, 8))}}, {"pos": 2}, None)
    ck.wait()
    print("not killed")
""")


def test_save_killed_midway_is_not_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(run)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = run / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name != "1"]
    assert leftovers and all(".orbax-checkpoint-tmp" in n for n in leftovers)  # partial step 2 exists, as tmp
    assert C.complete_steps(root) == [1]
    ck = C.open_run(run, None, every_steps=1)
    assert ck.latest_step() == 1
    state, data, _, step = ck.restore()
    assert step == 1 and data == {"pos": 1} and np.array_equal(state["lora"]["a"], np.ones((8, 8)))
    ck.close()
    assert sorted(p.name for p in root.iterdir()) == ["1"]  # reopening cleaned the unfinished save


def _three_steps(run: Path):
    ck = C.open_run(run, None, every_steps=1, async_save=False, max_to_keep=5)
    for s in (1, 2, 3):
        ck.save(s, _state(float(s)), {"pos": s}, None)
    return ck


# tensorstore's failed read leaves an asyncio callback that fires after its loop closed (harmless noise)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_names_dir_and_last_intact_step(tmp_path):
    ck = _three_steps(tmp_path / "run")
    d3 = ck.step_dir(3)
    for f in (d3 / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated array data
    with pytest.raises(C.CheckpointError) as e:
        ck.restore(None, _abstract(_state()))
    msg = str(e.value)
    assert str(d3) in msg and "corrupt or incomplete" in msg and "last intact checkpoint is step 2" in msg
    assert str(ck.step_dir(2)) in msg
    state, _, _, step = ck.restore(2, _abstract(_state()))
    assert step == 2 and _equal(state, _state(2.0))
    ck.close()


def test_missing_item_and_mismatched_state(tmp_path):
    ck = _three_steps(tmp_path / "run")
    import shutil

    shutil.rmtree(ck.step_dir(3) / "data")
    with pytest.raises(C.CheckpointError, match=r"missing item folder\(s\) \['data'\].*last intact .* step 2"):
        ck.restore(None, _abstract(_state()))
    other = _state()
    other["opt_state"] = (jnp.zeros(7), {"count": jnp.asarray(3)})
    other["extra"] = jnp.zeros(2)
    with pytest.raises(C.CheckpointError) as e:
        ck.restore(2, _abstract(other))
    msg = str(e.value)
    assert "does not match" in msg and "opt_state.0: checkpoint [5], expected [7]" in msg
    assert "missing in checkpoint: extra [2]" in msg and "lora" not in msg
    ck.close()


def test_sigterm_sets_flag_instead_of_killing(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    ck = C.open_run(tmp_path / "run", None, every_steps=100)
    assert signal.getsignal(signal.SIGTERM) is before  # the library installs no handler by itself
    with SigtermFlag() as flag:
        assert not ck.should_stop(1, flag.raised)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.raised and ck.should_stop(2, flag.raised)
    assert signal.getsignal(signal.SIGTERM) is before
    assert ck.save(2, _state(2.0), {"pos": 2}, None, force=True)  # preemption save: not due, forced
    ck.close()
    assert C.complete_steps(tmp_path / "run" / "checkpoints") == [2]


def test_load_lora_from_checkpoint(tmp_path):
    ck = C.open_run(tmp_path / "run", _cfg(every_steps=1), adapter={"rank": 2, "alpha": 3.0})
    s = _state(1.0)
    ck.save(1, s, None, None)
    ck.close()
    flat, meta = C.load_lora(tmp_path / "run")
    assert meta["alpha"] == 3.0 and meta["rank"] == 2 and meta["step"] == 1
    assert sorted(flat) == ["attn.lora_A", "attn.lora_B", "mlp.0.lora_A", "mlp.0.lora_B"]
    assert np.array_equal(flat["mlp.0.lora_B"], np.asarray(s["lora"]["mlp"][0]["lora_B"][...]))
    ck = C.open_run(tmp_path / "run2", _cfg(every_steps=1))  # no adapter metadata: alpha from the config
    ck.save(1, s, None, None)
    ck.close()
    assert C.load_lora(tmp_path / "run2")[1]["alpha"] == 4.0
    meta_file = tmp_path / "run2" / "checkpoints" / "1" / "meta" / "metadata"
    assert json.loads(meta_file.read_text())["step"] == 1


def test_other_process_count(tmp_path):
    """A checkpoint written by 2 processes, restored by 1: the data position is global, so the one both processes
    saved is re-split (exact resume); positions that disagree are refused, naming the files; export reads it."""
    ck = C.open_run(tmp_path / "run", _cfg(every_steps=1))
    ck.save(1, _state(1.0), {"step": 7, "seed": 0, "process_index": 0, "process_count": 2}, None)
    ck.close()
    data = tmp_path / "run" / "checkpoints" / "1" / "data"
    saved = json.loads((data / "process_0-of-1.json").read_text())
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    other = {**saved, "value": {**saved["value"], "process_index": 1}}
    (data / "process_1-of-2.json").write_text(json.dumps(other))
    ck = C.open_run(tmp_path / "run", _cfg(every_steps=1))
    _, data_state, _, step = ck.restore(None, _abstract(_state()))
    assert step == 1 and data_state == {"step": 7, "seed": 0, "process_index": 0, "process_count": 2}
    ck.close()
    (data / "process_1-of-2.json").write_text(json.dumps({**other, "value": {**other["value"], "step": 8}}))
    ck = C.open_run(tmp_path / "run", _cfg(every_steps=1))
    with pytest.raises(C.CheckpointError, match=r"process_0-of-1\.json does not exist .*process_0-of-2\.json.*"
                                                 r"do not agree") as e:
        ck.restore(None, _abstract(_state()))
    assert "corrupt" not in str(e.value)
    ck.close()
    flat, meta = C.load_lora(tmp_path / "run")
    assert meta["step"] == 1 and len(flat) == 4


def test_flipped_bit_in_saved_array_data_is_caught_by_the_digest(tmp_path):
    """Orbax stores the arrays uncompressed: a flipped bit would restore silently as a wrong value without the
    digest saved in the step's metadata."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((256, 64)), jnp.float32)
    ck = C.RunCheckpointer(tmp_path, every_steps=1, async_save=False)
    ck.save(1, {"lora": {"a": a}, "step": jnp.int32(1)}, {"pos": 1}, None, force=True)
    ck.close()
    meta = json.loads((tmp_path / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert set(meta["digest"]["leaves"]) == {"lora.a", "step"}
    data = max((p for p in (tmp_path / "checkpoints" / "1" / "state").rglob("*") if p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    ro = C.RunCheckpointer(tmp_path, async_save=False, read_only=True)
    with pytest.raises(C.CheckpointError, match="lora.a") as e:
        ro.restore(1)
    ro.close()
    assert "do not match their digest" in str(e.value) and str(tmp_path / "checkpoints" / "1") in str(e.value)
    with pytest.raises(C.CheckpointError, match="do not match their digest"):
        C.load_state(tmp_path)


def test_nonfinite_state_is_never_saved(tmp_path):
    ck = C.RunCheckpointer(tmp_path, every_steps=1, async_save=False)
    assert ck.save(1, {"lora": {"a": jnp.ones((2, 2))}}, None, None, force=True)
    assert not ck.save(2, {"lora": {"a": jnp.full((2, 2), jnp.nan)}}, None, None, force=True)
    ck.close()
    assert C.complete_steps(tmp_path / "checkpoints") == [1]


def test_trim_metrics_keeps_one_record_per_restored_step(tmp_path):
    from dreamomni2_jax.checkpoint.run_dir import SUPERSEDED, trim_metrics

    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4, 5)] + ['{"step": 6, "lo']  # torn
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert trim_metrics(tmp_path, 3) == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (tmp_path / SUPERSEDED).read_text().splitlines() == lines[3:]
    assert trim_metrics(tmp_path, 3) == 0
