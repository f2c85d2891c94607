#!/usr/bin/env python3
"""Check bench/l2o_jax.py against a metac L2O bundle, step by step.

Feeds metac's own initial values (init.safetensors of a bundle from
`metac compile l2o --config configs/seed.toml --out BUNDLE`) and the same
MNIST minibatches to (a) the bundle's `reset` + `step` ONNX graphs under
ONNX Runtime and (b) the JAX step of l2o_jax.py, for K steps, and prints the
largest differences of parameters, state, objective and minibatch loss; then
the meta-loss and the meta-gradient of a K-step unroll, metac's by the
bundle's `step_vjp`/`reset_vjp` graphs (the BPTT of runtime/src/l2o/bptt.rs:
the objective's cotangent enters through theta via the step's
`objective_grad.*` outputs), JAX's by jax.grad. The bundle's packed,
feature-major `hrnn.state.*` tensors are converted to and from l2o_jax.py's
per-tensor state (to_jax_state / from_jax_state).

Usage: python3 bench/check_vs_bundle.py /tmp/bench-bundle [--steps 3]
"""

import argparse
import json
import os
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


# The bundle's HierarchicalRNN state is packed and feature-major: N = the
# number of optimizee parameters, tensor k (the order of the `theta.*` inputs)
# owning columns offsets[k]..offsets[k]+n_k (its elements flattened row-major),
# T = the number of tensors:
#   hrnn.state.h0 [10, N], hrnn.state.accum / hrnn.state.ms [NS, N] (row i =
#   scale i), hrnn.state.inp_decay / scl_decay / log_lr [1, N],
#   hrnn.state.h1 [20, T] (column k = tensor k), hrnn.state.h2 [20, 1].
# l2o_jax.py keeps the state per tensor (h0 [n,10], accum[i] / ms[i] /
# inp_decay / scl_decay / log_lr [n,1], h1 [1,20]) plus h2 [1,20].
STATE = "hrnn.state."


def is_state(name):
    return name.startswith(STATE)


def column_slices(shapes):
    """Column range of each parameter tensor in the packed state."""
    out, off = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(slice(off, off + n))
        off += n
    return out


def to_jax_state(flat, shapes):
    """Packed bundle state -> l2o_jax.py's per-tensor state."""
    h0, accum, ms = flat[STATE + "h0"], flat[STATE + "accum"], flat[STATE + "ms"]
    col = lambda name, c: jnp.asarray(flat[STATE + name][0, c].reshape(-1, 1))  # noqa: E731
    tensors = []
    for k, c in enumerate(column_slices(shapes)):
        tensors.append(dict(
            h0=jnp.asarray(np.ascontiguousarray(h0[:, c].T)),
            accum=[jnp.asarray(accum[i, c].reshape(-1, 1)) for i in range(L.NS)],
            ms=[jnp.asarray(ms[i, c].reshape(-1, 1)) for i in range(L.NS)],
            inp_decay=col("inp_decay", c),
            scl_decay=col("scl_decay", c),
            log_lr=col("log_lr", c),
            h1=jnp.asarray(flat[STATE + "h1"][:, k].reshape(1, -1)),
        ))
    return dict(tensors=tensors, h2=jnp.asarray(flat[STATE + "h2"].reshape(1, -1)))


def from_jax_state(st):
    """l2o_jax.py's per-tensor state -> the packed bundle state."""
    ts = [{k: (np.asarray(v) if k not in ("accum", "ms") else [np.asarray(a) for a in v])
           for k, v in t.items()} for t in st["tensors"]]
    flat = {
        STATE + "h0": np.concatenate([t["h0"].T for t in ts], axis=1),
        STATE + "accum": np.stack([np.concatenate([t["accum"][i][:, 0] for t in ts])
                                   for i in range(L.NS)]),
        STATE + "ms": np.stack([np.concatenate([t["ms"][i][:, 0] for t in ts])
                                for i in range(L.NS)]),
        STATE + "h1": np.stack([t["h1"].reshape(-1) for t in ts], axis=1),
        STATE + "h2": np.asarray(st["h2"]).reshape(-1, 1),
    }
    for n in ("inp_decay", "scl_decay", "log_lr"):
        flat[STATE + n] = np.concatenate([t[n][:, 0] for t in ts])[None, :]
    return flat


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

    phi_names = [n for n in init if n.startswith("hrnn.") and not is_state(n)]
    theta_names = [n for n in names["step"] if n.startswith("theta.")]
    state_names = [n for n in names["step"] if is_state(n)]
    phi = {n: init[n] for n in phi_names}
    theta = {n: init[n] for n in theta_names}
    state = {n: init[n] for n in state_names}
    shapes = [theta[n].shape for n in theta_names]

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
    jstate = L.reset_hidden(jphi, to_jax_state({n: init[n] for n in state_names}, shapes))

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
    st0 = to_jax_state({n: init[n] for n in state_names}, shapes)
    init_obj = float(dict(zip(outs["objective"], sess["objective"].run(
        None, {"theta." + n[6:]: thetas[0][n] for n in theta_names} |
        {"obj.x": xo, "obj.y": yo.astype(np.int64)})))["objective"])
    jl, jg = jax.jit(jax.value_and_grad(L.meta_loss_fn), static_argnums=(8,))(
        jphi, th0, st0, jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(xo), jnp.asarray(yo),
        jnp.float32(init_obj), True)
    # metac's BPTT (runtime/src/l2o/bptt.rs, truncated_bptt) with the bundle's
    # VJP graphs: the forward step also gives d objective / d theta', and the
    # objective's cotangent enters the backward pass through theta
    # (ct.next.theta += d_obj[t] * objective_grad_t) before step t's VJP.
    eps = float(np.float32(1e-6))
    objs, obj_grads = [], []
    for t in range(args.steps):
        feed = {**phi, **thetas[t], **states[t], "batch.x": xb[t], "batch.y": yb[t].astype(np.int64),
                "obj.x": xo, "obj.y": yo.astype(np.int64)}
        o = dict(zip(outs["step"], sess["step"].run(None, {n: feed[n] for n in names["step"]})))
        objs.append(float(o["objective"]))
        obj_grads.append({n: o["objective_grad." + n] for n in theta_names})
    c = init_obj + eps
    ml = sum(np.log(ob / c + eps) for ob in objs) / args.steps
    d_obj = [1.0 / ((ob / c + eps) * c) / args.steps for ob in objs]
    d_phi = {n: np.zeros_like(v) for n, v in phi.items()}
    ct = {("ct.next." + n): np.zeros_like(v) for n, v in {**thetas[-1], **states[-1]}.items()}
    for t in reversed(range(args.steps)):
        # The objective after step t is a function of theta_t+1 only.
        for n in theta_names:
            ct["ct.next." + n] = ct["ct.next." + n] + np.float32(d_obj[t]) * obj_grads[t][n]
        feed = {**phi, **thetas[t], **states[t], "batch.x": xb[t], "batch.y": yb[t].astype(np.int64),
                **ct}
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
