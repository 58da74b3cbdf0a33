"""FLUX.2 [klein] (4B / 9B "Base") multi-reference LoRA on a TPU v5p pod slice.

Convert the diffusers folder of the base checkpoint (Flux2KleinPipeline: Qwen3 text encoder, AutoencoderKLFlux2),
cache, then train; every command reads the model family from the converted folder:
    python convert/pipeline.py --src /data/FLUX.2-klein-base-4B --out /data/klein4b-jax --dtype bf16
    python scripts/cache.py --config configs/klein_tpu_v5.py --set model.path=/data/klein4b-jax \
        --data /data/train.jsonl --out /mnt/bucket/klein-cache
    python scripts/train.py --config configs/klein_tpu_v5.py --set model.path=/data/klein4b-jax \
        --set data.cache_dir=/mnt/bucket/klein-cache --set train.run_dir=/mnt/bucket/runs/klein4b
Multi-host slices: the same command on every host (see configs/tpu_v5.py). No guidance embedding: the model sees
4-axis ids (reference i at T = 10 + 10 i) and the Qwen3 prompt embeddings; validation previews use classifier-free
guidance against the empty prompt at `sample.guidance`, as Flux2KleinPipeline does.

LoRA: the klein_wide preset (diffusers' klein script default: the double blocks' image-stream attention and the
single blocks' fused QKV+MLP input and output projections) plus the double blocks' text-stream attention
projections. Memory (scripts/aot.py, BENCHMARKS.md "Will it fit?", FLUX.2 [klein]): klein 4B on v5p-8 with full
remat fits 23 samples per chip with 1 reference and 16 with 2 (94.44 of 95.74 GiB). The batch of 32 here is 8
per chip on v5p-8 with 2 references: klein 9B as written peaks at 81.07 GiB per chip (fits), 4B has room for
twice the batch. Check another slice or reference count before a run:
    python scripts/aot.py --config configs/klein_tpu_v5.py --model klein-9b --topology v6e-8 --refs 3
"""
from dreamomni2_jax.config import (CheckpointConfig, Config, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, SampleConfig, TrainConfig, ValidationSample)

# diffusers' klein script default (klein_wide) plus the double blocks' text-stream attention projections
TEXT_STREAM = (r"attn\.add_[qkv]_proj", r"attn\.to_add_out")


def get_config() -> Config:
    return Config(
        model=ModelConfig(path="", param_dtype="bfloat16", compute_dtype="bfloat16", attention="auto",
                          remat="full"),
        lora=LoraConfig(rank=16, alpha=16.0, preset="klein_wide", targets=TEXT_STREAM, dtype="float32",
                        init="gaussian"),
        data=DataConfig(batch_size=32, max_refs=3, target_max_area=1024 * 1024, batching="bucket", num_workers=8,
                        caption_dropout=0.05, synthetic_resolution=(1024, 1024),
                        synthetic_refs=((1024, 1024), (1024, 1024))),
        optim=OptimConfig(lr=1e-4, schedule="constant", warmup_steps=100, grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="auto"),
        checkpoint=CheckpointConfig(every_steps=250, max_to_keep=3, async_save=True),
        sample=SampleConfig(steps=50, guidance=4.0, every_steps=500, validation=(
            ValidationSample(prompt="A leather handbag with a red floral pattern on a wooden table.", references=(),
                             seed=0, task="generation"),)),
        train=TrainConfig(run_dir="runs/klein_tpu_v5", steps=5000, seed=0, timestep_sampling="uniform",
                          weighting="none", log_every=10),
    )
