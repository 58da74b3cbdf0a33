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
from dreamomni2_jax.config import Config, override
from dreamomni2_jax.config_common import GENERATION_PREVIEW, klein_1024


def get_config() -> Config:
    return override(klein_1024(), model=dict(remat="full"), data=dict(batch_size=32, num_workers=8),
                    sample=dict(validation=(GENERATION_PREVIEW,)), train=dict(run_dir="runs/klein_tpu_v5"))
