"""Weight files: streaming safetensors I/O (``safetensors_io``) and the converted-weights format with its sharded
restore and the one component loader (``store``). Imports nothing from ``models`` or ``convert``."""
