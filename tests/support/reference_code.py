"""Transcriptions of reference code the tests compare against (torch / cv2 / network parts left out).

Each function names its source; the logic is kept line for line, only I/O that needs packages absent here
(torchvision, cv2, requests) is dropped.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from PIL import Image

# --------------------------------------------------------------------------- DreamOmni2 (dvlab-research/DreamOmni2)

# utils/vprocess.py
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


def resizeinput(img):
    """utils/vprocess.py ``resizeinput``: what DreamOmni2 feeds the pipeline (inference_edit.py) and the VLM."""
    multiple_of = 16
    image_height, image_width = img.height, img.width
    aspect_ratio = image_width / image_height
    _, image_width, image_height = min(
        (abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
    )
    image_width = image_width // multiple_of * multiple_of
    image_height = image_height // multiple_of * multiple_of
    img = img.resize((image_width, image_height), Image.LANCZOS)
    return img


def to_rgb(pil_image):
    """utils/vprocess.py ``to_rgb``."""
    if pil_image.mode == 'RGBA':
        white_background = Image.new("RGB", pil_image.size, (255, 255, 255))
        white_background.paste(pil_image, mask=pil_image.split()[3])  # Use alpha channel as mask
        return white_background
    else:
        return pil_image.convert("RGB")


def fetch_image(ele):
    """utils/vprocess.py ``fetch_image`` for local paths / PIL images (the VLM's image preprocessing)."""
    image = ele["image"] if "image" in ele else ele["image_url"]
    image_obj = image if isinstance(image, Image.Image) else Image.open(image)
    image = to_rgb(image_obj)
    image = resizeinput(image)
    return image


def infer_vlm_messages(input_img_path, input_instruction, prefix):
    """inference_edit.py / inference_gen.py ``infer_vlm``: the chat messages (prefix " It is editing task." /
    " It is generation task.")."""
    tp = []
    for path in input_img_path:
        tp.append({"type": "image", "image": path})
    tp.append({"type": "text", "text": input_instruction + prefix})
    messages = [
        {
            "role": "user",
            "content": tp,
        }
    ]
    return messages


INFER_VLM_MAX_NEW_TOKENS = 4096  # inference_edit.py / inference_gen.py: vlm_model.generate(..., max_new_tokens=4096)


# --------------------------------------------------------------------------- qflux (tsiendragon/qwen-image-finetune)

# src/qflux/data/dataset.py
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_pat_end = re.compile(r"control_(\d+)\.(?:png|jpe?g|webp)$", re.IGNORECASE)


def is_control_image(path: str):
    name = Path(path).name
    m = _pat_end.search(name)
    return m is not None


def _first_existing(base_dir: str, stem: str, exts=IMG_EXTS):
    for ext in exts:
        p = os.path.join(base_dir, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def get_number_of_controls(control_dir: str, stem: str) -> int:
    for ext in IMG_EXTS:
        control_paths = glob.glob(os.path.join(control_dir, f"{stem}_control_[0-99]*{ext}"))
        if len(control_paths) > 0:
            return len(control_paths)
    return 0


def _collect_extra_controls(control_dir: str, stem: str, num_controls: int) -> list:
    out = []
    for i in range(1, num_controls + 1):
        for ext in IMG_EXTS:
            control_path = os.path.join(control_dir, f"{stem}_control_{i}{ext}")
            if os.path.exists(control_path):
                out.append(control_path)
                continue
    return out


def find_directories(dataset_path: str):
    """``ImageDataset._find_directories``."""
    image_possible_names = ["training_images", "images", "target_images", "target", "targets"]
    control_possible_names = ["control_images", "control", "condition_images", "controls"]
    images_dir = None
    for name in image_possible_names:
        path = os.path.join(dataset_path, name)
        if os.path.exists(path):
            images_dir = path
            break
    control_dir = None
    for name in control_possible_names:
        path = os.path.join(dataset_path, name)
        if os.path.exists(path):
            control_dir = path
            break
    return images_dir, control_dir


def scan_image_files(images_dir: str, control_dir: str) -> list:
    """``ImageDataset._scan_image_files``: [{"image", "control": [...], "caption": txt path}] (masks dropped)."""
    target_images = glob.glob(os.path.join(images_dir, "*.*"))
    target_images = [img for img in target_images if img.endswith(IMG_EXTS)]
    target_images = [img for img in target_images if not img.endswith("_mask.png")]
    target_images = [img for img in target_images if not is_control_image(img)]
    samples = []
    stems = [os.path.splitext(os.path.basename(p))[0] for p in target_images]
    stems = [s for s in stems if _first_existing(images_dir, s) is not None]
    num_controls = get_number_of_controls(control_dir, stems[0])
    for stem in stems:
        image_path = _first_existing(images_dir, stem)
        if image_path is None:
            continue
        main_control = _first_existing(control_dir, stem)
        if main_control is not None:
            extras = _collect_extra_controls(control_dir, stem, num_controls)
            controls = [main_control] + list(extras)
        else:
            controls = []
        img_txt = os.path.join(images_dir, f"{stem}.txt")
        ctl_txt = os.path.join(control_dir, f"{stem}.txt")
        if os.path.exists(img_txt):
            prompt_file = img_txt
        elif os.path.exists(ctl_txt):
            prompt_file = ctl_txt
        else:
            continue
        samples.append({"image": image_path, "control": controls, "caption": prompt_file})
    return samples


# --------------------------------------------------------------------------- diffusers (huggingface/diffusers)


# examples/dreambooth/train_dreambooth_lora_flux_kontext.py, main(): target_modules without --lora_layers
KONTEXT_SCRIPT_TARGET_MODULES = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
]


def kontext_output_size(width: int, height: int, max_area: int = 1024 ** 2, vae_scale_factor: int = 8):
    """pipelines/flux/pipeline_flux_kontext.py ``FluxKontextPipeline.__call__``: output size from ``height`` /
    ``width`` (default: the image's) at ``max_area``."""
    original_height, original_width = height, width  # noqa: F841
    aspect_ratio = width / height
    width = round((max_area * aspect_ratio) ** 0.5)
    height = round((max_area / aspect_ratio) ** 0.5)
    multiple_of = vae_scale_factor * 2
    width = width // multiple_of * multiple_of
    height = height // multiple_of * multiple_of
    return width, height


# examples/dreambooth/train_dreambooth_lora_flux2_klein.py, main(): target_modules without --lora_layers
KLEIN_SCRIPT_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"] + [
    "to_qkv_mlp_proj",
    *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)],
]
# the same script's commented-out alternative: "just train transformer_blocks"
KLEIN_SCRIPT_DOUBLE_BLOCK_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


# --------------------------------------------------------------------------- diffusers (huggingface/diffusers)

# src/diffusers/loaders/single_file_utils.py ``convert_flux_transformer_checkpoint_to_diffusers`` (0.42), with its
# hard-coded ``inner_dim = 3072`` a parameter so a tiny BFL checkpoint can go through it. Same key mapping and
# order of operations; the run of one-line assignments is written as (ours, BFL) name tables.
def convert_flux_transformer_checkpoint_to_diffusers(checkpoint, inner_dim: int = 3072, mlp_ratio: float = 4.0):
    import torch

    converted_state_dict = {}
    for k in list(checkpoint.keys()):
        if "model.diffusion_model." in k:
            checkpoint[k.replace("model.diffusion_model.", "")] = checkpoint.pop(k)

    num_layers = list(set(int(k.split(".", 2)[1]) for k in checkpoint if "double_blocks." in k))[-1] + 1
    num_single_layers = list(set(int(k.split(".", 2)[1]) for k in checkpoint if "single_blocks." in k))[-1] + 1

    def swap_scale_shift(weight):  # BFL's AdaLayerNormContinuous is (shift, scale); diffusers' (scale, shift)
        shift, scale = weight.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)

    def move(ours, theirs):
        for p in ("weight", "bias"):
            converted_state_dict[f"{ours}.{p}"] = checkpoint.pop(f"{theirs}.{p}")

    move("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    move("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    move("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    move("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if any("guidance" in k for k in checkpoint):
        move("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        move("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")

    for i in range(num_layers):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        move(f"{b}norm1.linear", f"{d}img_mod.lin")
        move(f"{b}norm1_context.linear", f"{d}txt_mod.lin")
        for p in ("weight", "bias"):
            sq, sk, sv = torch.chunk(checkpoint.pop(f"{d}img_attn.qkv.{p}"), 3, dim=0)
            cq, ck, cv = torch.chunk(checkpoint.pop(f"{d}txt_attn.qkv.{p}"), 3, dim=0)
            for name, t in (("to_q", sq), ("to_k", sk), ("to_v", sv), ("add_q_proj", cq), ("add_k_proj", ck),
                            ("add_v_proj", cv)):
                converted_state_dict[f"{b}attn.{name}.{p}"] = torch.cat([t])
        for ours, theirs in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                             ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            converted_state_dict[f"{b}attn.{ours}.weight"] = checkpoint.pop(f"{d}{theirs}.scale")
        move(f"{b}ff.net.0.proj", f"{d}img_mlp.0")
        move(f"{b}ff.net.2", f"{d}img_mlp.2")
        move(f"{b}ff_context.net.0.proj", f"{d}txt_mlp.0")
        move(f"{b}ff_context.net.2", f"{d}txt_mlp.2")
        move(f"{b}attn.to_out.0", f"{d}img_attn.proj")
        move(f"{b}attn.to_add_out", f"{d}txt_attn.proj")

    for i in range(num_single_layers):
        b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(f"{b}norm.linear", f"{s}modulation.lin")
        mlp_hidden_dim = int(inner_dim * mlp_ratio)
        split_size = (inner_dim, inner_dim, inner_dim, mlp_hidden_dim)
        for p in ("weight", "bias"):
            q, k, v, mlp = torch.split(checkpoint.pop(f"{s}linear1.{p}"), split_size, dim=0)
            for name, t in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                converted_state_dict[f"{b}{name}.{p}"] = torch.cat([t])
        converted_state_dict[f"{b}attn.norm_q.weight"] = checkpoint.pop(f"{s}norm.query_norm.scale")
        converted_state_dict[f"{b}attn.norm_k.weight"] = checkpoint.pop(f"{s}norm.key_norm.scale")
        move(f"{b}proj_out", f"{s}linear2")

    move("proj_out", "final_layer.linear")
    for p in ("weight", "bias"):
        converted_state_dict[f"norm_out.linear.{p}"] = swap_scale_shift(
            checkpoint.pop(f"final_layer.adaLN_modulation.1.{p}"))
    return converted_state_dict


# --------------------------------------------------------------------------- diffusers (huggingface/diffusers)

# scripts/convert_flux2_to_diffusers.py ``convert_flux2_vae_checkpoint_to_diffusers`` (the repository's conversion
# script, not in the installed package; ``AutoencoderKLFlux2`` has no ``from_single_file`` mapping in 0.42). Same
# key mapping and order of operations; its helpers (``update_vae_resnet_ldm_to_diffusers``,
# ``update_vae_attentions_ldm_to_diffusers``, ``conv_attn_to_linear``) are inlined as ``_ldm_resnets`` /
# ``_ldm_attentions`` below, and the one-to-one table is written as (diffusers, BFL) pairs.
DIFFUSERS_VAE_TO_FLUX2_MAPPING = {
    **{f"{p}.{m}.{w}": f"{p}.{m}.{w}" for p in ("encoder", "decoder") for m in ("conv_in", "conv_out")
       for w in ("weight", "bias")},
    **{f"{p}.conv_norm_out.{w}": f"{p}.norm_out.{w}" for p in ("encoder", "decoder") for w in ("weight", "bias")},
    **{f"quant_conv.{w}": f"encoder.quant_conv.{w}" for w in ("weight", "bias")},
    **{f"post_quant_conv.{w}": f"decoder.post_quant_conv.{w}" for w in ("weight", "bias")},
    "bn.running_mean": "bn.running_mean",
    "bn.running_var": "bn.running_var",
}


def _ldm_resnets(keys, new_checkpoint, checkpoint, old, new):
    for ldm_key in keys:
        new_checkpoint[ldm_key.replace(old, new).replace("nin_shortcut", "conv_shortcut")] = checkpoint.get(ldm_key)


def _ldm_attentions(keys, new_checkpoint, checkpoint, old, new):
    for ldm_key in keys:
        key = ldm_key.replace(old, new).replace("norm.weight", "group_norm.weight")
        key = key.replace("norm.bias", "group_norm.bias")
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
            key = key.replace(f"{a}.weight", f"{b}.weight").replace(f"{a}.bias", f"{b}.bias")
        key = key.replace("proj_out.weight", "to_out.0.weight").replace("proj_out.bias", "to_out.0.bias")
        new_checkpoint[key] = checkpoint.get(ldm_key)
        shape = new_checkpoint[key].shape
        if len(shape) == 3:
            new_checkpoint[key] = new_checkpoint[key][:, :, 0]
        elif len(shape) == 4:
            new_checkpoint[key] = new_checkpoint[key][:, :, 0, 0]


def convert_flux2_vae_checkpoint_to_diffusers(vae_state_dict, config):
    new_checkpoint = {}
    for diffusers_key, ldm_key in DIFFUSERS_VAE_TO_FLUX2_MAPPING.items():
        if ldm_key in vae_state_dict:
            new_checkpoint[diffusers_key] = vae_state_dict[ldm_key]
    num_down_blocks = len(config["down_block_types"])
    down_blocks = {i: [k for k in vae_state_dict if f"down.{i}" in k] for i in range(num_down_blocks)}
    for i in range(num_down_blocks):
        resnets = [k for k in down_blocks[i] if f"down.{i}" in k and f"down.{i}.downsample" not in k]
        _ldm_resnets(resnets, new_checkpoint, vae_state_dict, f"down.{i}.block", f"down_blocks.{i}.resnets")
        if f"encoder.down.{i}.downsample.conv.weight" in vae_state_dict:
            for w in ("weight", "bias"):
                new_checkpoint[f"encoder.down_blocks.{i}.downsamplers.0.conv.{w}"] = vae_state_dict.get(
                    f"encoder.down.{i}.downsample.conv.{w}")
    for part in ("encoder", "decoder"):
        if part == "decoder":
            num_up_blocks = len(config["up_block_types"])
            up_blocks = {i: [k for k in vae_state_dict if f"up.{i}" in k] for i in range(num_up_blocks)}
            for i in range(num_up_blocks):
                block_id = num_up_blocks - 1 - i
                resnets = [k for k in up_blocks[block_id]
                           if f"up.{block_id}" in k and f"up.{block_id}.upsample" not in k]
                _ldm_resnets(resnets, new_checkpoint, vae_state_dict, f"up.{block_id}.block", f"up_blocks.{i}.resnets")
                if f"decoder.up.{block_id}.upsample.conv.weight" in vae_state_dict:
                    for w in ("weight", "bias"):
                        new_checkpoint[f"decoder.up_blocks.{i}.upsamplers.0.conv.{w}"] = vae_state_dict[
                            f"decoder.up.{block_id}.upsample.conv.{w}"]
        mid_resnets = [k for k in vae_state_dict if f"{part}.mid.block" in k]
        for i in range(1, 3):
            resnets = [k for k in mid_resnets if f"{part}.mid.block_{i}" in k]
            _ldm_resnets(resnets, new_checkpoint, vae_state_dict, f"mid.block_{i}", f"mid_block.resnets.{i - 1}")
        mid_attentions = [k for k in vae_state_dict if f"{part}.mid.attn" in k]
        _ldm_attentions(mid_attentions, new_checkpoint, vae_state_dict, "mid.attn_1", "mid_block.attentions.0")
    for key in list(new_checkpoint):  # conv_attn_to_linear
        if ".".join(key.split(".")[-2:]) in ("query.weight", "key.weight", "value.weight"):
            if new_checkpoint[key].ndim > 2:
                new_checkpoint[key] = new_checkpoint[key][:, :, 0, 0]
        elif "proj_attn.weight" in key and new_checkpoint[key].ndim > 2:
            new_checkpoint[key] = new_checkpoint[key][:, :, 0]
    return new_checkpoint
