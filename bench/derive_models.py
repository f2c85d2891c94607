#!/usr/bin/env python3
"""`metac derive` on models nobody here wrote: torchvision CNNs and PyTorch's
TransformerEncoderLayer, exported by torch.onnx.export, with a cross-entropy
loss, at batch 2. For each model and exporter it reports:

  * whether `metac derive` takes it (and the error if not);
  * the node counts of the gradient and HVP graphs, their load time in ONNX
    Runtime (a fresh InferenceSession) and the time of one run;
  * the agreement of ONNX Runtime's gradient and HVP (float32) with PyTorch
    autograd in float64 on the same weights and data (relative L2 error over
    all parameters together).

Run with the PyTorch venv of bench/requirements-torch.txt plus torchvision,
pillow, onnx and onnxruntime (no pretrained weights are downloaded: the
models are randomly initialised from fixed seeds):

    /tmp/venv-torch/bin/pip install torchvision==0.29.2 --no-deps pillow \
        onnx==1.23.2 onnxruntime==1.31.1
    cargo build --release -p metac --no-default-features
    /tmp/venv-torch/bin/python bench/derive_models.py [--models a,b] [--out DIR]

The output (a markdown table) is recorded in docs/hessian.md.
"""

import argparse
import copy
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import run_derived  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METAC = ROOT / "target" / "release" / "metac"


class WithLoss(nn.Module):
    def __init__(self, net, flat_logits=False):
        super().__init__()
        self.net = net
        self.flat_logits = flat_logits

    def forward(self, x, y):
        logits = self.net(x)
        if self.flat_logits:
            logits = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(logits, y)


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer over embedded tokens, a linear head."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(32, 11)

    def forward(self, x):
        return self.head(self.layer(x))


class TinyGPT(nn.Module):
    """A GPT-2-style LM: token and position embeddings, pre-LN blocks of
    causal self-attention and a GELU MLP, a final LayerNorm and a head tied
    to the token embedding."""

    def __init__(self, vocab=50, ctx=8, d=32, heads=4, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
                "ln2": nn.LayerNorm(d), "fc": nn.Linear(d, 4 * d), "out": nn.Linear(4 * d, d),
            }))
        self.ln = nn.LayerNorm(d)
        self.heads = heads
        self.register_buffer("mask", torch.tril(torch.ones(ctx, ctx, dtype=torch.bool)))

    def forward(self, ids):
        b, t = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(t))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).split(h.shape[-1], dim=-1)
            sh = lambda z: z.reshape(b, t, self.heads, -1).transpose(1, 2)
            q, k, v = sh(q), sh(k), sh(v)
            att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
            h = h + blk["proj"]((att @ v).transpose(1, 2).reshape(b, t, -1))
            h = h + blk["out"](F.gelu(blk["fc"](blk["ln2"](h))))
        return self.ln(h) @ self.tok.weight.t()


def vision(name):
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def model_and_data(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "gpt2_style_lm":
        model = WithLoss(TinyGPT(), flat_logits=True)
        x = torch.randint(0, 50, (2, 8), generator=g)
        y = torch.randint(0, 50, (16,), generator=g)
    elif name == "transformer_encoder_layer":
        model = WithLoss(Encoder(), flat_logits=True)
        x = torch.randn(2, 6, 32, generator=g)
        y = torch.randint(0, 11, (12,), generator=g)
    else:
        model = WithLoss(vision(name))
        x = torch.randn(2, 3, 64, 64, generator=g)
        y = torch.randint(0, 1000, (2,), generator=g)
    # Every parameter generic: the exporter shares initializers of equal
    # values (zero biases, unit norm scales), which would merge parameters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), x, y


class HardSwish64(nn.Module):
    def forward(self, x):
        return x * torch.clamp(x / 6 + 0.5, 0, 1)


class HardSigmoid64(nn.Module):
    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0, 1)


def float64_copy(model):
    """The model in float64, with hardswish and hardsigmoid written with
    clamp (PyTorch has no double backward for them)."""
    m = copy.deepcopy(model).double()
    for parent in m.modules():
        for k, child in parent.named_children():
            if isinstance(child, nn.Hardswish):
                setattr(parent, k, HardSwish64())
            elif isinstance(child, nn.Hardsigmoid):
                setattr(parent, k, HardSigmoid64())
    # The encoder layer's fused fast path has no double backward either.
    torch.backends.mha.set_fastpath_enabled(False)
    return m


def export(model, x, y, path, dynamo):
    kw = dict(
        input_names=["x", "y"],
        output_names=["loss"],
        opset_version=18,
        do_constant_folding=False,
        dynamo=dynamo,
    )
    if dynamo:
        # Without the ONNX optimizer, which folds BatchNorm into the convs.
        kw["optimize"] = False
    else:
        # PRESERVE on a model in eval mode: inference semantics, but
        # without the eval peephole that folds BatchNorm into the convs
        # (whose weights would then no longer be the parameters).
        kw["training"] = torch.onnx.TrainingMode.PRESERVE
    torch.onnx.export(model, (x, y), str(path), **kw)


def torch_reference(model, x, y, names, vs):
    m = float64_copy(model)
    params = dict(m.named_parameters())
    ps = [params[n] for n in names]
    # The math attention kernel: the flash kernel has no double backward.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        loss = m(x.double() if x.is_floating_point() else x, y)
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    dot = sum((g * torch.from_numpy(v).double()).sum() for g, v in zip(grads, vs))
    hv = torch.autograd.grad(dot, ps)
    flat = lambda ts: np.concatenate([t.detach().numpy().reshape(-1) for t in ts])
    return float(loss), flat(grads), flat(hv)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def run_case(name, dynamo, work):
    model, x, y = model_and_data(name)
    path = work / f"{name}-{'dynamo' if dynamo else 'legacy'}.onnx"
    row = {"model": name, "exporter": "dynamo=True" if dynamo else "dynamo=False"}
    try:
        export(model, x, y, path, dynamo)
    except Exception as e:  # noqa: BLE001 (reported, not hidden)
        row["error"] = f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return row
    m = onnx.load(str(path))  # external data too
    params = dict(model.named_parameters())
    inits = {t.name: t for t in m.graph.initializer}
    names = [n for n in params if n in inits]
    if len(names) < len(params):
        missing = [n for n in params if n not in inits]
        row["note"] = f"{len(missing)} parameters not initializers by name (e.g. {missing[0]})"
    row["params"] = sum(params[n].numel() for n in names)
    row["model_nodes"] = len(m.graph.node)
    out = work / f"{path.stem}-derived"
    t0 = time.perf_counter()
    r = subprocess.run(
        [METAC, "derive", path, "--loss", "loss", "--wrt", ",".join(names), "--out", out],
        capture_output=True,
        text=True,
    )
    row["derive_s"] = time.perf_counter() - t0
    if r.returncode != 0:
        row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:160]
        return row
    rng = np.random.default_rng(2)
    vs = [rng.standard_normal(tuple(params[n].shape)).astype(np.float32) for n in names]
    feeds = {"x": x.numpy(), "y": y.numpy()}
    for n in names:
        feeds[n] = numpy_helper.to_array(inits[n])
    res = run_derived(out, feeds, dict(zip(names, vs)), row)
    loss64, g64, h64 = torch_reference(model, x, y, names, vs)
    g = np.concatenate([res["grad"][f"grad_{n}"].reshape(-1) for n in names]).astype(np.float64)
    h = np.concatenate([res["hvp"][f"hvp_{n}"].reshape(-1) for n in names]).astype(np.float64)
    row["loss_err"] = abs(float(res["grad"]["loss"]) - loss64) / abs(loss64)
    row["grad_err"] = rel(g, g64)
    row["hvp_err"] = rel(h, h64)
    return row


MODELS = [
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "resnet18",
    "transformer_encoder_layer",
    "gpt2_style_lm",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--exporters", default="legacy,dynamo")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if not METAC.exists():
        sys.exit(f"{METAC} is missing: cargo build --release -p metac --no-default-features")
    tmp = None if a.out else tempfile.TemporaryDirectory(prefix="derive-models-")
    work = a.out or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    print()
    print("| model | exporter | params | grad nodes | HVP nodes | ORT load grad / HVP (s) "
          "| ORT run grad / HVP (s) | grad rel err | HVP rel err |")
    print("|---|---|---:|---:|---:|---|---|---:|---:|")
    for name in a.models.split(","):
        for ex in a.exporters.split(","):
            r = run_case(name, ex == "dynamo", work)
            if "error" in r:
                print(f"| {name} | {r['exporter']} | | | | {r['error']} | | | |", flush=True)
                continue
            print(
                f"| {name} | {r['exporter']} | {r['params']:,} | {r['grad_nodes']:,} "
                f"| {r['hvp_nodes']:,} | {r['grad_load_s']:.2f} / {r['hvp_load_s']:.2f} "
                f"| {r['grad_run_s']:.3f} / {r['hvp_run_s']:.3f} | {r['grad_err']:.1e} "
                f"| {r['hvp_err']:.1e} |"
                + (f" {r['note']}" if "note" in r else ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
