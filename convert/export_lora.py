"""Export the LoRA of a training checkpoint as a diffusers (or kohya/ComfyUI) safetensors file.

Command line only; the code is :mod:`dreamomni2_jax.tools.export_lora` (run ``--help`` for the options).
"""
import sys

from dreamomni2_jax.tools.export_lora import main

if __name__ == "__main__":
    sys.exit(main())
