#!/usr/bin/env python3
"""Check bench/l2o_jax.py against a metac L2O bundle, step by step.

Feeds metac's own initial values (init.safetensors of a bundle from
`metac compile l2o --config configs/seed.toml --out BUNDLE`) and the same
MNIST minibatches to (a) the bundle's `reset` + `step` ONNX graphs under
ONNX Runtime and (b) the JAX step of l2o_jax.py, for K steps, and prints the
largest differences of parameters, state, objective and minibatch loss; then
the meta-loss and the meta-gradient of a K-step unroll, metac's by the
bundle's `step_vjp`/`reset_vjp` graphs (the BPTT of runtime/src/l2o/bptt.rs),
JAX's by jax.grad.

Usage: python3 bench/check_vs_bundle.py /tmp/bench-bundle [--steps 3]
"""

import argparse
import json
import os
import re
import struct
import sys

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import l2o_jax as L  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

DT = {"F32": np.float32, "I64": np.int64, "F64": np.float64, "I32": np.int32}


def read_safetensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k] = np.frombuffer(b[8 + n + s: 8 + n + e], dtype=DT[v["dtype"]]).reshape(v["shape"])
    return out


def to_jax_state(flat):
    tensors = []
    for k in range(4):
        p = f"hrnn.p{k}."
        tensors.append(dict(
            h0=jnp.asarray(flat[p + "h0"]),
            accum=[jnp.asarray(flat[p + f"accum{i}"]) for i in range(L.NS)],
            ms=[jnp.asarray(flat[p + f"ms{i}"]) for i in range(L.NS)],
            inp_decay=jnp.asarray(flat[p + "inp_decay"]),
            scl_decay=jnp.asarray(flat[p + "scl_decay"]),
            log_lr=jnp.asarray(flat[p + "log_lr"]),
            h1=jnp.asarray(flat[p + "h1"]),
        ))
    return dict(tensors=tensors, h2=jnp.asarray(flat["hrnn.global.h2"]))


def from_jax_state(st):
    flat = {}
    for k, t in enumerate(st["tensors"]):
        p = f"hrnn.p{k}."
        flat[p + "h0"] = t["h0"]
        for i in range(L.NS):
            flat[p + f"accum{i}"] = t["accum"][i]
            flat[p + f"ms{i}"] = t["ms"][i]
        for n in ("inp_decay", "scl_decay", "log_lr", "h1"):
            flat[p + n] = t[n]
    flat["hrnn.global.h2"] = st["h2"]
    return {k: np.asarray(v) for k, v in flat.items()}


def maxrel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    man = json.load(open(os.path.join(args.bundle, "manifest.json")))
    init = read_safetensors(os.path.join(args.bundle, "init.safetensors"))
    graphs = {g["name"]: g for g in man["graphs"]}
    so = ort.SessionOptions()
    sess = {n: ort.InferenceSession(os.path.join(args.bundle, g["file"]), so,
                                    providers=["CPUExecutionProvider"]) for n, g in graphs.items()}
    names = {n: [i.name for i in s.get_inputs()] for n, s in sess.items()}
    outs = {n: [o.name for o in s.get_outputs()] for n, s in sess.items()}

    is_state = lambda n: re.match(r"hrnn\.p\d+\.", n) or n == "hrnn.global.h2"  # noqa: E731
    phi_names = [n for n in init if n.startswith("hrnn.") and not is_state(n)]
    theta_names = [n for n in names["step"] if n.startswith("theta.")]
    state_names = [n for n in names["step"] if is_state(n)]
    phi = {n: init[n] for n in phi_names}
    theta = {n: init[n] for n in theta_names}
    state = {n: init[n] for n in state_names}

    # reset (ONNX) -> hidden states
    r = dict(zip(outs["reset"], sess["reset"].run(None, {n: phi[n] for n in names["reset"]})))
    for n in state:
        if "next." + n in r:
            state[n] = r["next." + n]

    x, y = L.load_mnist_train(L.DEFAULT_DATA)
    rng = np.random.default_rng(1)
    xb, yb, xo, yo = L.sample_data(rng, x, y, args.steps)

    jphi = {n: jnp.asarray(v) for n, v in phi.items()}
    jtheta = [jnp.asarray(theta[n]) for n in theta_names]
    jstate = L.reset_hidden(jphi, to_jax_state({n: init[n] for n in state_names}))

    @jax.jit
    def jstep(phi, theta, st, xb, yb):
        loss, g = jax.value_and_grad(L.mlp_loss)(theta, xb, yb)
        th, st = L.hrnn_step(phi, theta, g, st)
        return th, st, L.mlp_loss(th, xo, yo), loss

    print("reset: max rel diff of hidden states",
          max(maxrel(a, b) for a, b in zip(from_jax_state(jstate).values(),
                                           [state[n] for n in from_jax_state(jstate)])))
    thetas, states = [dict(theta)], [dict(state)]
    for t in range(args.steps):
        feed = {**phi, **theta, **state, "batch.x": xb[t], "batch.y": yb[t].astype(np.int64),
                "obj.x": xo, "obj.y": yo.astype(np.int64)}
        o = dict(zip(outs["step"], sess["step"].run(None, {n: feed[n] for n in names["step"]})))
        jtheta, jstate, jobj, jloss = jstep(jphi, jtheta, jstate, xb[t], yb[t])
        theta = {n: o["next." + n] for n in theta_names}
        state = {n: o["next." + n] for n in state_names}
        thetas.append(dict(theta))
        states.append(dict(state))
        js = from_jax_state(jstate)
        worst_state = max(((maxrel(js[n], state[n]), n) for n in state_names))
        print(f"step {t}: objective onnx {float(o['objective']):.7f} jax {float(jobj):.7f}; "
              f"minibatch loss onnx {float(o['minibatch_loss']):.7f} jax {float(jloss):.7f}; "
              f"theta max rel diff {max(maxrel(a, theta[n]) for a, n in zip(jtheta, theta_names)):.2e}; "
              f"state worst {worst_state[0]:.2e} ({worst_state[1]})")

    # ---- meta-loss and meta-gradient of the K-step unroll -----------------------
    th0 = [jnp.asarray(thetas[0][n]) for n in theta_names]
    st0 = to_jax_state({n: init[n] for n in state_names})
    init_obj = float(dict(zip(outs["objective"], sess["objective"].run(
        None, {"theta." + n[6:]: thetas[0][n] for n in theta_names} |
        {"obj.x": xo, "obj.y": yo.astype(np.int64)})))["objective"])
    jl, jg = jax.jit(jax.value_and_grad(L.meta_loss_fn), static_argnums=(8,))(
        jphi, th0, st0, jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(xo), jnp.asarray(yo),
        jnp.float32(init_obj), True)
    # metac's BPTT (runtime/src/l2o/bptt.rs) with the bundle's VJP graphs
    eps = float(np.float32(1e-6))
    objs = []
    for t in range(args.steps):
        feed = {**phi, **thetas[t], **states[t], "batch.x": xb[t], "batch.y": yb[t].astype(np.int64),
                "obj.x": xo, "obj.y": yo.astype(np.int64)}
        o = dict(zip(outs["step"], sess["step"].run(None, {n: feed[n] for n in names["step"]})))
        objs.append(float(o["objective"]))
    c = init_obj + eps
    ml = sum(np.log(ob / c + eps) for ob in objs) / args.steps
    d_obj = [1.0 / ((ob / c + eps) * c) / args.steps for ob in objs]
    d_phi = {n: np.zeros_like(v) for n, v in phi.items()}
    ct = {("ct.next." + n): np.zeros_like(v) for n, v in {**thetas[-1], **states[-1]}.items()}
    for t in reversed(range(args.steps)):
        feed = {**phi, **thetas[t], **states[t], "batch.x": xb[t], "batch.y": yb[t].astype(np.int64),
                "obj.x": xo, "obj.y": yo.astype(np.int64), **ct,
                "ct.objective": np.array(d_obj[t], np.float32)}
        o = dict(zip(outs["step_vjp"], sess["step_vjp"].run(None, {n: feed[n] for n in names["step_vjp"]})))
        for n in d_phi:
            d_phi[n] = d_phi[n] + o["d." + n]
        ct = {("ct.next." + n): o["d." + n] for n in theta_names + state_names}
    feed = {**phi, **{k: v for k, v in ct.items()}}
    o = dict(zip(outs["reset_vjp"], sess["reset_vjp"].run(None, {n: feed[n] for n in names["reset_vjp"]})))
    for n in d_phi:
        if "d." + n in o:
            d_phi[n] = d_phi[n] + o["d." + n]
    print(f"meta-loss ({args.steps} steps): onnx/BPTT {ml:.7f} jax {float(jl):.7f}")
    num = sum(float(np.sum((np.asarray(jg[n], np.float64) - d_phi[n]) ** 2)) for n in d_phi)
    den = sum(float(np.sum(np.asarray(d_phi[n], np.float64) ** 2)) for n in d_phi)
    print(f"meta-gradient: |jax - metac| / |metac| = {np.sqrt(num / den):.2e} (|metac| = {np.sqrt(den):.4g})")
    worst = sorted(((maxrel(jg[n], d_phi[n]), n) for n in d_phi), reverse=True)[:5]
    print("worst tensors (max abs diff / max abs metac):", ", ".join(f"{n} {v:.2e}" for v, n in worst))


if __name__ == "__main__":
    main()
