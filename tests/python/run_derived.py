#!/usr/bin/env python3
"""Run a `metac derive` bundle in ONNX Runtime's Python API and compare with
the PyTorch autograd reference of the fixture.

Usage: run_derived.py BUNDLE_DIR REF.json

Feeds the reference inputs and parameters to grad.onnx and hvp.onnx and
checks the loss, every gradient and every HVP (relative 1e-4 per tensor,
with an absolute floor for tensors whose true value is ~0).
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def close(got, want, what):
    got = np.asarray(got, dtype=np.float64).ravel()
    want = np.asarray(want, dtype=np.float64).ravel()
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-3)
    if err > 1e-4:
        raise AssertionError(f"{what}: relative error {err:.3e}")
    return err


def main():
    bundle, ref_path = sys.argv[1], sys.argv[2]
    ref = json.load(open(ref_path))
    feeds = {}
    for name, t in ref["inputs"].items():
        dt = np.int64 if t.get("dtype", "float32").startswith("int") else np.float32
        feeds[name] = np.asarray(t["data"], dtype=dt).reshape(t["shape"])
    for name, t in ref["params"].items():
        feeds[name] = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
    checks = 0
    g = ort.InferenceSession(f"{bundle}/grad.onnx", providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in g.get_outputs()], g.run(None, {i.name: feeds[i.name] for i in g.get_inputs()})))
    close(out["loss"], ref["loss"], "loss")
    checks += 1
    for name, want in ref["grad"].items():
        close(out[f"grad_{name}"], want, f"grad_{name}")
        checks += 1
    h = ort.InferenceSession(f"{bundle}/hvp.onnx", providers=["CPUExecutionProvider"])
    for name, t in ref["params"].items():
        feeds[f"v_{name}"] = np.asarray(ref["v"][name], dtype=np.float32).reshape(t["shape"])
    out = dict(zip([o.name for o in h.get_outputs()], h.run(None, {i.name: feeds[i.name] for i in h.get_inputs()})))
    for name, want in ref["hvp"].items():
        close(out[f"hvp_{name}"], want, f"hvp_{name}")
        checks += 1
    print(f"python onnxruntime: {checks} passed, 0 failed")


if __name__ == "__main__":
    main()
