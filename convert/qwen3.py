"""Convert a transformers Qwen3 folder (FLUX.2 [klein] ``text_encoder/``) to our Orbax format.

Command line only; the code is :mod:`dreamomni2_jax.convert.qwen3` (run ``--help`` for the options).
"""
import sys

from dreamomni2_jax.convert.qwen3 import main

if __name__ == "__main__":
    sys.exit(main())
