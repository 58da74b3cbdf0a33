"""Config files load, overrides parse by type, and bad keys/values give errors naming the key."""
import re
from pathlib import Path

import pytest

from dreamomni2_jax.config import Config, ConfigError, from_dict, load_config, override
from dreamomni2_jax.config_common import full_1024
from dreamomni2_jax.models.flux_schema import FLUX_SCHEMA
from dreamomni2_jax.models.schemas import lora_target_patterns

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "tpu_v5", "gpu_h100", "dreamomni2"])
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(ROOT / "configs" / f"{name}.py")
    assert lora_target_patterns(cfg.lora) and cfg.train.steps > 0
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["klein_demo", "klein_tpu_v5", "klein_gpu_h100"])
def test_klein_configs_load_and_round_trip(name):
    cfg = load_config(ROOT / "configs" / f"{name}.py")
    assert lora_target_patterns(cfg.lora, "flux2") and cfg.train.steps > 0
    assert from_dict(cfg.to_dict()) == cfg


def test_config_copied_elsewhere_loads(tmp_path):
    """The shared bases are in the package: a config file copied to any folder loads the same."""
    for name in ("gpu_h100", "klein_demo"):
        (tmp_path / f"{name}.py").write_text((ROOT / "configs" / f"{name}.py").read_text())
        assert load_config(tmp_path / f"{name}.py") == load_config(ROOT / "configs" / f"{name}.py")


def test_override_is_typed_and_checks_keys():
    cfg = override(full_1024(), data=dict(batch_size=8), lora=dict(alpha=8), train=dict(run_dir="runs/x"))
    assert isinstance(cfg, Config) and (cfg.data.batch_size, cfg.lora.alpha, cfg.train.run_dir) == (8, 8, "runs/x")
    assert override(cfg) == cfg
    for kw, match in [(dict(optimizer=dict(lr=1.0)), "unknown config section 'optimizer'"),
                      (dict(optim=dict(lrr=1.0)), r"unknown config key 'optim\.lrr'"),
                      (dict(optim=dict(lr="1e-4")), r"optim\.lr: expected float"),
                      (dict(optim=dict(lr=2.0)), r"optim\.lr=2\.0 must be <= 1"),
                      (dict(optim=3), "expected a dict of optim keys")]:
        with pytest.raises(ConfigError, match=match):
            override(cfg, **kw)


def test_real_size_configs_use_release_lora_settings():
    for name in ("tpu_v5", "gpu_h100"):
        cfg = load_config(ROOT / "configs" / f"{name}.py")
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr, cfg.model.param_dtype) == (16, 16.0, 1e-4, "bfloat16")


def test_dreamomni2_recipe_is_the_documented_one():
    """configs/dreamomni2.py: the qflux DreamOmni2 / Kontext example config values its docstring cites."""
    cfg = load_config(ROOT / "configs" / "dreamomni2.py")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init, cfg.lora.preset) == (16, 16.0, "gaussian", "attention")
    # the preset (derived from the FLUX.1 schema) adapts exactly the modules the documented regexes select
    documented = (r"attn\.to_q", r"attn\.to_k", r"attn\.to_v", r"attn\.to_out\.0")
    modules = [lin.module for lin in FLUX_SCHEMA.linears]
    select = lambda patterns: [m for m in modules if any(re.search(p, m) for p in patterns)]  # noqa: E731
    assert select(lora_target_patterns(cfg.lora)) == select(documented) and len(select(documented)) == 7
    o = cfg.optim
    assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.schedule, o.warmup_steps, o.grad_clip) == \
        (1e-4, 0.9, 0.999, 1e-8, 0.01, "cosine", 100, 1.0)
    assert cfg.data.batch_size // o.grad_accum == 1 and o.grad_accum == 4  # batch 1 x accumulation 4
    assert (cfg.data.target_max_area, cfg.data.reference_max_area, cfg.data.caption_dropout) == \
        (1024 ** 2, 1024 ** 2, 0.05)
    assert (cfg.train.steps, cfg.train.timestep_sampling, cfg.train.weighting) == (5000, "uniform", "none")
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep) == (100, 10)
    assert (cfg.model.position_scheme, cfg.model.guidance, cfg.sample.guidance) == ("dreamomni2", 1.0, 3.5)
    assert not any("It is" in v.prompt for v in cfg.sample.validation)


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


@pytest.mark.parametrize("override, match", [
    ("optim.lr=nan", r"optim\.lr=nan must be a finite number"),
    ("optim.lr=inf", r"optim\.lr=inf must be a finite number"),
    ("optim.lr=1e30", r"optim\.lr=1e\+30 must be <= 1"),
    ("optim.b1=1", r"optim\.b1=1\.0 must be in \[0\.0, 1\.0\)"),
    ("optim.b2=-0.1", r"optim\.b2=-0\.1 must be in"),
    ("optim.eps=-1e-8", r"optim\.eps=-1e-08 must be >= 0"),
    ("optim.weight_decay=-1", r"optim\.weight_decay=-1\.0 must be >= 0"),
    ("data.target_max_area=0", r"data\.target_max_area=0 must be > 0"),
    ("data.min_image_size=-1", r"data\.min_image_size=-1 must be >= 0"),
    ("data.max_sequence_length=0", r"data\.max_sequence_length=0 must be > 0"),
    ("train.logit_std=-1", r"train\.logit_std=-1\.0 must be >= 0"),
    ("model.guidance=nan", r"model\.guidance=nan must be a finite number"),
    ("sample.guidance=-inf", r"sample\.guidance=-inf must be a finite number"),
    ("train.run_dir=", r"train\.run_dir is empty"),
])
def test_value_ranges_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs/demo.py", [override])


def test_whole_config_is_validated_after_all_overrides():
    a = load_config(ROOT / "configs/demo.py", ["lora.preset=custom", "lora.targets=attn\\.to_q"])
    b = load_config(ROOT / "configs/demo.py", ["lora.targets=attn\\.to_q", "lora.preset=custom"])
    assert a == b and lora_target_patterns(a.lora) == ("attn\\.to_q",)
    with pytest.raises(ConfigError, match="lora.preset='custom' needs lora.targets"):
        load_config(ROOT / "configs/demo.py", ["lora.preset=custom"])


def test_broken_config_file_names_file_and_line(tmp_path):
    bad = tmp_path / "syntax.py"
    bad.write_text("from dreamomni2_jax.config import *\n\ndef get_config(:\n    pass\n")
    with pytest.raises(ConfigError, match=f"{bad}:3: SyntaxError"):
        load_config(bad)
    bad.write_text("import no_such_module_xyz\n")
    with pytest.raises(ConfigError, match=f"{bad}:1: ModuleNotFoundError"):
        load_config(bad)
    bad.write_text("from dreamomni2_jax.config import *\n\ndef get_config():\n    return Config(optim=1)\n")
    with pytest.raises(ConfigError, match=f"{bad}: config section 'optim' is a int"):
        load_config(bad)


def test_demo_config_follows_the_demo_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMOMNI2_DEMO_OUT", str(tmp_path / "elsewhere"))
    cfg = load_config(ROOT / "configs/demo.py")
    paths = [cfg.model.path, cfg.data.cache_dir, cfg.train.run_dir,
             *[r for v in cfg.sample.validation for r in v.references]]
    assert paths and all(p.startswith(str(tmp_path / "elsewhere") + "/") for p in paths), paths
