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
from dreamomni2_jax.config import Config, override
from dreamomni2_jax.config_common import full_1024


def get_config() -> Config:
    return override(full_1024(), model=dict(attention="cudnn"), data=dict(batch_size=8),
                    mesh=dict(distributed="off"), train=dict(run_dir="runs/h100"))
