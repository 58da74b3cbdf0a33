"""FLUX.2 [klein] (4B / 9B "Base") multi-reference LoRA on H100s: one 8xH100 host by default, one H100 with --set.

    python convert/pipeline.py --src /data/FLUX.2-klein-base-4B --out /data/klein4b-jax --dtype bf16
    python scripts/cache.py --config configs/klein_gpu_h100.py --set model.path=/data/klein4b-jax \
        --data /data/train.jsonl --out /data/klein-cache
8 x H100 (FSDP over the 8 GPUs):
    python scripts/train.py --config configs/klein_gpu_h100.py --set model.path=/data/klein4b-jax \
        --set data.cache_dir=/data/klein-cache --set train.run_dir=runs/klein_h100x8
Single H100 (80 GB):
    python scripts/train.py --config configs/klein_gpu_h100.py --set mesh.fsdp=1 --set data.batch_size=1 \
        --set model.remat=full --set model.path=/data/klein4b-jax --set data.cache_dir=/data/klein-cache
LoRA targets as in configs/klein_tpu_v5.py (klein_wide + the double blocks' text-stream attention). Memory
(scripts/aot.py, BENCHMARKS.md "Will it fit?"): as written, klein 4B with 2 references at 1024^2 on 8 x H100 peaks
at 37.28 GiB per GPU (one sample per GPU, dots_no_batch_saveable, cuDNN attention) of 72.78 usable; the single-H100
line and 9B are not compiled yet:
    python scripts/aot.py --config configs/klein_gpu_h100.py --model klein-9b --topology h100x8
Run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95.
"""
from dreamomni2_jax.config import (CheckpointConfig, Config, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, SampleConfig, TrainConfig)

# diffusers' klein script default (klein_wide) plus the double blocks' text-stream attention projections
TEXT_STREAM = (r"attn\.add_[qkv]_proj", r"attn\.to_add_out")


def get_config() -> Config:
    return Config(
        model=ModelConfig(path="", param_dtype="bfloat16", compute_dtype="bfloat16", attention="cudnn",
                          remat="dots_no_batch_saveable"),
        lora=LoraConfig(rank=16, alpha=16.0, preset="klein_wide", targets=TEXT_STREAM, dtype="float32",
                        init="gaussian"),
        data=DataConfig(batch_size=8, max_refs=3, target_max_area=1024 * 1024, batching="bucket", num_workers=4,
                        caption_dropout=0.05, synthetic_resolution=(1024, 1024),
                        synthetic_refs=((1024, 1024), (1024, 1024))),
        optim=OptimConfig(lr=1e-4, schedule="constant", warmup_steps=100, grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="off"),
        checkpoint=CheckpointConfig(every_steps=250, max_to_keep=3, async_save=True),
        sample=SampleConfig(steps=50, guidance=4.0, every_steps=500),
        train=TrainConfig(run_dir="runs/klein_h100", steps=5000, seed=0, timestep_sampling="uniform", log_every=10),
    )
