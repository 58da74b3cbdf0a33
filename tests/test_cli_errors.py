"""Bad input to every command: exit code 2, one message naming the file / key / line, no traceback.

Each command's table runs in ONE subprocess (``python RUNNER SCRIPT CASES``: the script's ``main`` is called once per
case, stderr captured per case), so the whole process's stderr is also checked (no traceback, no background-thread
noise at exit) without paying a JAX import per case.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RUNNER = r"""
import contextlib, importlib.util, io, json, sys
script, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, str(__import__("pathlib").Path(script).resolve().parents[1]))
spec = importlib.util.spec_from_file_location("_command", script)
mod = sys.modules["_command"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
results = []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = mod.main(argv)
        except SystemExit as e:
            rc = e.code
    results.append({"rc": rc, "err": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def run_table(script: str, cases: list[tuple[list[str], list[str]]], tmp_path: Path) -> None:
    """Run ``cases`` = [(argv, [expected substrings of stderr]), ...] through ``script``'s main in one process."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(runner), str(REPO / script), json.dumps([a for a, _ in cases])],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    for (argv, want), got in zip(cases, json.loads(line[len("RESULTS "):])):
        assert got["rc"] == 2, (argv, got)
        assert "Traceback" not in got["err"], (argv, got["err"])
        for w in want:
            assert w in got["err"], (argv, w, got["err"])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header")
    (d / "model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never loaded
    (d / "bad.json").write_text('{"num_layers": 1,,}')
    (d / "syntax.py").write_text("def get_config(:\n")
    (d / "importerr.py").write_text("import not_a_module_xyz\n")
    (d / "folder").mkdir()
    return d


def test_converter_bad_inputs(tiny_pipeline_dir, bad_files, tmp_path):
    d, out = bad_files, str(tmp_path / "o")
    tr = str(tiny_pipeline_dir / "transformer")
    run_table("convert/flux_transformer.py", [
        (["--src", str(d / "missing"), "--out", out], [f"{d / 'missing'}: no such file or folder"]),
        (["--src", str(d / "empty.safetensors"), "--out", out], [str(d / "empty.safetensors")]),
        (["--src", str(d / "garbage.safetensors"), "--out", out], [str(d / "garbage.safetensors")]),
        (["--src", str(d / "model.bin"), "--out", out], [str(d / "model.bin"), "never pickle"]),
        (["--src", tr, "--out", out, "--config", str(d / "bad.json")], [f"{d / 'bad.json'}:1: not valid JSON"]),
        (["--src", tr, "--out", str(tiny_pipeline_dir)], ["contains --src"]),
    ], tmp_path)
    assert not (tmp_path / "o").exists()


def test_pipeline_bad_inputs(tiny_pipeline_dir, bad_files, tmp_path):
    d, out = bad_files, str(tmp_path / "o")
    run_table("convert/pipeline.py", [
        (["--src", str(d / "missing"), "--out", out], [f"{d / 'missing'}: no such folder"]),
        (["--src", str(d), "--out", out], [f"{d / 'model_index.json'}: missing"]),
        (["--src", str(tiny_pipeline_dir), "--out", str(d / "bad.json")], [f"--out {d / 'bad.json'} is a file"]),
    ], tmp_path)


def _write_config(path: Path, model: Path, **over) -> Path:
    sets = ", ".join(f"{k}={v!r}" for k, v in over.items())
    path.write_text(f"""
from dreamomni2_jax.config import *


def get_config():
    return Config(
        model=ModelConfig(path={str(model)!r}, param_dtype="float32", compute_dtype="float32", attention="xla",
                          remat="none"),
        lora=LoraConfig(rank=2, alpha=2.0),
        data=DataConfig(batch_size=1, max_sequence_length=32, target_max_area=96 * 96, min_image_size=32,
                        synthetic_resolution=(32, 32), synthetic_refs=((32, 32),){', ' + sets if sets else ''}),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1, distributed="off"),
        train=TrainConfig(run_dir="run", steps=1),
    )
""")
    return path


def test_train_bad_inputs(tiny_converted_dir, tiny_cache, bad_files, tmp_path):
    import shutil

    d = bad_files
    cfg = _write_config(tmp_path / "cfg.py", tiny_converted_dir)
    cache = tiny_cache[2]
    broken_index = tmp_path / "cache_index"
    shutil.copytree(cache, broken_index)
    (broken_index / "index.json").write_text("{truncated")
    no_shard = tmp_path / "cache_shard"
    shutil.copytree(cache, no_shard)
    shard = sorted(no_shard.glob("*.array_record"))[0]
    shard.write_bytes(b"damaged")

    def argv(*sets):
        return ["--config", str(cfg), "--no-progress", *[a for s in sets for a in ("--set", s)]]

    run_table("scripts/train.py", [
        (["--config", str(d / "syntax.py")], [f"{d / 'syntax.py'}:1: SyntaxError"]),
        (["--config", str(d / "importerr.py")], [f"{d / 'importerr.py'}:1: ModuleNotFoundError"]),
        (["--config", str(d / "nope.py")], [f"config file {d / 'nope.py'} does not exist"]),
        (argv("optim.lr=nan"), ["optim.lr=nan must be a finite number"]),
        (argv("optim.bogus=1"), ["unknown config key 'optim.bogus'"]),
        (argv("train.run_dir= "), ["train.run_dir is empty"]),
        (argv(f"model.path={d / 'missing'}"), [f"model.path {d / 'missing'} does not exist"]),
        (argv(f"data.cache_dir={d / 'missing'}"), [f"{d / 'missing' / 'index.json'} not found"]),
        (argv(f"data.cache_dir={broken_index}"), [f"{broken_index / 'index.json'}: unreadable or damaged"]),
        (argv(f"data.cache_dir={no_shard}"), [f"{shard}: damaged cache shard"]),
        (["--config", str(cfg), "--branch"], ["--branch needs --resume"]),
    ], tmp_path)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cache_bad_inputs(tiny_converted_dir, bad_files, tmp_path):
    from PIL import Image

    d = bad_files
    cfg = _write_config(tmp_path / "cfg.py", tiny_converted_dir)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("t", "r"):
        Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(data / f"{name}.png")
    Image.fromarray(np.full((32, 2000, 3), 100, np.uint8)).save(data / "wide.png")
    manifest = data / "m.jsonl"
    manifest.write_bytes(b'{"instruction": "x", "target": "t.png", "references": ["r.png"]}\n'
                         b'{"instruction": "caf\xe9", "target": "t.png"}\n')
    wide = data / "wide.jsonl"
    wide.write_text('{"instruction": "x", "target": "wide.png"}\n')  # generation: target at its own aspect
    folder = tmp_path / "qflux"
    folder.mkdir()
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(folder / "a.png")
    (folder / "a.txt").write_bytes(b"\xff\xfe not utf-8")
    base = ["--config", str(cfg)]
    run_table("scripts/cache.py", [
        (["--config", str(d / "syntax.py"), "--data", str(manifest), "--out", "c"], [f"{d / 'syntax.py'}:1"]),
        ([*base, "--data", str(d / "missing.jsonl"), "--out", "c"], [f"{d / 'missing.jsonl'}"]),
        ([*base, "--data", str(manifest), "--out", "c1"], [f"{manifest}:2: not UTF-8 text", "--skip-bad"]),
        ([*base, "--data", str(folder), "--out", "c2"], [f"{folder / 'a'}: instruction file is not UTF-8",
                                                          str(folder / "a.txt")]),
        ([*base, "--data", str(wide), "--out", "c3"], [f"{wide}:1", "empty target size", str(data / "wide.png")]),
    ], tmp_path)


def test_export_and_sample_bad_inputs(tiny_converted_dir, bad_files, tmp_path):
    from safetensors.numpy import save_file

    d = bad_files
    nan_lora = tmp_path / "nan.safetensors"
    key = "transformer.transformer_blocks.0.attn.to_q.lora_{}.weight"
    save_file({key.format("A"): np.full((2, 32), np.nan, np.float32), key.format("B"): np.zeros((32, 2), np.float32)},
              str(nan_lora))
    ref = tmp_path / "ref.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(ref)
    run_table("convert/export_lora.py", [
        (["--ckpt", str(d / "missing"), "--out", str(tmp_path / "x.safetensors")],
         [f"checkpoint path {d / 'missing'} does not exist"]),
        (["--ckpt", str(d), "--out", str(d / "folder")], [f"--out {d / 'folder'} is a folder"]),
    ], tmp_path)
    model = str(tiny_converted_dir)
    base = ["--prompt", "x", "--steps", "1", "--height", "32", "--width", "32", "--no-progress"]
    run_table("scripts/sample.py", [
        (["--model", model, *base, "--out", str(d / "folder")], [f"--out {d / 'folder'} is a folder"]),
        (["--model", model, *base, "--ref", str(d / "missing.png"), "--out", "o.png"], [str(d / "missing.png")]),
        (["--model", str(d / "missing"), *base, "--out", "o.png"], [str(d / "missing")]),
        (["--model", model, *base, "--lora", str(d / "missing.safetensors"), "--out", "o.png"],
         [f"LoRA file {d / 'missing.safetensors'} does not exist"]),
        (["--model", model, *base, "--lora", str(nan_lora), "--out", "o.png"],
         [f"{nan_lora}: 1 adapter tensor(s) hold NaN or inf values"]),
        (["--model", model, *base, "--guidance", "nan", "--out", "o.png"], ["must be finite numbers"]),
    ], tmp_path)
    assert not (tmp_path / "o.png").exists()
