"""Flux Kontext dev (12B) DreamOmni2 LoRA on H100s: one 8xH100 host by default, one H100 with --set.

8 x H100 (FSDP over the 8 GPUs):
    python scripts/train.py --config configs/gpu_h100.py --set model.path=/data/flux-kontext-jax \
        --set data.cache_dir=/data/cache --set train.run_dir=runs/h100x8
Single H100 (80 GB; bf16 base, full remat):
    python scripts/train.py --config configs/gpu_h100.py --set mesh.fsdp=1 --set data.batch_size=1 \
        --set model.remat=full --set model.path=/data/flux-kontext-jax --set data.cache_dir=/data/cache
Memory (scripts/aot.py --topology h100x8, BENCHMARKS.md "Will it fit?"): one sample per GPU with two 1024^2
references and `dots_no_batch_saveable` needs 54 GiB per GPU. Run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
(JAX keeps 25% of the GPU back by default).
"""
from dreamomni2_jax.config import (CheckpointConfig, Config, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, SampleConfig, TrainConfig)


def get_config() -> Config:
    return Config(
        model=ModelConfig(path="", param_dtype="bfloat16", compute_dtype="bfloat16", attention="cudnn",
                          remat="dots_no_batch_saveable", position_scheme="dreamomni2", guidance=1.0),
        lora=LoraConfig(rank=16, alpha=16.0, preset="attention", dtype="float32", init="gaussian"),
        data=DataConfig(batch_size=8, max_refs=3, target_max_area=1024 * 1024, batching="bucket", num_workers=4,
                        caption_dropout=0.05, synthetic_resolution=(1024, 1024),
                        synthetic_refs=((1024, 1024), (1024, 1024))),
        optim=OptimConfig(lr=1e-4, schedule="constant", warmup_steps=100, grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="off"),
        checkpoint=CheckpointConfig(every_steps=250, max_to_keep=3, async_save=True),
        sample=SampleConfig(steps=28, guidance=3.5, every_steps=500),
        train=TrainConfig(run_dir="runs/h100", steps=5000, seed=0, timestep_sampling="uniform", log_every=10),
    )
