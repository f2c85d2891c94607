#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install the Python
# requirements (ONNX Runtime), build metac, meta-train the HierarchicalRNN
# learned optimizer on the MNIST MLP (a short run), meta-test it against
# Adam on the MNIST test set with a plot, derive the gradient and HVP
# graphs of a PyTorch-exported model, and train the mixture-of-experts byte
# LM (Tiny-ONN's hyper step) briefly on Debian's fortunes and sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
# The text the mixture-of-experts LM learns: Debian's fortunes package.
if [ ! -d /usr/share/games/fortunes ]; then
  sudo_=""
  if [ "$(id -u)" -ne 0 ]; then sudo_="sudo"; fi
  $sudo_ apt-get install -y -q fortunes || { $sudo_ apt-get update -q && $sudo_ apt-get install -y -q fortunes; }
fi
# ONNX Runtime is installed above, so the tract fallback is left out of this
# build: tract is most of a release build's time (`cargo build --release`
# includes it).
cargo build --release -p metac --no-default-features
metac=./target/release/metac
out=runs/main-job
rm -rf "$out"
$metac compile l2o --config configs/short.toml --out "$out/bundle"
$metac run "$out/bundle" --config configs/short.toml --out "$out/run"
# Meta-test over the 100 steps it was meta-trained on, then over 1,000 (a
# short meta-training does not make it stable that far; see README).
$metac eval "$out/run" --bundle "$out/bundle" --problem mnist-mlp --steps 100 --seeds 6,12 \
  --optimizers learned,adam-1e-3 --out "$out/eval-100"
$metac eval "$out/run" --bundle "$out/bundle" --problem mnist-mlp --steps 1000 --seeds 6,12 \
  --optimizers learned,adam-1e-3 --out "$out/eval"
echo "meta-test curves: $out/eval-100/curves.png (100 steps), $out/eval/curves.png (1,000 steps); summaries: summary.json; final parameters: params/"
# The shipped learned optimizer (pretrained/l2o-mnist-mlp) against Adam, on the
# problem it was meta-trained on and on the ReLU MLP it was not.
for p in mnist-mlp mnist-mlp-relu; do
  $metac eval --learned pretrained/l2o-mnist-mlp --problem "$p" --steps 1000 \
    --seeds 6,12 --optimizers learned,adam-1e-3,adam-1e-2 --out "$out/pretrained-$p"
done
# The short run on the transfer problem too, then everything in one figure:
# a panel per problem, the short run, the pretrained optimizer and Adam.
$metac eval "$out/run" --bundle "$out/bundle" --problem mnist-mlp-relu --steps 1000 --seeds 6,12 \
  --optimizers learned --out "$out/eval-relu"
$metac compare "$out/eval=short run" "$out/pretrained-mnist-mlp=pretrained" \
  "$out/eval-relu=short run" "$out/pretrained-mnist-mlp-relu=pretrained" --out "$out/overview"
echo "overview of the learned optimizers against Adam: $out/overview/curves.png"
$metac derive tests/fixtures/onnx/mlp_ce_opset18.onnx \
  --loss loss --wrt l1.weight,l1.bias,l2.weight,l2.bias --out "$out/derive-mlp"
$metac inspect "$out/derive-mlp"
# Tiny-ONN: a byte-level LM with mixtures of SwiGLU experts, trained by the
# compiled two-backward hyper step (300 steps, under a minute), then sampled.
$metac compile moe --config configs/moe-short.toml --out "$out/moe-bundle"
$metac run "$out/moe-bundle" --config configs/moe-short.toml --out "$out/moe"
$metac sample "$out/moe" --prompt "The " --bytes 200 --temperature 0.8
