"""Run by test_input_fidelity.py in a fresh process (argv: converted model folder, output folder; 8 fake devices):
the runtime path (convert, text encoding, TensorBoard, LoRA files, the training / sampling modules) must not import
torch, and digests must not depend on the sharding. Prints one ``RESULT {json}`` line."""
import json, sys
from pathlib import Path
import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

model, tmp = Path(sys.argv[1]), Path(sys.argv[2])
import dreamomni2_jax.convert.vae, dreamomni2_jax.convert.pipeline, dreamomni2_jax.tools.export_lora  # noqa
import dreamomni2_jax.train.loop, dreamomni2_jax.checkpoint.run_dir, dreamomni2_jax.cache.stage, dreamomni2_jax.data.stream  # noqa
from dreamomni2_jax.utils import integrity
from dreamomni2_jax.lora import files as lora_io
from dreamomni2_jax.sample import pipeline as sampler  # noqa: F401  (import only)
from dreamomni2_jax.callbacks import validation  # noqa: F401  (import only)
from dreamomni2_jax.text.flux1 import load_text_encoders
from dreamomni2_jax.utils.tensorboard import summary_writer

dreamomni2_jax.convert.vae.convert(model.parent / "src" / "vae", tmp / "vae", progress=False)
enc = load_text_encoders(model, jnp.float32)
enc.encode_prompt(["a cat"], max_sequence_length=8)
w = summary_writer(tmp / "tb")
w.add_image("v", np.zeros((8, 8, 3), np.uint8), global_step=1, dataformats="HWC")
w.close()
flat = {"transformer_blocks.attn.to_q.lora_A": np.ones((1, 32, 2), np.float32),
        "transformer_blocks.attn.to_q.lora_B": np.ones((1, 2, 32), np.float32)}
lora_io.load_lora_file(lora_io.save_lora_file(tmp / "l.safetensors", flat, 2.0))
# digests do not depend on the sharding
x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6) / 7
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
tree = {"x": x, "y": jnp.ones((3,), jnp.bfloat16), "n": jnp.int32(5)}
sharded = {**tree, "x": jax.device_put(x, NamedSharding(mesh, P("a", "b")))}
flipped = {**tree, "x": x.at[3, 1].set(jax.lax.bitcast_convert_type(
    jax.lax.bitcast_convert_type(x[3, 1], jnp.uint32) ^ jnp.uint32(1 << 20), jnp.float32))}
print("RESULT " + json.dumps({"torch_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                              "devices": len(jax.devices()), "digest": integrity.tree_digest(tree),
                              "sharded": integrity.tree_digest(sharded), "flipped": integrity.tree_digest(flipped)}))
