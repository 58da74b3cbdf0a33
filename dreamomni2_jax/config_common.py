"""The shared bases of the shipped configs (``configs/*.py``), as big_vision's ``configs/common.py``: each config
file starts from one of these and states only what differs, with :func:`dreamomni2_jax.config.override`. They live
in the package, not next to the configs, so a config file copied to any folder still imports them.

* :func:`full_1024`: Flux Kontext dev (12B) at 1024², bf16; the H100 / TPU targets and the DreamOmni2 recipe.
* :func:`klein_1024`: the same for FLUX.2 [klein] (4B / 9B "Base"): other LoRA targets and sampling defaults.
* :func:`tiny_demo`: the tiny CPU demo over the random model and data ``scripts/demo.py`` writes.
"""
from __future__ import annotations

from dreamomni2_jax.config import (CheckpointConfig, Config, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, SampleConfig, TrainConfig, ValidationSample, override)

# diffusers' klein script default (klein_wide) plus the double blocks' text-stream attention projections
KLEIN_TEXT_STREAM = (r"attn\.add_[qkv]_proj", r"attn\.to_add_out")

# a generation preview (no reference files ship with the configs): sampled at 1024x1024
GENERATION_PREVIEW = ValidationSample(prompt="A leather handbag with a red floral pattern on a wooden table.",
                                      references=(), seed=0, task="generation")


def full_1024() -> Config:
    """Flux Kontext dev at 1 MP (targets and up to 3 references at 1024²), bf16 base, rank-16 LoRA on every
    attention projection, AdamW at 1e-4 after 100 warm-up steps, 5000 steps, multi-host set-up automatic. A config
    sets its batch size, and its attention / remat / workers where the hardware asks for others."""
    return Config(
        model=ModelConfig(path="", param_dtype="bfloat16", compute_dtype="bfloat16", attention="auto",
                          remat="dots_no_batch_saveable", position_scheme="dreamomni2", guidance=1.0,
                          ids_dtype="int32"),
        lora=LoraConfig(rank=16, alpha=16.0, preset="attention", dropout=0.0, dtype="float32", init="gaussian"),
        data=DataConfig(batch_size=1, max_refs=3, target_max_area=1024 * 1024, reference_max_area=1024 * 1024,
                        caption_dropout=0.05, batching="bucket", num_workers=4,
                        synthetic_resolution=(1024, 1024), synthetic_refs=((1024, 1024), (1024, 1024))),
        optim=OptimConfig(lr=1e-4, schedule="constant", warmup_steps=100, grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="auto"),
        checkpoint=CheckpointConfig(every_steps=250, max_to_keep=3, async_save=True),
        sample=SampleConfig(steps=28, guidance=3.5, every_steps=500),
        train=TrainConfig(run_dir="runs/default", steps=5000, seed=0, timestep_sampling="uniform", weighting="none",
                          log_every=10),
    )


def klein_1024() -> Config:
    """:func:`full_1024` for FLUX.2 [klein]: the klein_wide LoRA preset plus the double blocks' text-stream
    attention, and Flux2KleinPipeline's sampling (50 steps, classifier-free guidance 4.0). The FLUX.1-only model
    fields (``position_scheme``, ``guidance``) stay at their defaults and are not read for klein."""
    return override(full_1024(), lora=dict(preset="klein_wide", targets=KLEIN_TEXT_STREAM),
                    sample=dict(steps=50, guidance=4.0))


def tiny_demo(out: str, size: int) -> Config:
    """The tiny CPU demo (FLUX.1 Kontext's LoRA preset and guidance) on what ``scripts/demo.py`` writes under
    ``out``: ``size``² targets and references, float32, rank-4 LoRA, 20 steps, a validation grid every 10."""
    return Config(
        model=ModelConfig(path=f"{out}/model", param_dtype="float32", compute_dtype="float32", attention="auto",
                          remat="none", position_scheme="dreamomni2", guidance=1.0),
        lora=LoraConfig(rank=4, alpha=4.0, preset="attention", init="gaussian"),
        data=DataConfig(cache_dir=f"{out}/cache", batch_size=2, max_refs=3, target_max_area=size * size,
                        reference_max_area=size * size, min_image_size=32, batching="pad", num_workers=0,
                        max_sequence_length=32, synthetic_resolution=(size, size),
                        synthetic_refs=((size, size), (size * 3 // 4, size))),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="off"),
        checkpoint=CheckpointConfig(every_steps=5, max_to_keep=2, async_save=False),
        sample=SampleConfig(steps=4, guidance=3.5, every_steps=10, validation=(
            ValidationSample(prompt="put the hat from image 2 on the person in image 1",
                             references=(f"{out}/data/img/s1_ref0.png", f"{out}/data/img/s1_ref1.png"),
                             seed=0, height=size, width=size),)),
        train=TrainConfig(run_dir=f"{out}/run", steps=20, seed=0, timestep_sampling="uniform", log_every=1),
    )
