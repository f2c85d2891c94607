#!/bin/sh
# The whole agreement study of docs/derive.md in one command: torchvision's
# CNNs, TransformerEncoderLayer and a GPT-2-style LM with both exporters,
# then the ONNX model zoo's light CNNs. Needs the PyTorch venv described in
# bench/derive_models.py and a release build of metac.
#
#   PY=/tmp/venv-torch/bin/python sh bench/derive_all.sh
set -e
PY=${PY:-python3}
cd "$(dirname "$0")/.."
"$PY" bench/derive_models.py "$@"
echo
"$PY" bench/derive_zoo.py
