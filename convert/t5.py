"""Convert a transformers ``T5EncoderModel`` folder (Flux ``text_encoder_2/``) to our Orbax format.

Command line only; the code is :mod:`dreamomni2_jax.convert.t5` (run ``--help`` for the options).
"""
import sys

from dreamomni2_jax.convert.t5 import main

if __name__ == "__main__":
    sys.exit(main())
