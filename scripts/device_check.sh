#!/usr/bin/env bash
# One-shot check on a machine with one NVIDIA GPU (H100 / H200), about 8 minutes:
#   fresh venv with the `cuda12` extra, then
#   (a) cuDNN vs XLA attention, bf16, padding masks, target-only queries: values and gradients;
#   (b) the full-size FLUX.1 Kontext dev LoRA train step (random weights, bf16 base, rank-16 attention LoRA,
#       batch 1, remat full) at 1024^2 with 1 and 2 references: compile time, step time, tokens/s, MFU, peak memory;
#   (c) one sampler step at 1024^2 with one reference;
#   one JSON: $OUT (default device_check.json). Exit code != 0 when a check fails.
# Usage: bash scripts/device_check.sh [OUT]        (PY=python-with-cuda12 to skip the fresh venv)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-device_check.json}
VENV=${VENV:-.venv-device}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

start=$(date +%s)
if [ -n "${PY:-}" ]; then  # PY=/path/to/python: use an environment that already has the cuda12 extra
  echo "using $PY"
else
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[cuda12]"
  PY="$VENV/bin/python"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
echo "install: $(( $(date +%s) - start )) s"

"$PY" -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', d; print(d.device_kind)"

# (a) + (c)
"$PY" scripts/device_check.py --json "$WORK/check.json"

# (b) one GPU: no FSDP, batch 1, full remat (the single-GPU recipe of configs/gpu_h100.py)
for refs in 1 2; do
  r=$(python3 -c "print(','.join(['[1024,1024]'] * $refs))")
  "$PY" scripts/bench.py --config configs/gpu_h100.py --model-size full --steps 5 \
      --set mesh.fsdp=1 --set data.batch_size=1 --set model.remat=full --set "data.synthetic_refs=[$r]" \
      --out "$WORK/train_${refs}ref.json"
done

"$PY" - "$WORK" "$OUT" "$start" <<'EOF'
import json, sys, time
work, out, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
res = json.load(open(f"{work}/check.json"))
res["train_step"] = {f"{r}ref": json.load(open(f"{work}/train_{r}ref.json")) for r in (1, 2)}
res["total_s"] = time.time() - start
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res, indent=1))
EOF
echo "wrote $OUT in $(( $(date +%s) - start )) s"
