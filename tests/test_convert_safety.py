"""Converters never destroy what they did not write, verify before skipping, keep the source dtype by default, and
answer bad input with one line and exit code 2 (run in-process: ``main`` returns the exit code)."""
from __future__ import annotations

import json
import shutil

import pytest

from dreamomni2_jax.convert import flux_transformer, pipeline, vae
from dreamomni2_jax.weights import store
from dreamomni2_jax.weights.safetensors_io import open_checkpoint
from dreamomni2_jax.weights.manifest import is_converted_pipeline


@pytest.fixture(scope="module")
def vae_out(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    assert vae.main(["--src", str(tiny_pipeline_dir / "vae"), "--out", str(out), "--no-progress"]) == 0
    return out


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


def test_overwrite_replaces_only_a_previous_output(tiny_pipeline_dir, vae_out, tmp_path, capsys):
    src = tiny_pipeline_dir / "vae"
    src_before = _tree(src)
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"precious")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    other_converter = tmp_path / "flux"
    assert flux_transformer.main(["--src", str(tiny_pipeline_dir / "transformer"), "--out", str(other_converter),
                                  "--no-progress"]) == 0
    capsys.readouterr()
    cases = [(unrelated, "not a converted component folder"), (a_file, "not a folder written by this converter"),
             (src, "is --src"), (src / "sub", "is inside --src"), (tiny_pipeline_dir, "contains --src"),
             (other_converter, "written by convert.flux_transformer, not convert.vae")]
    for out, why in cases:
        assert vae.main(["--src", str(src), "--out", str(out), "--overwrite", "--no-progress"]) == 2, out
        err = capsys.readouterr().err
        assert why in err and str(out) in err and "Traceback" not in err, err
    assert (unrelated / "holiday.jpg").read_bytes() == b"precious" and a_file.read_text() == "keep me"
    assert _tree(src) == src_before and store.is_converted(other_converter)
    # a previous output of the same converter is replaced
    before = (vae_out / "params").stat().st_mtime_ns
    assert vae.main(["--src", str(src), "--out", str(vae_out), "--overwrite", "--dtype", "bf16",
                     "--no-progress"]) == 0
    assert (vae_out / "params").stat().st_mtime_ns != before
    assert json.loads((vae_out / "config.json").read_text())["_dtype"] == "bf16"


def test_default_keeps_the_source_dtype_and_help_names_defaults(tiny_pipeline_dir, vae_out, capsys):
    src = open_checkpoint(tiny_pipeline_dir / "vae")
    assert {str(src.dtype(k)) for k in src.keys()} == {"float32"}
    meta = json.loads((vae_out.parent / "vae" / "config.json").read_text())
    assert meta["_converter"] == "convert.vae"
    for main in (vae.main, flux_transformer.main, pipeline.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        assert "(default: source)" in out and "--overwrite" in out, out


def test_pipeline_out_rules_and_damaged_component(tiny_pipeline_dir, tmp_path, capsys):
    src = tiny_pipeline_dir
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("x")
    for out, why in ((stranger, "is not a convert/pipeline.py output"), (src / "conv", "is inside --src"),
                     (src, "is --src")):
        assert pipeline.main(["--src", str(src), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err
    assert (stranger / "thesis.tex").read_text() == "x" and not (src / "conv").exists()
    out = tmp_path / "out"
    assert pipeline.main(["--src", str(src), "--out", str(out), "--no-progress"]) == 0
    # damage one converted component: the re-run names it instead of skipping it as done
    meta = out / "vae" / "params" / "_CHECKPOINT_METADATA"
    shutil.rmtree(out / "vae" / "params" / "state")
    capsys.readouterr()
    assert pipeline.main(["--src", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'vae' / 'params'}" in err and "Traceback" not in err, err
    assert meta.exists()
    assert pipeline.main(["--src", str(src), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert is_converted_pipeline(out)


def test_pipeline_accepts_slow_and_fast_tokenizer_classes(tiny_pipeline_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_pipeline_dir, src)
    index = json.loads((src / "model_index.json").read_text())
    index["tokenizer"][1], index["tokenizer_2"][1] = "CLIPTokenizerFast", "T5Tokenizer"
    (src / "model_index.json").write_text(json.dumps(index))
    assert pipeline.validate_source(src)["tokenizer_2"] == ["transformers", "T5Tokenizer"]
    index["tokenizer_2"][1] = "BertTokenizer"
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'tokenizer_2' is .*BertTokenizer"):
        pipeline.validate_source(src)
