"""Convert a transformers ``CLIPTextModel`` folder (Flux ``text_encoder/``) to our Orbax format.

Command line only; the code is :mod:`dreamomni2_jax.convert.clip` (run ``--help`` for the options).
"""
import sys

from dreamomni2_jax.convert.clip import main

if __name__ == "__main__":
    sys.exit(main())
