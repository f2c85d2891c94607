#!/usr/bin/env python3
"""JAX reference of one metac L2O meta-iteration, for benchmarking.

One meta-iteration = the initial objective, one unroll of `--unroll` inner
steps of the HierarchicalRNN learned optimizer (L2O-Scale) on the MNIST
784-20-10 sigmoid MLP, the meta-gradient of the log meta-objective by
reverse mode over the whole unroll (jax.grad through lax.scan), and an
RMSProp update of the optimizer weights -- all in one jax.jit, on CPU.

It follows metac's computation:
* HierarchicalRNN step: compiler/src/models/hrnn.rs (defaults of
  HrnnConfig: sizes 10/20/20, 4 gradient scales, learnable decays, dynamic
  output scale, log-ms and relative-lr features with the problem-wide lr
  mean, gradient shortcut, gradient products, level-2 input = new level-1
  state of the LAST tensor, straight-through clip of the step log lr);
* inner step: compiler/src/l2o/program.rs (`step_core`): minibatch loss,
  its gradient with stop_gradient (use_second_derivatives = false), the
  HRNN update, the objective at the new parameters on the objective set;
  hidden states reset in-graph from the learnable init vectors;
* meta-loss: mean_t log(obj_t / (init_obj + 1e-6) + 1e-6)
  (runtime/src/l2o/bptt.rs);
* meta-update: runtime/src/l2o/meta_opt.rs (NaN -> 0, clip to +-clip,
  ms = decay*ms + (1-decay)*g^2, phi -= lr*g/sqrt(ms+eps), no change where
  g == 0), settings of configs/seed.toml.

Optionally (`--reg`), a Hessian regulariser of the L2O-Entropy fork, as in
compiler/src/l2o/regularizer.rs and runtime/src/l2o/bptt.rs: at every inner
step t, on the minibatch loss L_t at theta_t (before the step's update) with
the true (not stop-gradient'ed) gradient,
* hessian:     Hutchinson, mean over P Rademacher probes of v^T H v;
* hessian-ev:  k steps of power iteration from a normal probe, the Rayleigh
               quotient of the last normalised iterate;
* hessian-esd: m Lanczos steps with full reorthogonalisation from a normal
               probe, sum of the alphas (trace of the tridiagonal matrix);
* jacob:       mean squared gradient;
each H v an HVP (jax.jvp of jax.grad, forward-over-reverse). The meta-loss
becomes mean_t log-term + alpha * sum_t reg_t, differentiated through the
whole unroll (third-order terms through theta_t). Probes are drawn inside the
jit from a jax.random key argument, split per step.

Usage: python3 bench/l2o_jax.py --unroll 20 --repeats 5   (prints JSON)
       python3 bench/l2o_jax.py --reg hessian --repeats 3 --no-unrolled-flops
"""

import argparse
import gzip
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

# ---- configuration (compiler/src/models/hrnn.rs HrnnConfig::default) ---------
S0, S1, S2 = 10, 20, 20
NS = 4  # gradient scales
NF = NS + (NS - 1) + NS + 1  # 12 features
MIN_LOG_LR, MAX_LOG_LR = -33.0, 33.0
MS_EPS, EPS16 = 1e-12, 1e-16
LOG_OBJ_EPS = 1e-6
INIT_LR_RANGE = (1e-6, 1e-2)

# configs/seed.toml
BATCH = 128
OBJ_EXAMPLES = 10000
META_LR, META_DECAY, META_EPS, META_CLIP, META_ACC_INIT = 1e-6, 0.9, 1e-20, 1e4, 1.0

# The MLP's parameters, in metac's order (w0, b0, w1, b1).
PARAM_SHAPES = [(784, 20), (20,), (20, 10), (10,)]

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(os.path.dirname(HERE), "data", "mnist")


# ---- data ---------------------------------------------------------------------
def read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist_train(data_dir):
    x = read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte.gz"))
    x = x.reshape(x.shape[0], 784).astype(np.float32) / 255.0
    return x, y.astype(np.int32)


def sample_data(rng, x, y, unroll):
    """`unroll` minibatches of BATCH and one objective set of OBJ_EXAMPLES."""
    n = x.shape[0]
    mb = rng.integers(0, n, size=(unroll, BATCH))
    obj = rng.choice(n, size=OBJ_EXAMPLES, replace=False)
    return x[mb], y[mb], x[obj], y[obj]


# ---- meta-weights (HrnnWeights::new: same names, shapes and init scales) ------
def weight_specs():
    specs = []

    def normal(mean, scale, fan):
        return ("normal", mean, scale / np.sqrt(fan))

    def cell(lvl, inp, n):
        fan = inp + n
        specs.append((f"l{lvl}.gates.w", (fan, 2 * n), normal(0.0, 0.5, fan)))
        specs.append((f"l{lvl}.gates.b", (2 * n,), ("const", 2.2)))
        specs.append((f"l{lvl}.cand.w", (fan, n), normal(0.0, 0.5, fan)))
        specs.append((f"l{lvl}.cand.b", (n,), ("const", 0.0)))

    cell(0, NF, S0)
    specs.append(("l0.tensor_bias.w", (S1, 3 * S0), normal(0.0, 0.5, S1)))
    specs.append(("l0.tensor_bias.b", (3 * S0,), ("const", 0.0)))
    specs.append(("l0.global_bias.w", (S2, 3 * S0), normal(0.0, 0.5, S2)))
    specs.append(("l0.global_bias.b", (3 * S0,), ("const", 0.0)))
    cell(1, S0 + NF, S1)
    specs.append(("l1.global_bias.w", (S2, 3 * S1), normal(0.0, 0.5, S2)))
    specs.append(("l1.global_bias.b", (3 * S1,), ("const", 0.0)))
    cell(2, S1, S2)
    specs.append(("init.l0", (1, S0), ("uniform", -1.0, 1.0)))
    specs.append(("init.l1", (1, S1), ("uniform", -1.0, 1.0)))
    specs.append(("init.l2", (1, S2), ("uniform", -1.0, 1.0)))
    readout = normal(0.0, 0.5, S0)
    specs.append(("update.w", (S0, 1), readout))
    specs.append(("shortcut.w", (NS, 1), normal(1.0 / NS, 0.1, NS)))
    specs.append(("scl_decay.w", (S0, 1), readout))
    specs.append(("scl_decay.b", (1,), ("const", 3.2)))
    specs.append(("inp_decay.w", (S0, 1), readout))
    specs.append(("inp_decay.b", (1,), ("const", 2.2)))
    specs.append(("lr.w", (S0, 1), ("const", 0.0)))
    specs.append(("lr.b", (1,), ("const", 0.0)))
    specs.append(("lr_momentum_logit", (), ("const", 3.2)))
    specs.append(("param_stepsize_offset", (), ("const", -1.0)))
    return specs


def init_phi(seed):
    rng = np.random.default_rng(seed)
    phi = {}
    for name, shape, init in weight_specs():
        if init[0] == "normal":
            v = init[1] + init[2] * rng.standard_normal(shape)
        elif init[0] == "uniform":
            v = rng.uniform(init[1], init[2], size=shape)
        else:
            v = np.full(shape, init[1])
        phi["hrnn." + name] = jnp.asarray(v, dtype=jnp.float32)
    return phi


# ---- optimizee init and optimizer state ----------------------------------------
def init_theta(rng):
    """Fan-in normal: N(0,1) * 1.2/sqrt(fan_in) weights, zero biases."""
    w0 = rng.standard_normal((784, 20)) * 1.2 / np.sqrt(784)
    w1 = rng.standard_normal((20, 10)) * 1.2 / np.sqrt(20)
    return [jnp.asarray(a, jnp.float32) for a in
            (w0, np.zeros(20), w1, np.zeros(10))]


def init_state(rng):
    """Hrnn::initial_state: zeros; log_lr = U(a,b) + one U(a,b) offset per
    tensor, clipped. Hidden states are placeholders (reset in the step)."""
    a, b = np.log(INIT_LR_RANGE[0]) / 2, np.log(INIT_LR_RANGE[1]) / 2
    tensors = []
    for shape in PARAM_SHAPES:
        n = int(np.prod(shape))
        off = rng.uniform(a, b)
        log_lr = np.clip(rng.uniform(a, b, size=(n, 1)) + off, MIN_LOG_LR, MAX_LOG_LR)
        z = np.zeros((n, 1), np.float32)
        tensors.append(dict(
            h0=jnp.zeros((n, S0), jnp.float32),
            accum=[jnp.asarray(z)] * NS,
            ms=[jnp.asarray(z)] * NS,
            inp_decay=jnp.asarray(z),
            scl_decay=jnp.asarray(z),
            log_lr=jnp.asarray(log_lr, jnp.float32),
            h1=jnp.zeros((1, S1), jnp.float32),
        ))
    return dict(tensors=tensors, h2=jnp.zeros((1, S2), jnp.float32))


def reset_hidden(phi, state):
    """Hrnn::reset_hidden: hidden states from the learnable init vectors."""
    tensors = []
    for t in state["tensors"]:
        t = dict(t)
        t["h0"] = jnp.broadcast_to(phi["hrnn.init.l0"], t["h0"].shape)
        t["h1"] = phi["hrnn.init.l1"]
        tensors.append(t)
    return dict(tensors=tensors, h2=phi["hrnn.init.l2"])


# ---- the HierarchicalRNN step -----------------------------------------------------
def bias_gru(phi, lvl, x, h, bias, n):
    xh = jnp.concatenate([x, h], axis=1)
    gates = xh @ phi[f"hrnn.l{lvl}.gates.w"] + phi[f"hrnn.l{lvl}.gates.b"]
    if bias is not None:
        gates = gates + bias[:, : 2 * n]
    r = jax.nn.sigmoid(gates[:, :n])
    u = jax.nn.sigmoid(gates[:, n: 2 * n])
    xrh = jnp.concatenate([x, r * h], axis=1)
    cand = xrh @ phi[f"hrnn.l{lvl}.cand.w"] + phi[f"hrnn.l{lvl}.cand.b"]
    if bias is not None:
        cand = cand + bias[:, 2 * n:]
    c = jnp.tanh(cand)
    return u * h + (1.0 - u) * c


def straight_through_clip(x, lo, hi):
    return x + lax.stop_gradient(jnp.clip(x, lo, hi) - x)


def hrnn_step(phi, params, grads, state):
    """Hrnn::step with the default config. Returns (new params, new state)."""
    h2_old = state["h2"]
    # use_problem_lr_mean: mean log lr over all elements of all tensors.
    total = sum(jnp.sum(t["log_lr"]) for t in state["tensors"])
    count = sum(t["log_lr"].shape[0] for t in state["tensors"])
    problem_mean_log_lr = total / count
    gbias0 = h2_old @ phi["hrnn.l0.global_bias.w"] + phi["hrnn.l0.global_bias.b"]
    gbias1 = h2_old @ phi["hrnn.l1.global_bias.w"] + phi["hrnn.l1.global_bias.b"]
    lrm = jax.nn.sigmoid(phi["hrnn.lr_momentum_logit"])

    new_params, new_tensors, h1_news = [], [], []
    for p, gr, st in zip(params, grads, state["tensors"]):
        n = p.size
        grad = gr.reshape(n, 1)
        # ---- features
        decays = [st["inp_decay"]]
        for _ in range(1, NS):
            decays.append(jnp.sqrt(decays[-1]))
        scl = st["scl_decay"]
        gs, log_ms, accums, mss = [], [], [], []
        for i in range(NS):
            accum = grad * (1.0 - decays[i]) + st["accum"][i] * decays[i]
            accums.append(accum)
            ms_old = st["ms"][i]
            all_zero = jnp.max(jnp.abs(ms_old)) == 0.0
            s = jnp.where(all_zero, 0.0, scl)
            ms = (1.0 - s) * (jnp.square(accum) + MS_EPS) + s * ms_old
            mss.append(ms)
            mse = ms + EPS16
            gs.append(jnp.arcsinh(accum / jnp.sqrt(mse)))
            log_ms.append(jnp.log(mse))
        feats = list(gs)
        for i in range(NS - 1):
            feats.append(gs[i] * gs[i + 1])
        avg = sum(log_ms) / NS
        feats += [l - avg for l in log_ms]
        feats.append(st["log_lr"] - problem_mean_log_lr)
        x = jnp.concatenate(feats, axis=1)  # [n, 12]
        # ---- level 0 and level 1
        h1_old = st["h1"]
        tb = h1_old @ phi["hrnn.l0.tensor_bias.w"] + phi["hrnn.l0.tensor_bias.b"]
        h0_new = bias_gru(phi, 0, x, st["h0"], tb + gbias0, S0)
        l1_in = jnp.mean(jnp.concatenate([h0_new, x], axis=1), axis=0, keepdims=True)
        h1_new = bias_gru(phi, 1, l1_in, h1_old, gbias1, S1)
        h1_news.append(h1_new)
        # ---- readouts
        delta = h0_new @ phi["hrnn.update.w"]
        delta = delta + jnp.concatenate(gs, axis=1) @ phi["hrnn.shortcut.w"]
        delta = delta / jnp.sqrt(jnp.mean(jnp.square(delta)) + EPS16)
        new_scl = jax.nn.sigmoid(h0_new @ phi["hrnn.scl_decay.w"] + phi["hrnn.scl_decay.b"])
        new_inp = jax.nn.sigmoid(h0_new @ phi["hrnn.inp_decay.w"] + phi["hrnn.inp_decay.b"])
        log_lr = st["log_lr"]
        change = h0_new @ phi["hrnn.lr.w"] + phi["hrnn.lr.b"]
        step_log_lr = straight_through_clip(log_lr + change, MIN_LOG_LR, MAX_LOG_LR)
        new_log_lr = lrm * log_lr + (1.0 - lrm) * step_log_lr
        lr = jnp.exp(step_log_lr + phi["hrnn.param_stepsize_offset"])
        new_params.append(p - (lr * delta).reshape(p.shape))
        new_tensors.append(dict(h0=h0_new, accum=accums, ms=mss, inp_decay=new_inp,
                                scl_decay=new_scl, log_lr=new_log_lr, h1=h1_new))
    # ---- level 2 (Level2Input::LastTensor)
    h2_new = bias_gru(phi, 2, h1_news[-1], h2_old, None, S2)
    return new_params, dict(tensors=new_tensors, h2=h2_new)


# ---- the optimizee ---------------------------------------------------------------
def mlp_loss(params, x, y):
    w0, b0, w1, b1 = params
    h = jax.nn.sigmoid(x @ w0 + b0)
    logits = h @ w1 + b1
    lsm = jax.nn.log_softmax(logits, axis=1)
    picked = jnp.take_along_axis(lsm, y[:, None], axis=1)
    return -jnp.mean(picked)


# ---- Hessian regularisers (compiler/src/l2o/regularizer.rs) ------------------------
REG_OPTIONS = ("none", "hessian", "hessian-ev", "hessian-esd", "jacob")
NORM_FLOOR = 1e-30  # squared norms below this normalise to zero instead of NaN


def _dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(a, b))


def _normalize_with_norm(v):
    norm = jnp.sqrt(_dot(v, v) + NORM_FLOOR)
    return [x / norm for x in v], norm


def _sub_scaled(a, c, b):
    return [x - c * y for x, y in zip(a, b)]


def regularizer(reg, theta, x, y, key, probes, power_iters, lanczos_steps):
    """The regulariser on the minibatch loss at `theta` (true gradient).
    Returns a scalar; `key` draws this step's probes."""
    grad_fn = lambda th: jax.grad(mlp_loss)(th, x, y)  # noqa: E731

    if reg == "jacob":
        g = grad_fn(theta)
        count = sum(a.size for a in g)
        return _dot(g, g) / count

    def hvp(v):  # forward-over-reverse
        return jax.jvp(grad_fn, (theta,), (v,))[1]

    keys = jax.random.split(key, len(theta))
    if reg == "hessian":
        # [P, *shape] Rademacher probes, one stack per parameter tensor.
        stacks = [jax.random.rademacher(k, (probes,) + a.shape, dtype=a.dtype)
                  for k, a in zip(keys, theta)]
        total = 0.0
        for i in range(probes):
            v = [s[i] for s in stacks]
            total = total + _dot(v, hvp(v))
        return total / probes
    start = [jax.random.normal(k, a.shape, dtype=a.dtype) for k, a in zip(keys, theta)]
    if reg == "hessian-ev":
        v, _ = _normalize_with_norm(start)
        rayleigh = None
        for _ in range(power_iters):
            w = hvp(v)
            rayleigh = _dot(v, w)
            v, _ = _normalize_with_norm(w)
        return rayleigh
    if reg == "hessian-esd":
        basis = [_normalize_with_norm(start)[0]]
        beta_prev, total = None, 0.0
        for j in range(lanczos_steps):
            q = basis[j]
            w = hvp(q)
            a = _dot(q, w)
            total = total + a
            if j + 1 == lanczos_steps:
                break
            w = _sub_scaled(w, a, q)
            if beta_prev is not None:
                w = _sub_scaled(w, beta_prev, basis[j - 1])
            for qi in list(basis):  # full reorthogonalisation
                w = _sub_scaled(w, _dot(qi, w), qi)
            nxt, beta_prev = _normalize_with_norm(w)
            basis.append(nxt)
        return total
    raise ValueError(f"unknown regulariser {reg!r}")


# ---- one meta-iteration ---------------------------------------------------------------
def meta_loss_fn(phi, theta0, state0, xb, yb, xo, yo, init_obj, use_scan=True,
                 reg_key=None, reg=None):
    """mean_t log-objective term (+ alpha * sum_t reg_t with a regulariser).
    `reg`: None or (option, alpha, probes, power_iters, lanczos_steps)."""
    state = reset_hidden(phi, state0)
    c = init_obj + LOG_OBJ_EPS
    unroll = xb.shape[0]
    step_keys = jax.random.split(reg_key, unroll) if reg is not None else None

    def step(carry, batch):
        theta, st = carry
        if reg is not None:
            x, y, k = batch
            option, _, probes, power_iters, lanczos_steps = reg
            r = regularizer(option, theta, x, y, k, probes, power_iters, lanczos_steps)
        else:
            x, y = batch
            r = jnp.zeros((), jnp.float32)
        g = jax.grad(mlp_loss)(theta, x, y)
        g = [lax.stop_gradient(a) for a in g]  # use_second_derivatives = false
        theta, st = hrnn_step(phi, theta, g, st)
        obj = mlp_loss(theta, xo, yo)
        return (theta, st), (jnp.log(obj / c + LOG_OBJ_EPS), r)

    xs = (xb, yb) if reg is None else (xb, yb, step_keys)
    if use_scan:
        _, (terms, regs) = lax.scan(step, (theta0, state), xs)
    else:
        carry, ts, rs = (theta0, state), [], []
        for t in range(unroll):
            carry, (term, r) = step(carry, tuple(a[t] for a in xs))
            ts.append(term)
            rs.append(r)
        terms, regs = jnp.stack(ts), jnp.stack(rs)
    loss = jnp.mean(terms)
    if reg is not None:
        # alpha * reg summed over the steps (runtime/src/l2o/bptt.rs).
        loss = loss + reg[1] * jnp.sum(regs)
    return loss, jnp.mean(regs)


def make_meta_iteration(use_scan, reg=None):
    def meta_iteration(phi, ms, theta0, state0, xb, yb, xo, yo, reg_key):
        init_obj = lax.stop_gradient(mlp_loss(theta0, xo, yo))
        (loss, mean_reg), d_phi = jax.value_and_grad(meta_loss_fn, has_aux=True)(
            phi, theta0, state0, xb, yb, xo, yo, init_obj, use_scan, reg_key, reg)
        new_phi, new_ms, sq = {}, {}, 0.0
        for k in phi:
            g = jnp.clip(jnp.nan_to_num(d_phi[k], nan=0.0, posinf=META_CLIP,
                                        neginf=-META_CLIP), -META_CLIP, META_CLIP)
            m = META_DECAY * ms[k] + (1.0 - META_DECAY) * g * g
            upd = jnp.where(g == 0.0, 0.0, META_LR * g / jnp.sqrt(m + META_EPS))
            new_phi[k], new_ms[k] = phi[k] - upd, m
            sq = sq + jnp.sum(g * g)
        return new_phi, new_ms, loss, init_obj, jnp.sqrt(sq), mean_reg
    return jax.jit(meta_iteration)


def flops_of(compiled):
    try:
        ca = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001
        return None, f"cost_analysis failed: {e}"
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None, "cost_analysis has no 'flops'"
    return float(ca["flops"]), None


def analytic_flops(unroll):
    """Matmul FLOPs only (2*m*k*n), forward + reverse, for the dominant terms."""
    mm = lambda m, k, n: 2 * m * k * n  # noqa: E731
    mlp_fwd = lambda b: mm(b, 784, 20) + mm(b, 20, 10)  # noqa: E731
    # objective at theta': forward + backward (dW0, dW1, dh) in the VJP
    obj = mlp_fwd(OBJ_EXAMPLES) + mm(784, OBJ_EXAMPLES, 20) + mm(20, OBJ_EXAMPLES, 10) \
        + mm(OBJ_EXAMPLES, 10, 20)
    # minibatch gradient (forward + backward; constant under stop_gradient)
    mb = mlp_fwd(BATCH) + mm(784, BATCH, 20) + mm(20, BATCH, 10) + mm(BATCH, 10, 20)
    n = sum(int(np.prod(s)) for s in PARAM_SHAPES)
    hrnn_fwd = mm(n, NF + S0, 2 * S0) + mm(n, NF + S0, S0) + 4 * mm(n, S0, 1) + mm(n, NS, 1)
    per_step = obj + mb + 3 * hrnn_fwd  # HRNN forward + ~2x for its VJP
    return unroll * per_step + mlp_fwd(OBJ_EXAMPLES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--python-loop", action="store_true",
                    help="unroll with a Python loop inside the jit instead of lax.scan")
    ap.add_argument("--no-unrolled-flops", action="store_true",
                    help="skip compiling the 1- and 2-step Python-loop forms "
                         "(the FLOP count of the whole unroll is extrapolated from them)")
    ap.add_argument("--reg", choices=REG_OPTIONS, default="none",
                    help="Hessian regulariser of the L2O-Entropy fork, at every inner step")
    ap.add_argument("--alpha", type=float, default=1e-4,
                    help="weight of sum_t reg_t in the meta-loss")
    ap.add_argument("--probes", type=int, default=10, help="Hutchinson probes (hessian)")
    ap.add_argument("--power-iters", type=int, default=10,
                    help="power-iteration steps (hessian-ev)")
    ap.add_argument("--lanczos-steps", type=int, default=10, help="Lanczos steps (hessian-esd)")
    args = ap.parse_args()
    reg = None if args.reg == "none" else (
        args.reg, args.alpha, args.probes, args.power_iters, args.lanczos_steps)

    t_load = time.perf_counter()
    x, y = load_mnist_train(args.data)
    t_load = time.perf_counter() - t_load

    rng = np.random.default_rng(args.seed)
    phi = init_phi(args.seed)
    ms = {k: jnp.full(v.shape, META_ACC_INIT, jnp.float32) for k, v in phi.items()}

    reg_key = [jax.random.PRNGKey(args.seed + 1)]

    def sample():
        theta0 = init_theta(rng)
        state0 = init_state(rng)
        xb, yb, xo, yo = sample_data(rng, x, y, args.unroll)
        # One key per meta-iteration; the jitted function splits it per step.
        reg_key[0], k = jax.random.split(reg_key[0])
        return (theta0, state0, jnp.asarray(xb), jnp.asarray(yb),
                jnp.asarray(xo), jnp.asarray(yo), k)

    use_scan = not args.python_loop
    fn = make_meta_iteration(use_scan, reg)
    inputs = sample()
    t0 = time.perf_counter()
    lowered = fn.lower(phi, ms, *inputs)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops, flops_note = flops_of(compiled)

    flops_unrolled, unrolled_note, unrolled_compile_s = None, None, None
    if not args.no_unrolled_flops:
        # XLA's cost analysis counts a while loop's body once, and compiling
        # the 20-step Python-loop form takes many minutes and >16 GB here. So:
        # compile the Python-loop form for 1 and 2 steps; their difference is
        # one step, the rest (initial objective, meta-update) is fixed.
        t1 = time.perf_counter()
        counts = []
        for k in (1, 2):
            th, st, xb, yb, xo, yo, key = inputs
            c2 = make_meta_iteration(False, reg).lower(
                phi, ms, th, st, xb[:k], yb[:k], xo, yo, key).compile()
            counts.append(flops_of(c2)[0])
            del c2
        unrolled_compile_s = time.perf_counter() - t1
        if None not in counts:
            per_step = counts[1] - counts[0]
            flops_unrolled = counts[0] + (args.unroll - 1) * per_step
            unrolled_note = (f"extrapolated: 1-step form {counts[0]:.4g}, 2-step form "
                             f"{counts[1]:.4g}, per step {per_step:.4g}")
        else:
            unrolled_note = "cost_analysis gave no flops"

    # Warm-up run (first execution), not timed.
    out = compiled(phi, ms, *inputs)
    jax.block_until_ready(out)
    phi, ms = out[0], out[1]

    times, times_with_data, meta_losses, init_objs, gnorms, regs = [], [], [], [], [], []
    for _ in range(args.repeats):
        t_data = time.perf_counter()
        inputs = sample()
        jax.block_until_ready(inputs)
        t_run = time.perf_counter()
        out = compiled(phi, ms, *inputs)
        jax.block_until_ready(out)
        t_end = time.perf_counter()
        times.append(t_end - t_run)
        times_with_data.append(t_end - t_data)
        phi, ms = out[0], out[1]
        meta_losses.append(float(out[2]))
        init_objs.append(float(out[3]))
        gnorms.append(float(out[4]))
        regs.append(float(out[5]))

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "implementation": "jax",
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "device": str(jax.devices()[0]),
        "platform": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
        "loop": "lax.scan" if use_scan else "python",
        "unroll": args.unroll,
        "repeats": args.repeats,
        "reg": args.reg,
        "reg_settings": None if reg is None else {
            "alpha": args.alpha, "probes": args.probes, "power_iters": args.power_iters,
            "lanczos_steps": args.lanczos_steps},
        "median_seconds": statistics.median(times),
        "seconds": times,
        "median_seconds_with_data_sampling": statistics.median(times_with_data),
        "compile_seconds": compile_s,
        "flops_cost_analysis": flops,
        "flops_cost_analysis_note": flops_note or (
            "lax.scan: XLA counts the loop body once" if use_scan else None),
        "flops_cost_analysis_unrolled": flops_unrolled,
        "flops_cost_analysis_unrolled_note": unrolled_note,
        "unrolled_compile_seconds": unrolled_compile_s,
        "flops_analytic_matmul": analytic_flops(args.unroll) if reg is None else None,
        "meta_losses": meta_losses,
        "initial_objectives": init_objs,
        "meta_gradient_norms": gnorms,
        "mean_regularizer_per_step": regs if reg is not None else None,
        "peak_rss_mib": rss_kib / 1024.0,
        "mnist_load_seconds": t_load,
        "loadavg": os.getloadavg(),
    }
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
