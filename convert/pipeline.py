"""Convert a local diffusers Flux Kontext (or FLUX.2 [klein]) pipeline folder into one converted model folder.

Command line only; the code is :mod:`dreamomni2_jax.convert.pipeline` (run ``--help`` for the options).
"""
import sys

from dreamomni2_jax.convert.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
