#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, on a CUDA machine with torch and
# transformers installed (how they were taken: the device tool's lent H100/H200):
#
#   bash ops/bench/gpu.sh OUTDIR
#
# 0. ops/bench/gpu_clock.py: the sim's GPU clock (the roofline of costs.py) against this
#    card: its measured bandwidth and bf16 FLOP/s, then decode passes at batch 1-64 and
#    prefill of a random-weight Qwen2.5-7B shape, each beside the roofline's prediction.
# 1. ops/bench/engine_gpu.py: the hf engine (prefix cache on and off) against
#    model.generate and a padded forward, same random-initialised ~0.5B model, same run.
# 2. ops/bench/fleet.py overhead --device cuda: CoRD through the fleet (Redis, one
#    cord-worker per pool, all on the one GPU) against the same search in one process,
#    and curation, on that model saved to disk.
# A machine without network may get the missing Python packages as wheels in .whl/
# (pip download ... -d .whl on a machine that has network); they are installed first.
set -uo pipefail
out=${1:-/tmp/cord-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cord-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/cord-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c 'import cord.common' 2>/dev/null; then
  # The project's import namespace without installing it (pyproject's package-dir).
  mkdir -p /tmp/cord-src/cord
  for part in common workers coordinator lab; do ln -sfn "$PWD/$part" "/tmp/cord-src/cord/$part"; done
  export PYTHONPATH=/tmp/cord-src:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"

if [ -z "${SKIP_CLOCK:-}" ]; then
  timeout "${CLOCK_TIMEOUT:-300}" python3 ops/bench/gpu_clock.py --json "$out/clock.json" \
    2>&1 | tee "$out/clock.log"
fi

if [ -z "${SKIP_ENGINE:-}" ]; then
  timeout "${ENGINE_TIMEOUT:-240}" python3 ops/bench/engine_gpu.py --out "$out/engine.json" \
    2>&1 | tee "$out/engine.log"
fi

model=/tmp/cord-model-0.5b
python3 - "$model" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "ops/bench")
from engine_gpu import build  # the same model engine_gpu.py measures
print("parameters", build(Path(sys.argv[1]), Path("models/meta"), 1152, 24))
EOF
timeout "${FLEET_TIMEOUT:-300}" python3 ops/bench/fleet.py overhead --device cuda \
  --model "$model" --problems "${FLEET_PROBLEMS:-8}" --warmup 1 --inproc-threads 1 \
  --json "$out/fleet.json" 2>&1 | tee "$out/fleet.log"
