"""The cache stage run as several processes (jax.distributed, one per host): ``scripts/cache.py`` launched as 2
processes x 2 fake CPU devices by the one launcher (tests/support/multiprocess.py) builds the cache one process
builds (index records identical, every record's arrays bitwise equal), and a run SIGKILLed in every process mid-way
resumes to the same cache, with 2 processes or with 3.

Bitwise because a shard's values depend only on its records and the per-device batch: the runs encode 2 images /
prompts per call on 2 devices, the reference 1 per call on 1 device. (Another per-device batch makes XLA's CPU
kernels round differently: latents and embeddings then differ by up to ~1e-4 relative, multi-process or not.)
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from support.fixtures_data import tiny_config, write_jsonl
from support.multiprocess import kill, launch, report, start, wait
from dreamomni2_jax.cache.records import decode_record, load_index
from dreamomni2_jax.cache.stage import build_cache

REPO = Path(__file__).resolve().parents[1]
STALL = REPO / "tests" / "support" / "stall_after_shard.py"  # run as a script: each process stops after one shard
TIMEOUT_S = 240


def _config_file(tmp_path: Path, model_path) -> Path:
    p = tmp_path / "cfg.py"
    p.write_text("import sys\nsys.path.insert(0, %r)\nfrom support.fixtures_data import tiny_config\n"
                 "def get_config():\n    return tiny_config(%r)\n" % (str(REPO / "tests"), str(model_path)))
    return p


@pytest.fixture(scope="module")
def setup(tiny_converted_dir, tmp_path_factory):
    """(cmd(out, script) -> argv, env, reference cache dir): the 6 tiny records in 6 shards of 1 (3 per process of
    2); the reference built in this process the usual way (build_cache, real tiny encoders on 1 device, 1 image /
    prompt per call: the runs' per-device batch)."""
    import os

    from dreamomni2_jax.cache.encoders import JaxEncoders

    root = tmp_path_factory.mktemp("mpcache")
    manifest = write_jsonl(root / "in")
    cfg_file = _config_file(root, tiny_converted_dir)
    ref = root / "one_process"
    enc = JaxEncoders(tiny_converted_dir, "float32", max_sequence_length=32, image_batch=1, text_batch=1)
    build_cache(tiny_config(tiny_converted_dir), manifest, ref, enc, shard_size=1, progress=False)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           "TOKENIZERS_PARALLELISM": "false"}

    def cmd(out: Path, script: Path = REPO / "scripts" / "cache.py") -> list[str]:
        return [sys.executable, str(script), "--config", str(cfg_file), "--data", str(manifest), "--out", str(out),
                "--no-progress", "--shard-size", "1", "--image-batch", "2", "--text-batch", "2"]

    return cmd, env, ref


def _records(cache: Path) -> list[tuple[dict, dict]]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for s in load_index(cache)["shards"]:
        r = ArrayRecordReader(str(cache / s["file"]))
        out += [decode_record(b) for b in r.read(list(range(s["num_records"])))]
        r.close()
    return out


def assert_same_cache(got: Path, ref: Path) -> None:
    """Same index (but its creation time), settings, skipped list, empty prompt, and records bitwise."""
    a, b = load_index(got), load_index(ref)
    a.pop("created"), b.pop("created")
    assert a == b
    for name in ("settings.json", "skipped.jsonl", "empty_prompt.rec"):
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temporaries left
    ra, rb = _records(got), _records(ref)
    assert len(ra) == len(rb) == a["num_records"]
    for (xa, ma), (xb, mb) in zip(ra, rb):
        assert ma == mb and list(xa) == list(xb)
        for k in xa:
            assert xa[k].dtype == xb[k].dtype and xa[k].shape == xb[k].shape, k
            np.testing.assert_array_equal(xa[k], xb[k], err_msg=f"{ma['where']}: {k}")


def test_two_processes_build_the_one_process_cache(setup, tmp_path):
    cmd, env, ref = setup
    out = tmp_path / "cache"
    procs = launch(cmd(out), nproc=2, devices=2, cwd=REPO, logs=tmp_path / "logs", env=env, timeout_s=TIMEOUT_S)
    assert all(p.returncode == 0 for p in procs), report(procs)
    assert "cached 6 records in 6 shards" in procs[0].output, report(procs)
    assert "process 1 of 2: done" in procs[1].output, report(procs)
    for p in procs:  # each process encoded its own half of the shards (round-robin), on its own 2 devices
        assert f"process {p.rank} of 2: 3 of 6 shards to encode" in p.output, report(procs)
        assert "encoders on 2 local devices" in p.output, report(procs)
    assert_same_cache(out, ref)


@pytest.fixture(scope="module")
def killed(setup, tmp_path_factory):
    """A cache folder as a 2-process run leaves it when both processes are SIGKILLed once each has written one shard
    (shards 0 and 1 finished, 2-5 not, no index)."""
    cmd, env, _ = setup
    root = tmp_path_factory.mktemp("killed")
    out = root / "cache"
    markers = lambda: sorted(p.name for p in out.glob("shard-*.json"))  # noqa: E731
    procs = start(cmd(out, STALL), nproc=2, devices=2, cwd=REPO, logs=root / "logs", env=env)
    deadline = time.monotonic() + TIMEOUT_S
    try:  # poll for both processes' first shard marker, then SIGKILL the group at once
        while len(markers()) < 2 and time.monotonic() < deadline and all(p.popen.poll() is None for p in procs):
            time.sleep(0.1)
    finally:
        kill(procs)
    wait(procs, 30)
    # SIGKILLed (or aborted by the coordination service once process 0, its host, is gone)
    assert all(p.returncode in (-9, -6) for p in procs), report(procs)
    assert markers() == ["shard-00000.json", "shard-00001.json"], report(procs)  # one shard per process
    assert not (out / "index.json").exists()
    return out


def test_killed_run_resumes_to_the_same_cache(setup, killed, tmp_path):
    cmd, env, ref = setup
    out = tmp_path / "cache"
    shutil.copytree(killed, out)
    procs = launch(cmd(out), nproc=2, devices=2, cwd=REPO, logs=tmp_path / "logs", env=env, timeout_s=TIMEOUT_S)
    assert all(p.returncode == 0 for p in procs), report(procs)
    for p in procs:  # the 4 shards left, split between the two
        assert f"process {p.rank} of 2: 2 of 6 shards to encode (of the 4 left" in p.output, report(procs)
    assert_same_cache(out, ref)


def test_killed_run_resumes_with_another_number_of_processes(setup, killed, tmp_path):
    cmd, env, ref = setup
    out = tmp_path / "cache"
    shutil.copytree(killed, out)
    procs = launch(cmd(out), nproc=3, devices=2, cwd=REPO, logs=tmp_path / "logs", env=env, timeout_s=TIMEOUT_S)
    assert all(p.returncode == 0 for p in procs), report(procs)
    for p in procs:  # 4 shards left among 3 processes: 2, 1, 1
        assert f"process {p.rank} of 3: {2 if p.rank == 0 else 1} of 6 shards to encode" in p.output, report(procs)
    assert_same_cache(out, ref)


# --------------------------------------------------------------------------- the agreement steps, in this process


class _PoolEncoders:
    """8x8-pooled pixels as latents, zeros as embeddings (no model, no JAX)."""

    downscale = 8

    def encode_images(self, x):
        n, h, w, c = x.shape
        return x.reshape(n, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))

    def encode_text(self, prompts):
        return np.zeros((len(prompts), 4, 8), np.float32), np.zeros((len(prompts), 8), np.float32)


def _as_group(monkeypatch, others=lambda row: row):
    """This process among 2 whose other process gathers ``others(row)`` (its own row by default: the same)."""
    from dreamomni2_jax.cache import stage

    monkeypatch.setattr(stage._Processes, "gather", lambda self, row: np.stack(
        [np.asarray(r, np.int32) for r in ([row, others(row)] if self.index == 0 else [others(row), row])]))


def test_a_process_that_cannot_see_the_folder_says_so(tmp_path, monkeypatch):
    from dreamomni2_jax.cache.records import CacheError

    _as_group(monkeypatch)
    manifest = write_jsonl(tmp_path / "in")
    with pytest.raises(CacheError, match=r"cache/settings.json not found although process 0 wrote it: the cache "
                                         r"folder must be on storage every host sees"):
        build_cache(tiny_config(), manifest, tmp_path / "cache", _PoolEncoders(), shard_size=2, progress=False,
                    processes=(1, 2))


def test_process_0_names_the_shard_files_it_cannot_see(tmp_path, monkeypatch):
    from dreamomni2_jax.cache.records import CacheError

    _as_group(monkeypatch)
    manifest = write_jsonl(tmp_path / "in")  # 3 shards: 0 and 2 are process 0's, 1 is process 1's (not written)
    with pytest.raises(CacheError, match=r"shard-00001.json not found although process 1 wrote it"):
        build_cache(tiny_config(), manifest, tmp_path / "cache", _PoolEncoders(), shard_size=2, progress=False,
                    processes=(0, 2))
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard-*.json")) == ["shard-00000.json",
                                                                                   "shard-00002.json"]


def test_a_failed_process_stops_the_others_with_one_line(tmp_path, monkeypatch):
    from dreamomni2_jax.cache.records import CacheError

    _as_group(monkeypatch, others=lambda row: [1, *row[1:]])  # the other process failed its first step
    manifest = write_jsonl(tmp_path / "in")
    with pytest.raises(CacheError, match=r"^cache setup: process 1 of 2 failed \(see its output\); process 0 stops"):
        build_cache(tiny_config(), manifest, tmp_path / "cache", _PoolEncoders(), shard_size=2, progress=False,
                    processes=(0, 2))
    _as_group(monkeypatch, others=lambda row: [0, 99, *row[2:]])  # the other process reads other inputs
    with pytest.raises(CacheError, match=r"process 1 reads other inputs than process 0 \(99 vs 3 shards\)"):
        build_cache(tiny_config(), manifest, tmp_path / "cache", _PoolEncoders(), shard_size=2, progress=False,
                    processes=(0, 2))
