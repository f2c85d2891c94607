#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install the Python
# requirements (ONNX Runtime), build metac, derive the gradient and HVP
# graphs of a PyTorch-exported MNIST MLP, inspect them, and benchmark
# value-and-gradient and HVP of the MNIST MLP on ONNX Runtime and tract.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
cargo build --release -p metac
out=runs/derive-mlp
./target/release/metac derive tests/fixtures/onnx/mlp_ce_opset18.onnx \
  --loss loss --wrt l1.weight,l1.bias,l2.weight,l2.bias --out "$out"
./target/release/metac inspect "$out"
./target/release/metac bench mlp --repeats 5
