"""Convert a FLUX.2 transformer checkpoint (diffusers or BFL layout, safetensors only) to our Orbax format.

Command line only; the code is :mod:`dreamomni2_jax.convert.flux2_transformer` (run ``--help`` for the options).
"""
import sys

from dreamomni2_jax.convert.flux2_transformer import main

if __name__ == "__main__":
    sys.exit(main())
