"""Tiny CPU demo: trains a LoRA on the tiny random model and data that `make demo` generates.

    make demo                                  # does everything below
    python scripts/train.py --config configs/demo.py \
        --set model.path=demo_out/model --set data.cache_dir=demo_out/cache --set train.run_dir=demo_out/run

Paths are under ``$DREAMOMNI2_DEMO_OUT`` (default ``demo_out``; ``scripts/demo.py --out`` sets it).
"""
import os

from dreamomni2_jax.config import (CheckpointConfig, Config, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, SampleConfig, TrainConfig, ValidationSample)


def get_config() -> Config:
    out = os.environ.get("DREAMOMNI2_DEMO_OUT", "demo_out")
    return Config(
        model=ModelConfig(path=f"{out}/model", param_dtype="float32", compute_dtype="float32",
                          attention="auto", remat="none", position_scheme="dreamomni2", guidance=1.0),
        lora=LoraConfig(rank=4, alpha=4.0, preset="attention", init="gaussian"),
        data=DataConfig(cache_dir=f"{out}/cache", batch_size=2, max_refs=3, target_max_area=128 * 128,
                        reference_max_area=128 * 128, min_image_size=32, batching="pad", num_workers=0, max_sequence_length=32,
                        synthetic_resolution=(128, 128), synthetic_refs=((128, 128), (96, 128))),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="off"),
        checkpoint=CheckpointConfig(every_steps=5, max_to_keep=2, async_save=False),
        sample=SampleConfig(steps=4, guidance=3.5, every_steps=10, validation=(
            ValidationSample(prompt="put the hat from image 2 on the person in image 1",
                             references=(f"{out}/data/img/s1_ref0.png", f"{out}/data/img/s1_ref1.png"),
                             seed=0, height=128, width=128),)),
        train=TrainConfig(run_dir=f"{out}/run", steps=20, seed=0, timestep_sampling="uniform", log_every=1),
    )
