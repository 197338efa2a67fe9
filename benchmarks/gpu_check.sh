#!/usr/bin/env bash
# The GPU checks in one run, each step under its own time limit, every log streamed to OUTDIR (default
# gpu-check/), so that a step cut short still leaves what it printed:
#   1. the test suite with CUDA visible, verbose (each test's result on its own line);
#   2. benchmarks/gpu.py, one model at a time (a table and JSON per model, phase times included);
#   3. benchmarks/speed.py's CUDA 2:4 GEMMs on the sample;
#   4. the quick start on CUDA.
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (DEADLINE=seconds for the whole run, default 540)
set -u
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
deadline=${DEADLINE:-540}
t0=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run COMMAND under min(SECONDS, time left), output to OUTDIR/NAME.log
    local name=$1 limit=$2 left
    shift 2
    left=$((deadline - ($(date +%s) - t0)))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped (deadline)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local started=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? after $(($(date +%s) - started)) s (limit $limit s)"
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
workers=$(python3 -c "import importlib.util as u; print('-n 8' if u.find_spec('xdist') else '')")
# each failure's name and last lines go to failures.log as it happens (tests/conftest.py)
step tests 200 env ONNXSPARSE_FAILURE_LOG="$out/failures.log" python3 -m pytest -v -p no:cacheprovider $workers -rfs
step gpu-resnet50 150 python3 benchmarks/gpu.py --models resnet50 --gpus 1 --json "$out/gpu-resnet50.json"
step gpu-vit 150 python3 benchmarks/gpu.py --models vit_b_16 --gpus 1 --json "$out/gpu-vit.json"
step speed 60 python3 benchmarks/speed.py samples/fashion_mnist/model.onnx --calib samples/fashion_mnist/calib \
    --variant 2:4 --json "$out/speed.json"
step quickstart 120 env OUT_DIR="$out/quickstart" bash samples/quickstart.sh
grep -E "(FAILED|ERROR)" "$out/tests.log" | head -40  # -v marks each failing test on its own line
[ -f "$out/failures.log" ] && cat "$out/failures.log"
echo "total $(($(date +%s) - t0)) s; logs in $out/"
