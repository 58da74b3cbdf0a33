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
from dreamomni2_jax.config import Config, override
from dreamomni2_jax.config_common import GENERATION_PREVIEW, full_1024


def get_config() -> Config:
    return override(full_1024(), model=dict(remat="full"), data=dict(batch_size=32, num_workers=8),
                    # generation preview (no reference files ship with the config): 1024x1024. For editing previews
                    # add ValidationSample(prompt, references=("source.png", "ref.png")): sampled at the source's
                    # size. The task suffix (" It is editing task.") belongs to the VLM prompt (--enhance), never
                    # to the Flux prompt.
                    sample=dict(validation=(GENERATION_PREVIEW,)),
                    train=dict(run_dir="runs/tpu_v5"))
