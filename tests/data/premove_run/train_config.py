"""Training config of the pre-move run fixture (tests/data/premove_run/run), shared by make_fixture.py (which wrote
the run with the pre-move code, commit d9c5347) and tests/e2e/test_premove_resume.py (which resumes it with this code).

model.path, data.cache_dir and train.run_dir are placeholders: both callers pass them with --set (the tiny converted
model and the tiny cache of tests/support/fixtures_data.py, and the run directory). The data settings are those of
``tests/support/fixtures_data.tiny_config`` (the cache is built with them).
"""
from dreamomni2_jax.config import (CheckpointConfig, Config, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, TrainConfig)


def get_config() -> Config:
    return Config(
        model=ModelConfig(path="set-with---set", param_dtype="float32", compute_dtype="float32", attention="xla",
                          remat="none"),
        lora=LoraConfig(rank=2, alpha=4.0, preset="attention"),
        data=DataConfig(cache_dir="set-with---set", batch_size=2, max_refs=3, target_max_area=96 * 96,
                        reference_max_area=96 * 96, min_image_size=32, batching="bucket", num_workers=0,
                        max_sequence_length=32),
        optim=OptimConfig(lr=1e-2, warmup_steps=0),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1, distributed="off"),
        checkpoint=CheckpointConfig(every_steps=2, max_to_keep=5, async_save=False),
        train=TrainConfig(run_dir="set-with---set", steps=4, seed=0, log_every=1),
    )
