"""Flux Kontext dev (12B) DreamOmni2 LoRA on a TPU v5p pod slice.

Single host (e.g. v5p-8):
    python scripts/train.py --config configs/tpu_v5.py --set model.path=/data/flux-kontext-jax \
        --set data.cache_dir=/mnt/bucket/cache --set train.run_dir=/mnt/bucket/runs/do2

Multi-host pod slice (e.g. v5p-64, 8 hosts): run the same command on every host at once, e.g.
    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
      "cd dreamomni2-jax && .venv/bin/python scripts/train.py --config configs/tpu_v5.py \
       --set model.path=/data/flux-kontext-jax --set data.cache_dir=/mnt/bucket/cache \
       --set train.run_dir=/mnt/bucket/runs/do2"
/mnt/bucket is a gcsfuse mount of your bucket (or any shared filesystem) on every host.
jax.distributed.initialize() is called automatically on multi-host TPU; base weights and optimizer
state are FSDP-sharded over all chips, the batch over data x fsdp.

Memory (scripts/aot.py, BENCHMARKS.md "Will it fit?"): batch 32 with two 1024^2 references is 8 samples per chip
on v5p-8, which fits only with full remat (83 GiB of 95.74 per chip; `dots_no_batch_saveable` keeps every
matmul output and fits 2 samples per chip with one reference). Check a change before launching:
    python scripts/aot.py --config configs/tpu_v5.py --topology v5p-8 [--set ...]
"""
from dreamomni2_jax.config import (CheckpointConfig, Config, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, SampleConfig, TrainConfig, ValidationSample)


def get_config() -> Config:
    return Config(
        model=ModelConfig(path="", param_dtype="bfloat16", compute_dtype="bfloat16", attention="auto",
                          remat="full", position_scheme="dreamomni2", guidance=1.0),
        lora=LoraConfig(rank=16, alpha=16.0, preset="attention", dtype="float32", init="gaussian"),
        data=DataConfig(batch_size=32, max_refs=3, target_max_area=1024 * 1024, batching="bucket", num_workers=8,
                        caption_dropout=0.05, synthetic_resolution=(1024, 1024),
                        synthetic_refs=((1024, 1024), (1024, 1024))),
        optim=OptimConfig(lr=1e-4, schedule="constant", warmup_steps=100, grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="auto"),
        checkpoint=CheckpointConfig(every_steps=250, max_to_keep=3, async_save=True),
        sample=SampleConfig(steps=28, guidance=3.5, every_steps=500, validation=(
            # generation preview (no reference files ship with the config): 1024x1024. For editing previews add
            # ValidationSample(prompt, references=("source.png", "ref.png")): sampled at the source's size. The task
            # suffix (" It is editing task.") belongs to the VLM prompt (--enhance), never to the Flux prompt.
            ValidationSample(prompt="A leather handbag with a red floral pattern on a wooden table.", references=(),
                             seed=0, task="generation"),)),
        train=TrainConfig(run_dir="runs/tpu_v5", steps=5000, seed=0, timestep_sampling="uniform",
                          weighting="none", log_every=10),
    )
