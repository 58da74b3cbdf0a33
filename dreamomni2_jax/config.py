"""Typed, frozen configuration: one dataclass per section, loaded from a Python config file.

A config file defines ``get_config() -> Config``. Command-line overrides use
``section.key=value`` (``--set optim.lr=3e-4 --set mesh.fsdp=8``); values are parsed by the
field's declared type, and unknown sections/keys or unparsable values raise
:class:`ConfigError` naming the key (the value checks: :mod:`dreamomni2_jax.config_checks`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamomni2_jax.config_checks import (  # noqa: F401 - ConfigError, read_json: public here too
    ConfigError, check_type as _check_type, choice as _choice, in_range as _in_range, positive as _positive, read_json)


class _Section:
    """Base of config sections: field types are checked on construction; values are validated by
    :meth:`Config.validate` once the whole config is assembled (so overrides may be given in any order)."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(self._key(f.name), getattr(self, f.name), hints[f.name])

    def _key(self, name: str) -> str:
        return f"{_SECTION_NAMES.get(type(self).__name__, type(self).__name__)}.{name}"

    def _check_finite(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{self._key(f.name)}={v!r} must be a finite number")

    def _validate(self) -> None:
        pass


_SECTION_NAMES = {"ModelConfig": "model", "LoraConfig": "lora", "DataConfig": "data", "OptimConfig": "optim",
                  "MeshConfig": "mesh", "CheckpointConfig": "checkpoint", "SampleConfig": "sample",
                  "TrainConfig": "train"}


@dataclass(frozen=True)
class ModelConfig(_Section):
    path: str = ""  # converted model folder (convert/pipeline.py output) or a diffusers Flux Kontext folder
    param_dtype: str = "bfloat16"  # frozen base weights
    compute_dtype: str = "bfloat16"
    attention: str = "auto"  # auto (splash on TPU, cudnn on NVIDIA, blocked on CPU) | xla | cudnn | splash | blocked
    # none | full | dots_saveable | dots_no_batch_saveable (saves weight matmuls only, not attention logits:
    # plain dots_saveable also keeps the [B, H, S, S] logits, 514 GiB at 1024^2 + 1 reference)
    remat: str = "dots_no_batch_saveable"
    position_scheme: str = "dreamomni2"  # dreamomni2 | kontext (see dreamomni2_jax.layout.ids_flux1)
    # int32: exact position ids (default); bfloat16: rounded like the reference pipelines' bf16 ids (columns > 256
    # lose precision), only for bit-level parity with them
    ids_dtype: str = "int32"
    # guidance-embedding value fed during training (guidance-distilled models): 1.0 as qflux and SimpleTuner;
    # diffusers' train_dreambooth_lora_flux_kontext.py feeds --guidance_scale, default 3.5
    guidance: float = 1.0

    def _validate(self):
        _choice("model.param_dtype", self.param_dtype, ("bfloat16", "float32", "float16"))
        _choice("model.compute_dtype", self.compute_dtype, ("bfloat16", "float32", "float16"))
        _choice("model.attention", self.attention, ("auto", "xla", "cudnn", "splash", "splash_interpret", "blocked"))
        _choice("model.remat", self.remat, ("none", "full", "dots_saveable", "dots_no_batch_saveable"))
        _choice("model.ids_dtype", self.ids_dtype, ("int32", "bfloat16"))


@dataclass(frozen=True)
class LoraConfig(_Section):
    rank: int = 16
    alpha: float = 16.0
    # a preset of the model's schema (models.schemas.lora_presets: FLUX.1 attention | kontext_wide, FLUX.2
    # attention | klein_wide; checked against the model when the adapters are attached), or "custom": `targets` only
    preset: str = "attention"
    targets: tuple[str, ...] = ()  # extra regexes over module paths (searched, not fully matched)
    dropout: float = 0.0
    dtype: str = "float32"  # adapter parameter dtype
    init_from: str = ""  # existing LoRA safetensors (diffusers/PEFT or kohya) to start from
    # lora_A init (lora_B = 0): gaussian N(0, 1/rank²) as diffusers' Kontext script and qflux
    # (peft init_lora_weights="gaussian"); kaiming: peft's default Kaiming-uniform, ~6x smaller at Flux widths
    init: str = "gaussian"
    # "dora": DoRA (peft's use_dora): a trained magnitude per output feature on top of the low-rank update
    variant: str = "lora"

    def _validate(self):
        _positive("lora.rank", self.rank)
        _positive("lora.alpha", self.alpha)
        if not self.preset or not self.preset.isidentifier():
            raise ConfigError(f"lora.preset={self.preset!r} must be a preset name or 'custom'")
        _choice("lora.dtype", self.dtype, ("float32", "bfloat16"))
        _choice("lora.init", self.init, ("gaussian", "kaiming"))
        _choice("lora.variant", self.variant, ("lora", "dora"))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.preset == "custom" and not self.targets:
            raise ConfigError("lora.preset='custom' needs lora.targets")


@dataclass(frozen=True)
class DataConfig(_Section):
    cache_dir: str = ""  # output of scripts/cache.py; empty -> synthetic batches (benchmarks, smoke runs)
    batch_size: int = 1  # global batch size (all hosts and devices)
    max_refs: int = 3
    # pixels. Generation targets are resized to this area keeping their aspect; an editing target and its source
    # (first reference) are resized together to the source's Kontext resolution scaled to this area.
    target_max_area: int = 1024 * 1024
    # pixels; the other references (Kontext resolutions, ~1 MP as in the official pipelines), independent of the
    # target area. >= 1024**2 gives the exact Kontext resolutions; smaller scales them down (tiny configs).
    reference_max_area: int = 1024 * 1024
    pair_aspect_tolerance: float = 0.02  # editing target vs source aspect ratio, relative; above: bad input
    min_image_size: int = 64  # pixels, shorter side; smaller inputs are bad input
    batching: str = "bucket"  # bucket (same shapes per batch) | pad (pad to batch max, token masks)
    pad_multiple: int = 1  # batching="pad": round token counts up to a multiple (fewer recompiles)
    num_workers: int = 0  # grain worker processes (0 = in-process)
    shuffle_seed: int = 0
    caption_dropout: float = 0.0  # probability of using the cached empty-prompt embeddings
    max_sequence_length: int = 512  # T5 tokens
    synthetic_resolution: tuple[int, int] = (1024, 1024)  # target pixels for synthetic batches
    synthetic_refs: tuple[tuple[int, int], ...] = ((1024, 1024),)  # reference pixels for synthetic batches
    # per sample, each reference after the first is dropped with this probability (deterministic per global
    # sample index; see dreamomni2_jax.data.ref_dropout)
    reference_dropout: float = 0.0
    eval_cache_dir: str = ""  # a second cache (scripts/cache.py) for the held-out loss (train.eval_every)

    def _validate(self):
        _positive("data.batch_size", self.batch_size)
        _positive("data.max_refs", self.max_refs)
        _choice("data.batching", self.batching, ("bucket", "pad"))
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.target_max_area", self.target_max_area)
        _positive("data.reference_max_area", self.reference_max_area)
        _positive("data.pair_aspect_tolerance", self.pair_aspect_tolerance, allow_zero=True)
        _positive("data.pad_multiple", self.pad_multiple)
        _positive("data.target_max_area", self.target_max_area)
        _positive("data.min_image_size", self.min_image_size, allow_zero=True)
        _positive("data.max_sequence_length", self.max_sequence_length)
        for name, sizes in (("data.synthetic_resolution", (self.synthetic_resolution,)),
                            ("data.synthetic_refs", self.synthetic_refs)):
            for size in sizes:
                if len(size) != 2 or min(size) <= 0:
                    raise ConfigError(f"{name}: {size!r} is not a (height, width) pair of positive sizes")
        if not 0 <= self.caption_dropout <= 1:
            raise ConfigError(f"data.caption_dropout={self.caption_dropout} must be in [0, 1]")
        _in_range("data.reference_dropout", self.reference_dropout, 0.0, 1.0, hi_open=False)


@dataclass(frozen=True)
class OptimConfig(_Section):
    # adamw | prodigy | schedule_free_adamw | muon | adafactor (optax / optax.contrib; see dreamomni2_jax.train.optimizers)
    name: str = "adamw"
    lr: float = 1e-4  # prodigy: a multiplier of its own step-size estimate (use 1.0)
    schedule: str = "constant"  # constant | cosine (after warmup)
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # micro-batches per update (equal to one k-times larger batch)
    max_nonfinite: int = 5  # consecutive NaN/inf steps (skipped) before training stops
    prodigy_d_coef: float = 1.0  # prodigy: scale of the estimated step size
    schedule_free_warmup: int = 0  # schedule_free_adamw: its own warm-up steps (use with optim.schedule=constant)
    muon_ns_steps: int = 5  # muon: Newton-Schulz iterations
    adafactor_min_dim_size_to_factor: int = 128  # adafactor: smaller dimensions keep full second moments
    # adafactor: scale steps by each parameter's RMS (Adafactor's relative steps). Off by default: LoRA's B starts at
    # zero, so relative steps would start ~1000x smaller than optim.lr
    adafactor_parameter_scale: bool = False

    def _validate(self):
        _choice("optim.name", self.name, ("adamw", "prodigy", "schedule_free_adamw", "muon", "adafactor"))
        _positive("optim.prodigy_d_coef", self.prodigy_d_coef)
        _positive("optim.schedule_free_warmup", self.schedule_free_warmup, allow_zero=True)
        _positive("optim.muon_ns_steps", self.muon_ns_steps)
        _positive("optim.adafactor_min_dim_size_to_factor", self.adafactor_min_dim_size_to_factor)
        _positive("optim.lr", self.lr)
        if self.lr > 1:
            raise ConfigError(f"optim.lr={self.lr!r} must be <= 1 (Adam moves each adapter weight by about lr per "
                              "step; a larger value destroys the adapters)")
        _in_range("optim.b1", self.b1, 0.0, 1.0)
        _in_range("optim.b2", self.b2, 0.0, 1.0)
        _positive("optim.eps", self.eps, allow_zero=True)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _choice("optim.schedule", self.schedule, ("constant", "cosine"))
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if self.name == "schedule_free_adamw" and (self.schedule != "constant" or self.warmup_steps):
            raise ConfigError("optim.name='schedule_free_adamw' replaces the learning-rate schedule: keep "
                              "optim.schedule='constant' and optim.warmup_steps=0, use optim.schedule_free_warmup")
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        _positive("optim.grad_accum", self.grad_accum)
        _positive("optim.max_nonfinite", self.max_nonfinite)


@dataclass(frozen=True)
class MeshConfig(_Section):
    data: int = 1  # pure data parallelism (replicated weights), e.g. across hosts
    fsdp: int = -1  # -1: all remaining devices; base weights and optimizer state sharded here
    tensor: int = 1  # tensor parallelism over heads / MLP hidden
    distributed: str = "auto"  # auto | on | off: jax.distributed.initialize() for multi-host
    init_timeout_s: int = 300  # how long a process waits for the coordinator (process 0) before it gives up
    heartbeat_timeout_s: int = 100  # a process silent this long counts as dead: the others stop (JAX's default)
    # data parallelism across TPU slices (multi-slice over the data-center network): the number of slices; the
    # data / fsdp / tensor sizes above are then per slice. 1: one mesh over all devices (no "dcn_data" axis)
    dcn_data: int = 1

    def _validate(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(f"mesh sizes (data, fsdp, tensor)={sizes}: each >= 1, at most one -1")
        if not isinstance(self.dcn_data, int) or isinstance(self.dcn_data, bool) or self.dcn_data < 1:
            raise ConfigError(f"mesh.dcn_data={self.dcn_data!r}: the number of slices, an integer >= 1")
        _choice("mesh.distributed", self.distributed, ("auto", "on", "off"))
        _positive("mesh.init_timeout_s", self.init_timeout_s)
        _positive("mesh.heartbeat_timeout_s", self.heartbeat_timeout_s)


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    every_steps: int = 500
    max_to_keep: int = 3
    async_save: bool = True

    def _validate(self):
        _positive("checkpoint.every_steps", self.every_steps)
        _positive("checkpoint.max_to_keep", self.max_to_keep)


@dataclass(frozen=True)
class ValidationSample:
    prompt: str  # the Flux prompt (DreamOmni2's task suffix belongs to the VLM prompt, not here)
    references: tuple[str, ...] = ()
    seed: int = 0
    # output pixels; 0 x 0: editing -> the source's (first reference's) cached size at data.target_max_area
    # (as DreamOmni2 edits at the source's size), generation -> a square of data.target_max_area (1024² at 1 MP)
    height: int = 0
    width: int = 0
    task: str = ""  # editing | generation | "" (editing with references, else generation)


@dataclass(frozen=True)
class SampleConfig(_Section):
    steps: int = 28
    guidance: float = 3.5  # guidance embedding at inference (Kontext dev default 2.5-3.5)
    true_cfg_scale: float = 1.0  # > 1 enables true CFG with negative_prompt
    negative_prompt: str = ""
    every_steps: int = 0  # validation sampling during training; 0 disables
    validation: tuple[ValidationSample, ...] = ()
    use_ema: bool = False  # validation samples with the EMA adapters (needs train.ema_decay > 0)
    # also preview the first N records of data.eval_cache_dir: references | sample | target (decoded from the cache)
    eval_records: int = 0

    def _validate(self):
        _positive("sample.steps", self.steps)
        _positive("sample.every_steps", self.every_steps, allow_zero=True)
        _positive("sample.eval_records", self.eval_records, allow_zero=True)


@dataclass(frozen=True)
class TrainConfig(_Section):
    run_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    # uniform (σ ~ U(0, 1), what diffusers' Kontext script and qflux train with) | logit_normal | mode | sigmoid_shift
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"  # none | sigma_sqrt | cosmap
    log_every: int = 1
    # masked loss (dreamomni2_jax.data.loss_mask): none | manifest (a record's "mask" image) | difference (where an
    # editing target differs from its source, in latent space)
    loss_mask: str = "none"
    mask_floor: float = 0.0  # loss weight outside the mask (1.0 = unmasked)
    mask_threshold: float = 0.1  # difference: mean |target - source| over latent channels above this is "changed"
    mask_dilate: int = 1  # difference: grow the changed region by this many latent pixels
    ema_decay: float = 0.0  # EMA of the adapters (dreamomni2_jax.train.ema); 0 = off
    eval_every: int = 0  # held-out loss over data.eval_cache_dir every this many steps; 0 = off
    eval_sigmas: int = 8  # noise levels of the held-out loss (quantiles of the training σ distribution)
    ema_warmup: bool = False  # diffusers EMAModel's schedule: 0, then min(ema_decay, (1 + n) / (10 + n)) at update n

    def _validate(self):
        _positive("train.steps", self.steps)
        _choice("train.loss_mask", self.loss_mask, ("none", "manifest", "difference"))
        _in_range("train.mask_floor", self.mask_floor, 0.0, 1.0, hi_open=False)
        _positive("train.mask_threshold", self.mask_threshold, allow_zero=True)
        _positive("train.mask_dilate", self.mask_dilate, allow_zero=True)
        _in_range("train.ema_decay", self.ema_decay, 0.0, 1.0)
        _positive("train.eval_every", self.eval_every, allow_zero=True)
        _positive("train.eval_sigmas", self.eval_sigmas)
        _choice("train.timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal", "mode", "sigmoid_shift"))
        _choice("train.weighting", self.weighting, ("none", "sigma_sqrt", "cosmap"))
        _positive("train.log_every", self.log_every)
        _positive("train.logit_std", self.logit_std, allow_zero=True)
        _positive("train.mode_scale", self.mode_scale, allow_zero=True)
        if not self.run_dir.strip():
            raise ConfigError("train.run_dir is empty: set it to the folder for checkpoints and metrics")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every value range of every section (NaN / inf floats anywhere are errors); raises :class:`ConfigError`."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if not isinstance(section, _Section):
                raise ConfigError(f"config section {f.name!r} is a {type(section).__name__}, expected "
                                  f"{typing.get_type_hints(Config)[f.name].__name__}")
            section._check_finite()
            section._validate()
        if self.train.eval_every > 0 and not self.data.eval_cache_dir:
            raise ConfigError("train.eval_every > 0 needs data.eval_cache_dir (a cache of held-out records)")
        if self.sample.eval_records > 0 and not self.data.eval_cache_dir:
            raise ConfigError("sample.eval_records > 0 needs data.eval_cache_dir (a cache of held-out records)")
        if self.sample.use_ema and self.train.ema_decay <= 0:
            raise ConfigError("sample.use_ema=true needs train.ema_decay > 0 (no EMA adapters are kept)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------- parsing


def _parse_value(key: str, text: str, tp) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a bool (true/false), got {text!r}")
    if tp in (int, float):
        try:
            value = float(text) if tp is float else int(text, 0)
        except ValueError:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {text!r}") from None
        return value
    if tp is str:
        return text
    if origin is tuple:
        try:
            raw = json.loads(text) if text.strip().startswith("[") else [t for t in text.split(",") if t.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: cannot parse {text!r} as a list ({e})") from None
        args = typing.get_args(tp)
        elem = args[0] if args else str
        return tuple(_coerce(key, v, elem) for v in raw)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() in ("none", "null"):
            return None
        return _parse_value(key, text, args[0])
    raise ConfigError(f"{key}: overriding fields of type {tp} from the command line is not supported")


def _coerce(key: str, value: Any, tp) -> Any:
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, *_) = typing.get_args(tp) or (str,)
        return tuple(_coerce(key, v, elem) for v in value)
    if isinstance(value, str):
        return _parse_value(key, value, tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _field_type(cfg: Config, sec_name: str, field_name: str):
    """The declared type of ``sec_name.field_name``; :class:`ConfigError` naming the key when either is unknown."""
    key = f"{sec_name}.{field_name}"
    sections = {f.name for f in dataclasses.fields(cfg)}
    if sec_name not in sections:
        raise ConfigError(f"unknown config section {sec_name!r} in {key!r}; sections: {sorted(sections)}")
    hints = typing.get_type_hints(type(getattr(cfg, sec_name)))
    if field_name not in hints:
        raise ConfigError(f"unknown config key {key!r}; {sec_name} keys: {sorted(hints)}")
    return hints[field_name]


def _replace_fields(cfg: Config, changes: dict[str, dict[str, Any]]) -> Config:
    """``cfg`` with ``changes`` ({section: {key: value}}, keys already checked), validated once."""
    if not changes:
        cfg.validate()
        return cfg
    new = {}
    for sec_name, fields in changes.items():
        try:
            new[sec_name] = dataclasses.replace(getattr(cfg, sec_name), **fields)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{sec_name}: {e}") from None
    return dataclasses.replace(cfg, **new)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` strings (later ones win), then validate the whole config once: overrides may
    come in any order. Errors name the offending key."""
    changes: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.count(".") != 1:
            raise ConfigError(f"override key {key!r} must be section.key (e.g. optim.lr)")
        sec_name, field_name = key.split(".")
        changes.setdefault(sec_name, {})[field_name] = _parse_value(key, text, _field_type(cfg, sec_name, field_name))
    return _replace_fields(cfg, changes)


def override(cfg: Config, **sections: dict[str, Any]) -> Config:
    """:func:`apply_overrides` with typed values, for config files that start from a base
    (:mod:`dreamomni2_jax.config_common`): ``override(base, data=dict(batch_size=8), mesh=dict(distributed="off"))``.
    Keys are checked as for ``--set``, values must have the field's type (an int is a float); validated once."""
    for sec_name, fields in sections.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"override {sec_name}=...: expected a dict of {sec_name} keys, got "
                              f"{type(fields).__name__}")
        for field_name in fields:
            _field_type(cfg, sec_name, field_name)
    return _replace_fields(cfg, sections)


def _where(path: Path, err: BaseException) -> str:
    """``file:line`` of the deepest frame of ``err`` inside the config file ``path``."""
    if isinstance(err, SyntaxError) and err.lineno:
        return f"{err.filename or path}:{err.lineno}"
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    return f"{path}:{line}" if line else str(path)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Import a config file, call its ``get_config()``, apply overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_dreamomni2_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError("defines no get_config()")
        cfg = module.get_config()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a broken config file is user input: name the file and line
        raise ConfigError(f"{_where(path, e)}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected dreamomni2_jax.config.Config")
    return apply_overrides(cfg, overrides)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. a checkpoint's saved config)."""
    sections = {}
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        raw = dict(data.get(sec.name, {}))
        hints = typing.get_type_hints(cls)
        unknown = set(raw) - set(hints)
        if unknown:
            raise ConfigError(f"unknown keys in section {sec.name!r}: {sorted(unknown)}")
        if sec.name == "sample" and "validation" in raw:
            raw["validation"] = tuple(ValidationSample(**{**v, "references": tuple(v.get("references", ()))})
                                      for v in raw["validation"])
        for k, v in list(raw.items()):
            if typing.get_origin(hints[k]) is tuple and k != "validation":
                raw[k] = _coerce(f"{sec.name}.{k}", v, hints[k])
        sections[sec.name] = cls(**raw)
    return Config(**sections)
