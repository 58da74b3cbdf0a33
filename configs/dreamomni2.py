"""Reproduce DreamOmni2: the training recipe of the qflux DreamOmni2 / Flux Kontext LoRA trainer, value by value.

    python scripts/cache.py --config configs/dreamomni2.py --data DATASET --out /data/cache \
        --set model.path=/data/flux-kontext-jax --enhance /data/DreamOmni2/vlm-model
    python scripts/train.py --config configs/dreamomni2.py --set model.path=/data/flux-kontext-jax \
        --set data.cache_dir=/data/cache --set train.run_dir=runs/dreamomni2

Sources (the documents the project started from, and the reference code):

[RN]  qflux v3.3.0 release notes, DreamOmni2 trainer example config: ``r: 16``, ``lora_alpha: 16``,
      ``target_modules: ["to_k", "to_q", "to_v", "to_out.0"]``, ``use_vlm_prompt_enhancer: true``, cumulative
      column offsets for several references.
[KP]  qflux Flux Kontext LoRA trainer plan, example config: ``init_lora_weights: "gaussian"``,
      ``image_size: [1024, 1024]``, ``caption_dropout_rate: 0.05``, ``batch_size: 1``, AdamW ``lr: 0.0001``,
      ``betas: [0.9, 0.999]``, ``weight_decay: 0.01``, ``eps: 1e-8``, cosine schedule with ``warmup_steps: 100``,
      ``gradient_accumulation_steps: 4``, ``max_train_steps: 5000``, ``checkpointing_steps: 100``,
      ``checkpoints_total_limit: 10``, ``max_grad_norm: 1.0``, ``mixed_precision: "bf16"``,
      ``gradient_checkpointing: true``; the loss uses diffusers' ``compute_density_for_timestep_sampling`` /
      ``compute_loss_weighting_for_sd3`` (the scheme is not given).
[PN]  DreamOmni2 paper notes: editing samples are (target, source, instruction, references), generation samples
      (references, instruction, target); the VLM is trained jointly and rewrites instructions.
[DO2] DreamOmni2 inference_edit.py / inference_gen.py: the VLM prompt is the instruction + " It is editing task."
      / " It is generation task.", ``max_new_tokens=4096``; Flux samples editing at the source's size, generation
      at 1024x1024, ``guidance_scale=3.5``.
[QF]  qflux / diffusers trainers: uniform σ (``weighting_scheme`` "none"), guidance embedding 1.0 during training
      in qflux.

Where the documents are silent (said so below) the project's defaults, which follow the reference trainers, stay.

Field by field:

* model.position_scheme = dreamomni2: cumulative column offsets [RN].
* model.param_dtype / compute_dtype = bfloat16: ``mixed_precision: "bf16"`` [KP].
* model.remat: ``gradient_checkpointing: true`` [KP]; which activations are recomputed is ours (no numeric effect).
* model.guidance = 1.0: the documents are silent; qflux feeds 1.0 [QF] (diffusers' script feeds 3.5).
* lora.rank = 16, lora.alpha = 16, lora.preset = attention (to_q/k/v/out.0 of every block) [RN][KP].
* lora.init = gaussian [KP]. lora.dropout = 0: the documents are silent.
* data.target_max_area = 1024², data.reference_max_area = 1024²: ``image_size: [1024, 1024]`` [KP]; editing
  targets share their source's Kontext size [DO2].
* data.caption_dropout = 0.05 [KP]. (``prompt_image_dropout_rate: 0.05`` [KP] has no counterpart here.)
* data.max_refs = 3: the documents are silent (the project default).
* data.batch_size = 4 with optim.grad_accum = 4: ``batch_size: 1`` x ``gradient_accumulation_steps: 4`` [KP],
  i.e. 4 samples per update, one per forward. On N > 1 devices raise batch_size to 4·N (qflux's per-GPU batch).
* optim: AdamW, lr 1e-4, b1 0.9, b2 0.999, eps 1e-8, weight_decay 0.01, cosine after 100 warmup steps, gradient
  clipping at 1.0 [KP].
* train.steps = 5000 [KP]; train.timestep_sampling = uniform, train.weighting = none: [KP] names diffusers'
  functions without the scheme; uniform / none are the reference trainers' defaults [QF].
* checkpoint.every_steps = 100, checkpoint.max_to_keep = 10 [KP].
* Task suffix: with ``use_vlm_prompt_enhancer: true`` [RN] the instructions are rewritten by the VLM in the cache
  stage (``scripts/cache.py --enhance``); the suffix goes to the VLM prompt only [DO2]; records carry their task
  (``"task"`` in the manifest, editing by default).
* sample: guidance 3.5 [DO2]; 28 steps: the Kontext pipeline's default (inference_edit.py uses 8, inference_gen.py
  30); validation
  entries: none ship (add yours with references; editing previews render at the source's size [DO2]).
"""
from dreamomni2_jax.config import Config, override
from dreamomni2_jax.config_common import full_1024


def get_config() -> Config:
    # full_1024() already holds the rest of the recipe above: bf16, remat, rank/alpha 16 gaussian on attention,
    # 1024² areas, caption dropout 0.05, max_refs 3, AdamW lr 1e-4 (b1 0.9, b2 0.999, eps 1e-8) after 100 warm-up
    # steps, clipping at 1.0, 5000 steps, uniform σ without weighting, sample 28 steps at guidance 3.5
    return override(full_1024(), data=dict(batch_size=4),
                    optim=dict(schedule="cosine", weight_decay=0.01, grad_accum=4),
                    checkpoint=dict(every_steps=100, max_to_keep=10), train=dict(run_dir="runs/dreamomni2"))
