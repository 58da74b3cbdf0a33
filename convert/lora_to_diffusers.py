"""Former name of ``convert/export_lora.py`` (it writes diffusers and kohya files); same options."""
import sys

from dreamomni2_jax.tools.export_lora import main

if __name__ == "__main__":
    sys.exit(main())
