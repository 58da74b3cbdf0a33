"""Ahead-of-time compilation of the real sharded train step for a TPU v5p slice (splash attention) and 8 x H100
(cuDNN attention) on this CPU-only machine, through ``scripts/aot.py``: it compiles, the program calls the
platform's attention kernel, and the per-chip argument bytes are the sharded parameter bytes of the reference
(diffusers Flux + peft LoRA, shapes on the meta device) plus the batch shard. FLUX.2 [klein] (``--model klein-4b``,
reduced depth, full width): the same check against diffusers' ``Flux2Transformer2DModel`` + peft."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ONE_REF = "data.synthetic_refs=[[1024,1024]]"
LAYERS = (2, 4)  # full width (3072, 24 heads), 2 double + 4 single blocks


def run_aot(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "aot.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _report(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def tpu_report():
    return _report(run_aot("--config", "configs/tpu_v5.py", "--topology", "v5p-8", "--layers", *map(str, LAYERS),
                           "--set", "data.batch_size=4", "--set", ONE_REF))


@pytest.fixture(scope="module")
def gpu_report():
    return _report(run_aot("--config", "configs/gpu_h100.py", "--topology", "h100x8", "--layers", *map(str, LAYERS),
                           "--set", "data.batch_size=8", "--set", ONE_REF))


def reference_bytes_per_chip(shards: int, layers=LAYERS, rank: int = 16) -> dict:
    """Per-chip bytes of the frozen bf16 base (RMSNorm scales float32) and of the float32 LoRA adapters
    (q/k/v/out of every attention), from diffusers' FluxTransformer2DModel + peft on the meta device. A tensor
    is split over ``shards`` chips when one of its dims divides (the FSDP rule), else replicated."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=layers[0], num_single_layers=layers[1], guidance_embeds=True)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank,
                                           target_modules=r".*attn\.(to_q|to_k|to_v|to_out\.0)"), model)

    def per_chip(shape, itemsize):
        n = int(np.prod(shape)) * itemsize
        return n // shards if any(d % shards == 0 for d in shape) else n

    base = lora = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            lora += per_chip(p.shape, 4)
        else:
            base += per_chip(p.shape, 4 if name.rsplit(".", 2)[-2].startswith("norm_") else 2)
    return {"base": base, "lora": lora}


def batch_bytes_per_chip(report, text_len=512, text_dim=4096, pooled=768, channels=64) -> int:
    """target + references (bf16), img_ids (int32 x 3), img_mask (bool), t5 + pooled (bf16) of one sample."""
    t, r = 4096, 4096 * report["references"]
    return report["batch_per_chip"] * ((t + r) * channels * 2 + (t + r) * 12 + (t + r) + text_len * text_dim * 2
                                       + pooled * 2)


def _check_arguments(report, shards, empty_text: bool, tile_padding: int = 0):
    """``tile_padding``: bytes a TPU adds by laying small arrays (norm scales, pooled, scalars) out in (8, 128)
    tiles; XLA:GPU adds none."""
    ref = reference_bytes_per_chip(shards)
    expected = ref["base"] + 3 * ref["lora"]  # adapters + Adam mu / nu
    expected += (512 * 4096 + 768) * 2 if empty_text else 0  # caption-dropout embeddings (replicated)
    expected += batch_bytes_per_chip(report)
    args = report["per_chip"]["argument_bytes"]
    assert 0 <= args - expected <= 256 + tile_padding, (args, expected)  # + counters, Adam count, PRNG key
    assert 0 <= args - report["state_bytes_per_chip"] - batch_bytes_per_chip(report) <= 16 + tile_padding


@pytest.mark.slow  # its report fixture compiles the full-width step (1-3 min on a CPU)
def test_tpu_v5p_train_step_compiles_with_splash_in_the_program(tpu_report):
    r = tpu_report
    assert r["compiled"] and r["device_kind"].startswith("TPU v5") and r["chips"] == 4
    assert r["attention"] == {"configured": "auto", "resolved": "splash", "in_program": "splash"}
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["batch_per_chip"] == 1
    assert r["tokens_per_sample"] == 512 + 4096 + 4096
    assert r["fits"] and r["peak_bytes_per_chip"] >= r["per_chip"]["argument_bytes"] + r["per_chip"]["temp_bytes"]
    assert r["capacity_gib"] == 95.74


@pytest.mark.slow  # its report fixture compiles the full-width step (1-3 min on a CPU)
def test_tpu_v5p_per_chip_arguments_are_the_sharded_parameters(tpu_report):
    _check_arguments(tpu_report, shards=4, empty_text=True, tile_padding=64 * 1024)  # caption_dropout 0.05


@pytest.mark.slow  # its report fixture compiles the full-width step (1-3 min on a CPU)
def test_h100x8_train_step_compiles_with_cudnn_in_the_program(gpu_report):
    r = gpu_report
    assert r["compiled"] and r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["chips"] == 8
    assert r["attention"] == {"configured": "cudnn", "resolved": "cudnn", "in_program": "cudnn"}
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["fits"]
    _check_arguments(r, shards=8, empty_text=True)


def test_a_config_that_cannot_fit_reports_fits_false_with_the_numbers():
    """Full 12B, 64 samples per chip at 1024^2 with 3 references: the TPU compiler refuses it quickly."""
    r = _report(run_aot("--config", "configs/tpu_v5.py", "--topology", "v5p-8", "--set", "data.batch_size=256",
                        "--set", "data.synthetic_refs=[[1024,1024],[1024,1024],[1024,1024]]"))
    assert r["fits"] is False and r["compiled"] is False and r["batch_per_chip"] == 64
    assert r["peak_bytes_per_chip"] > r["capacity_bytes"] and r["headroom_bytes"] < 0
    assert r["model"] == {"family": "flux1", "double_blocks": 19, "single_blocks": 38, "inner_dim": 3072}
    assert "HBM" in r["error"]


def test_bad_input_is_one_line_and_exit_code_2():
    proc = run_aot("--config", "configs/tpu_v5.py", "--topology", "v5p-7", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "v5p-8" in proc.stderr.strip().splitlines()[-1]  # lists the known slice sizes
    proc = run_aot("--config", "configs/tpu_v5.py", "--topology", "v5p-8", "--set", "data.batch_size=6",
                   timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "data x fsdp = 4" in proc.stderr


def test_topology_names_and_missing_libtpu(monkeypatch):
    from dreamomni2_jax.tools import aot

    t = aot.parse_target("v5p-64")
    assert (t.platform, t.topology, t.chips) == ("tpu", "v5p:2x4x4", 32)
    assert aot.parse_target("v6e-8").topology == "v6e:2x4" and aot.parse_target("v5e-16").chips == 16
    h = aot.parse_target("h200x8")
    assert (h.platform, h.topology, h.chips) == ("cuda", "1x1x8", 8) and h.hbm_bytes > 140e9
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` fails as when it is not installed
    with pytest.raises(aot.AOTError, match=r"pip install -e '\.\[aot\]'"):
        aot.target_devices(t)


def test_multi_host_and_multi_slice_target_names():
    from dreamomni2_jax.tools import aot

    t = aot.parse_target("2xv5p-8")
    assert (t.platform, t.topology, t.chips, t.slices) == ("tpu", "v5p:2x2x1", 8, 2)
    assert aot.parse_target("v6e-64").topology == "v6e:8x8" and aot.parse_target("v6e-64").slices == 1
    for name in ("h100x16", "2xh100x8"):
        g = aot.parse_target(name)
        assert (g.platform, g.topology, g.chips, g.hosts) == ("cuda", "2x1x8", 16, 2)
    assert aot.parse_target("h200x32").topology == "4x1x8"
    for bad in ("h100x12", "2xh100x4", "0xv5p-8"):
        with pytest.raises(aot.AOTError):
            aot.parse_target(bad)


def test_compiler_out_of_memory_message_is_parsed():
    from dreamomni2_jax.tools.aot import _next_probe, _oom_numbers

    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (403.35G) "
           "exceeds available HBM (95.74G).")  # libtpu 0.0.42 for a full-size step at 8 samples per chip
    assert _oom_numbers(msg) == (int(403.35 * 2**30), int(95.74 * 2**30))
    assert _oom_numbers("INTERNAL: something else") is None
    g = 2**30
    assert _next_probe([(32, 1091 * g)], 95 * g, 0, 32) == 2  # a line through the origin
    assert _next_probe([(32, 147 * g), (20, 135 * g), (1, 15 * g)], 95 * g, 1, 20) == 13  # through the last two


# --------------------------------------------------------------------------- FLUX.2 [klein]

KLEIN_LAYERS = (1, 2)  # klein-4b width (3072, 24 heads, joint 7680), 1 double + 2 single blocks
KLEIN_4B = dict(num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)
# diffusers names of configs/klein_tpu_v5.py's adapters: the klein_wide preset (diffusers' klein script default:
# double-block to_q/k/v/to_out.0, single-block to_qkv_mlp_proj / to_out) plus the double blocks' text stream
KLEIN_PEFT_TARGETS = (r".*(^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
                      r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))")


@pytest.fixture(scope="module")
def klein_report():
    return _report(run_aot("--config", "configs/klein_tpu_v5.py", "--model", "klein-4b", "--topology", "v5p-8",
                           "--layers", *map(str, KLEIN_LAYERS), "--set", "data.batch_size=4", "--set", ONE_REF))


def klein_reference_bytes_per_chip(shards: int, rank: int = 16) -> dict:
    """As :func:`reference_bytes_per_chip` for diffusers' ``Flux2Transformer2DModel`` at klein-4b width with
    :data:`KLEIN_LAYERS` blocks and peft adapters on :data:`KLEIN_PEFT_TARGETS`; also the adapted module count."""
    import torch
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=KLEIN_LAYERS[0], num_single_layers=KLEIN_LAYERS[1], **KLEIN_4B)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=KLEIN_PEFT_TARGETS), model)

    def per_chip(shape, itemsize):
        n = int(np.prod(shape)) * itemsize
        return n // shards if any(d % shards == 0 for d in shape) else n

    base = lora = modules = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            lora += per_chip(p.shape, 4)
            modules += name.endswith("lora_A.default.weight")
        else:
            base += per_chip(p.shape, 4 if name.rsplit(".", 2)[-2].startswith("norm_") else 2)
    return {"base": base, "lora": lora, "modules": modules}


@pytest.mark.slow  # its report fixture compiles the full-width step (1-3 min on a CPU)
def test_klein_v5p_train_step_compiles_with_klein_shapes(klein_report):
    r = klein_report
    assert r["compiled"] and r["fits"] and r["chips"] == 4 and r["batch_per_chip"] == 1
    assert r["model"] == {"family": "flux2-klein", "double_blocks": 1, "single_blocks": 2, "inner_dim": 3072}
    assert r["lora"] == {"preset": "klein_wide", "rank": 16}
    assert r["attention"]["in_program"] == "splash"
    assert r["tokens_per_sample"] == 512 + 4096 + 4096


@pytest.mark.slow  # its report fixture compiles the full-width step (1-3 min on a CPU)
def test_klein_per_chip_arguments_are_the_sharded_diffusers_parameters(klein_report):
    r, shards = klein_report, 4
    ref = klein_reference_bytes_per_chip(shards)
    assert ref["modules"] == 8 * KLEIN_LAYERS[0] + 2 * KLEIN_LAYERS[1]
    # one sample per chip: target + 1 reference (1024^2 -> 4096 tokens each, 128 packed channels, bf16), 4-axis
    # int32 ids, bool mask, 512 x 7680 Qwen3 features (bf16), no pooled embedding
    t = 4096 * 2
    batch = t * 128 * 2 + t * 16 + t + 512 * 7680 * 2
    expected = ref["base"] + 3 * ref["lora"] + 512 * 7680 * 2 + batch  # + Adam mu / nu, caption-dropout text
    args = r["per_chip"]["argument_bytes"]
    assert 0 <= args - expected <= 256 + 64 * 1024, (args, expected)
    assert 0 <= args - r["state_bytes_per_chip"] - batch <= 16 + 64 * 1024


def test_klein_sampler_inputs_have_the_pipelines_ids_and_no_guidance():
    """``--mode sample --model klein-4b`` inputs: the pipeline's 4-axis text / image ids for 2 references, the
    prompt and the empty prompt stacked for classifier-free guidance, no pooled embedding, no guidance value."""
    import dataclasses

    import torch
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    from dreamomni2_jax.tools import aot
    from dreamomni2_jax.config import load_config

    cfg = load_config(str(ROOT / "configs" / "klein_tpu_v5.py"), ["data.max_sequence_length=64"])
    fc = aot.flux_config(cfg, (1, 1), "klein-4b")
    cfg = aot.for_family(cfg, fc)
    (noise, refs, embeds, pooled, img_ids, txt_ids, guidance, *_), n = aot.sample_input_shapes(cfg, fc, batch=1)
    ref_txt = Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 64, 1))[0]
    ref_lat = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, 64, 64))[0]
    ref_img = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 128, 64, 64)] * 2)[0]
    assert txt_ids.shape == tuple(ref_txt.shape) == (64, 4)
    assert img_ids.shape[-2:] == (ref_lat.shape[0] + ref_img.shape[0], 4)
    assert noise.shape == (1, 4096, 128) and refs.shape == (1, 8192, 128) and n == 4096 + 8192 + 64
    assert embeds.shape == (2, 64, 7680) and pooled.shape == (2, 0) and guidance is None
    assert dataclasses.replace(fc, num_layers=5, num_single_layers=20) == aot.flux_config(cfg, model="klein-4b")


# --------------------------------------------------------------------------- several hosts / slices

SMALL = ("--layers", "1", "1", "--set", "data.synthetic_resolution=[512,512]", "--set",
         "data.synthetic_refs=[[512,512]]")  # full width, 1 + 1 blocks, 512² target + 1 reference


@pytest.mark.slow  # a full-width (1 + 1 blocks) compile for two slices: ~4 min on the loaded 2 cores
def test_two_v5p_slices_compile_data_parallel_over_dcn():
    """``2xv5p-8``: two slices of 4 chips (2 hosts) described by libtpu (``num_slices=2``); scripts/aot.py sets
    ``mesh.dcn_data=2``, so the batch is split over the slices and the parameters are sharded within one slice:
    the per-chip state is a v5p-8's (4-way FSDP), not an 8-way one."""
    r = _report(run_aot("--config", "configs/tpu_v5.py", "--topology", "2xv5p-8", *SMALL,
                        "--set", "data.batch_size=8"))
    assert r["compiled"] and r["fits"] and (r["chips"], r["slices"], r["hosts"]) == (8, 2, 2)
    assert r["mesh"] == {"dcn_data": 2, "data": 1, "fsdp": 4, "tensor": 1} and r["batch_per_chip"] == 1
    assert r["program_devices"] == 8 and r["hlo_num_partitions"] == 4  # one SPMD program per slice
    assert r["attention"]["in_program"] == "splash"
    # the state per chip: diffusers' parameters split 4 ways (one slice), not 8 (+ Adam moments, the
    # caption-dropout embeddings, step counters)
    ref = reference_bytes_per_chip(4, layers=(1, 1))
    expected = ref["base"] + 3 * ref["lora"] + (512 * 4096 + 768) * 2
    assert 0 <= r["state_bytes_per_chip"] - expected <= 256, (r["state_bytes_per_chip"], expected)


@pytest.mark.slow  # a full-width (1 + 1 blocks) compile for 16 GPUs
def test_two_h100_hosts_compile_over_16_gpus():
    r = _report(run_aot("--config", "configs/gpu_h100.py", "--topology", "h100x16", *SMALL,
                        "--set", "data.batch_size=16"))
    assert r["compiled"] and (r["chips"], r["hosts"], r["program_devices"]) == (16, 2, 16)
    assert r["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1} and r["attention"]["in_program"] == "cudnn"
    assert r["fits"] and r["device_kind"] == "NVIDIA H100 80GB HBM3"
