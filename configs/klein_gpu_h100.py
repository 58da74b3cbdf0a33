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
from dreamomni2_jax.config import Config, override
from dreamomni2_jax.config_common import klein_1024


def get_config() -> Config:
    return override(klein_1024(), model=dict(attention="cudnn"), data=dict(batch_size=8),
                    mesh=dict(distributed="off"), train=dict(run_dir="runs/klein_h100"))
