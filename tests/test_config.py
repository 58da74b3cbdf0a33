"""Config files load, overrides parse by type, and bad keys/values give errors naming the key."""
from pathlib import Path

import pytest

from dreamomni2_jax.config import ConfigError, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "tpu_v5", "gpu_h100"])
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(ROOT / "configs" / f"{name}.py")
    assert cfg.lora.target_patterns and cfg.train.steps > 0
    assert from_dict(cfg.to_dict()) == cfg


def test_real_size_configs_use_release_lora_settings():
    for name in ("tpu_v5", "gpu_h100"):
        cfg = load_config(ROOT / "configs" / f"{name}.py")
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr, cfg.model.param_dtype) == (16, 16.0, 1e-4, "bfloat16")


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/demo.py", ["optim.lr=3e-4", "mesh.fsdp=2", "checkpoint.async_save=true",
                                                 "lora.targets=a,b", "data.synthetic_refs=[[64,64],[32,64]]"])
    assert cfg.optim.lr == 3e-4 and cfg.mesh.fsdp == 2 and cfg.checkpoint.async_save is True
    assert cfg.lora.targets == ("a", "b") and cfg.data.synthetic_refs == ((64, 64), (32, 64))


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optimizer.lr=1", "optimizer"),
        ("optim.lr=fast", "optim.lr"),
        ("mesh.fsdp=1.5", "mesh.fsdp"),
        ("checkpoint.async_save=maybe", "checkpoint.async_save"),
        ("model.remat=sometimes", "model.remat"),
        ("lora.rank=0", "lora.rank"),
        ("nodot=1", "section.key"),
        ("optim.lr", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        load_config(ROOT / "configs/demo.py", [override])


def test_bad_config_file_values_name_the_key(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from dreamomni2_jax.config import Config, OptimConfig\n"
                   "def get_config():\n    return Config(optim=OptimConfig(lr='1e-4'))\n")
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.py")
    (tmp_path / "noget.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(tmp_path / "noget.py")
