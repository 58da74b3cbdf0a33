"""Optional instruction enhancer for the cache stage: a Qwen2.5-VL model rewrites each instruction.

DreamOmni2 pairs Flux Kontext with a VLM that turns the user's instruction plus the reference
images into the prompt the generator was trained on. As DreamOmni2's ``inference_edit.py`` /
``inference_gen.py`` ship it: the VLM sees the reference images (source first for editing), each
through ``utils/vprocess.py``'s ``fetch_image`` (RGBA composited on white, then ``resizeinput``:
the closest Kontext preferred resolution, lanczos; :func:`vlm_image`), and the instruction followed
by the task suffix (" It is editing task." / " It is generation task.", chosen by
:meth:`dreamomni2_jax.cache.inputs.Record.resolved_task`); the suffix goes to the VLM only, never to the
Flux prompt. Greedy decoding with up to :data:`MAX_NEW_TOKENS` (4096, as the scripts: a short
budget truncates the answer and leaves its tags in the instruction); when the answer is wrapped in
``<gen> ... </gen>`` (DreamOmni2's fine-tuned VLM) the inside is used, else the whole answer. The
cache stores both the original and the rewritten instruction; ``scripts/sample.py --enhance`` does
the same at predict time.

This is the only runtime module using torch (imported lazily, ``pip install .[vlm]``); it runs on
the host (CUDA when available), before the JAX encoders.
"""
from __future__ import annotations

import re
from pathlib import Path

from dreamomni2_jax.images.sizes import KONTEXT_AREA, reference_size
from dreamomni2_jax.cache.inputs import TASK_SUFFIX

_GEN = re.compile(r"<gen>(.*?)</gen>", re.S)
MAX_NEW_TOKENS = 4096  # DreamOmni2 inference_edit.py / inference_gen.py


def vlm_image(image):
    """A reference as DreamOmni2 shows it to the VLM (``utils/vprocess.py`` ``fetch_image``): a path or PIL image,
    RGBA composited on white (``to_rgb``), resized with lanczos to its closest Kontext preferred resolution floored
    to 16 (``resizeinput``)."""
    from PIL import Image

    img = Image.open(image) if isinstance(image, (str, Path)) else image
    if img.mode == "RGBA":
        rgb = Image.new("RGB", img.size, (255, 255, 255))
        rgb.paste(img, mask=img.split()[3])
    else:
        rgb = img.convert("RGB")
    size = reference_size(*rgb.size, KONTEXT_AREA, 16)
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.LANCZOS)


def extract_gen(text: str) -> str:
    """The ``<gen>...</gen>`` part of a VLM answer if present, else the whole answer (stripped)."""
    m = _GEN.search(text)
    return (m.group(1) if m else text).strip()


def vlm_messages(instruction: str, task: str, num_images: int) -> list[dict]:
    """Chat messages: the images, then the instruction with its task suffix."""
    if task not in TASK_SUFFIX:
        raise ValueError(f"task={task!r} is not one of {sorted(TASK_SUFFIX)}")
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": instruction + TASK_SUFFIX[task]})
    return [{"role": "user", "content": content}]


def _chat_template(path: Path, tokenizer) -> str:
    """The processor's chat template (``chat_template.jinja`` / ``chat_template.json``), else the tokenizer's."""
    import json

    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise FileNotFoundError(f"{path}: no chat template (chat_template.jinja / .json or tokenizer chat_template)")


class QwenEnhancer:
    """``enhancer(images, instruction, task) -> rewritten instruction`` with a local Qwen2.5-VL folder.

    ``images``: reference paths or PIL images, shown to the VLM through :func:`vlm_image`.

    Inputs are assembled as ``Qwen2_5_VLProcessor`` does for images (chat template, image processor,
    each ``<|image_pad|>`` expanded to ``grid_t*grid_h*grid_w / merge_size**2`` tokens) from the
    tokenizer and image processor directly, so no video processor (torchvision) is needed.
    """

    IMAGE_TOKEN = "<|image_pad|>"

    def __init__(self, model_dir: str | Path, max_new_tokens: int = MAX_NEW_TOKENS, device: str | None = None,
                 torch_dtype: str = "auto"):
        import inspect

        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no Qwen2.5-VL model folder (config.json missing)")
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.image_processor = AutoImageProcessor.from_pretrained(str(path))
        self.chat_template = _chat_template(path, self.tokenizer)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.IMAGE_TOKEN)
        self._mm_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters
        self.max_new_tokens = max_new_tokens

    def inputs(self, images: list, instruction: str, task: str) -> dict:
        """Model inputs (torch tensors on the model's device) for one record."""
        images = [vlm_image(im) for im in images]
        messages = vlm_messages(instruction, task, len(images))
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        parts = text.split(self.IMAGE_TOKEN)
        if len(parts) - 1 != len(images):
            raise ValueError(f"chat template produced {len(parts) - 1} image tokens for {len(images)} images")
        vision = {}
        if images:
            vision = dict(self.image_processor(images=list(images), return_tensors="pt"))
            merge = self.image_processor.merge_size
            counts = [int(g.prod()) // merge**2 for g in vision["image_grid_thw"]]
            text = parts[0] + "".join(self.IMAGE_TOKEN * n + p for n, p in zip(counts, parts[1:]))
        enc = dict(self.tokenizer([text], return_tensors="pt"))
        if self._mm_types:
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).to(enc["input_ids"].dtype)
        return {k: v.to(self.device) for k, v in {**enc, **vision}.items()}

    def generate(self, images: list, instruction: str, task: str) -> str:
        """Raw decoded VLM answer (greedy)."""
        inputs = self.inputs(images, instruction, task)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]

    def __call__(self, images: list, instruction: str, task: str) -> str:
        return extract_gen(self.generate(images, instruction, task))
