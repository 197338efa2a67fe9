#!/usr/bin/env bash
# Quick start: install (if needed), prune the bundled Fashion-MNIST model to 90% sparsity with UniPTS,
# then print dense vs sparse top-1 accuracy on the 10,000 labelled test images, measured with onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import onnxsparse, onnx2torch, onnxruntime" 2>/dev/null || ! command -v onnxsparse >/dev/null; then
    # torchvision is onnx2torch's dependency: pinned here so that pip keeps torch 2.14.1
    python3 -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    python3 -m pip install --quiet -e '.[plot]'
fi
out="${OUT_DIR:-out}"
mkdir -p "$out"
sample=samples/fashion_mnist
onnxsparse prune "$sample/model.onnx" --sparsity "${SPARSITY:-0.9}" --calib "$sample/calib" \
    -o "$out/model-sparse.onnx" --report "$out/report.json" --force "$@"
dense=$(onnxsparse eval "$sample/model.onnx" --data "$sample/test" | grep '^top-1')
sparse=$(onnxsparse eval "$out/model-sparse.onnx" --data "$sample/test" | grep '^top-1')
echo "dense  model $dense"
echo "sparse model $sparse"
