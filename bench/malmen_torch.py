#!/usr/bin/env python3
"""PyTorch reference of metac's language model and MALMEN editor, for a
side-by-side CPU performance benchmark (eager mode, float32, default threads).

Three measurements, each in its own process (so peak memory is its own):

* ``pretrain-epoch``: one epoch of the LM's pretraining, as ``metac run`` on
  an LM bundle (runtime/src/lm/run.rs): the pretraining prompts shuffled,
  ``prompts // batch`` steps of forward, gradient and Adam (PyTorch form,
  lr 2e-3 times the warm-up/cosine multiplier of configs/lm.toml), the loss
  read back every step. Reported: seconds per epoch.
* ``meta-step``: one meta-training step of the editor at ``--meta-edits``
  edits (256), as one batch of runtime/src/editor/run.rs: the locality
  reference (log-probs of the unrelated prompts before editing), the edit
  (cache, running-normaliser update, values, least-squares solve, weights
  shifted), the meta-loss and its gradient with respect to the edited
  weights, back through the solve and the hypernetwork, a clipped Adam step
  on the hypernetwork. Reported: seconds per step.
* ``edit``: editing E facts into the LM (cache, values, solve, shift; no
  normaliser update, no meta-gradient), for each E of ``--edits``.
  Reported: seconds per edit batch.

Each prints one JSON line per measurement: the median over ``--repeats``
timed runs after one untimed warm-up (for ``pretrain-epoch`` the warm-up is
``--warmup-steps`` steps, not a whole epoch), and the process's peak RSS.

What matches metac's graphs (compiler/src/models/transformer.rs, editor.rs):

* GPT: token + position embeddings; per block pre-LN (eps 1e-5) causal
  multi-head attention (fused qkv ``[d, 3d]``, scale ``1/sqrt(d_head)``) and
  an MLP with the exact (erf) GELU; final LN; untied head ``head.w [d, V]``
  without bias. Linear layers are ``x @ W + b`` with ``W [in, out]`` on
  ``[B*T, in]`` rows. The final LN and head run only at the answer position
  of each prompt (``Gpt::logits_at``); the loss is the mean cross-entropy of
  the one answer token.
* Batches: prompts padded with token 0 to the compiled sequence length T =
  the fact world's longest prompt (7 tokens: 0-2 template words, a 1-2 word
  subject, 1-3 template words), ``positions`` the index of each prompt's last
  token. Token ids and lengths (2..T) are random: the cost does not depend
  on them. Weights come from models/lm-facts.safetensors when present.
* Editor (configs/editor.toml): edited layers l2.mlp.proj and l3.mlp.proj
  (both 512 -> 128, so one shared hypernetwork, a row each of scale/shift);
  rank 128, 2 blocks, chunks of 256 edits, 2 equivalent prompts (the
  held-out paraphrases) and 1 unrelated prompt per edit.
  - cache: forward over the edit prompts, ``sum_j nll_j`` differentiated
    with respect to the edited layers' outputs only (no LM parameter
    gradient); the input ``u`` and output adjoint ``delta`` kept at the
    answer positions.
  - normaliser: running mean/variance of ``[u, delta]`` per group, in
    float64 (Chan's parallel update from count 1e-4, mean 0, variance 1);
    std = sqrt(var + 1e-8).
  - values: ``h = ([u, delta] - mean) / std``; per block ``h += scale[l] *
    relu(h A B + bias) + shift[l]`` (A ~ N(0, 1), B = 0); ``d = -lr[l] *
    (u . h[:, :in]) * h[:, in:]``, in chunks of 256.
  - solve: ``S = (U^T U + exp(lamda) I)^{-1} U^T D`` per layer by Cholesky in
    float64 (as metac's host solve with faer; ``--solve-dtype float32``
    for MALMEN's float32), ``W += S``.
  - meta-loss per chunk: ``sum w nll`` over the edit (w = 1/n) and equivalent
    (w = 1/(2n)) prompts with the new answers, plus ``sum w KL(ref || p)``
    over the unrelated prompts (w = 1/n); its gradient with respect to the
    edited weights only.
  - MALMEN's decoupled backward: ``M = (U^T U + lambda I)^{-1} dL/dW``,
    ``dL/dD = U M``, ``dL/dlamda = -lambda <M, S>``; the hypernetwork is run
    again with gradients and ``sum <dL/dD, D>`` backpropagated (as
    MALMEN's ``update_hypernet`` and metac's ``values_vjp``); the global
    gradient norm clipped to 1; Adam (lr 1e-4) on the hypernetwork.

Differences from metac, all on purpose and none changing the arithmetic:
metac's graphs have static shapes, so it pads every chunk to 256 rows (an
edit of 1 fact caches 256 prompts); here chunks are only as long as needed
unless ``--pad-to-chunk``. Attention uses ``F.scaled_dot_product_attention``
with ``is_causal=True`` (metac: explicit matmuls, a -1e9 mask, softmax; the
same values). In ``meta-step`` the LM is reset to its unedited weights
before each step (metac's sequential trajectories keep earlier shifts;
the cost is the same).

Measure on an idle machine: where other processes keep the cores busy,
torch's OpenMP threads wait on each other and a run can be ten times slower
than alone (``--threads 1`` avoids that). ``peak_rss_mb`` includes torch's
own libraries (``startup_rss_mb``, measured before any work).

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install -r bench/requirements-torch.txt
    /tmp/venv-torch/bin/python bench/malmen_torch.py --task all
    /tmp/venv-torch/bin/python bench/malmen_torch.py --task edit --edits 1,16,128,1024,4096
"""

import argparse
import json
import math
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent

# configs/lm.toml (the vocabulary is the reference fact world's, 4,958 words).
LM = dict(vocab=4958, context=16, width=128, layers=4, heads=4, mlp_ratio=4)
LN_EPS = 1e-5
SEQ = 7  # FactWorld::longest_prompt() of the reference world: metac's T
PRETRAIN = dict(
    prompts=165_000,  # FactWorld::pretraining_prompts(): 120,000 + 45,000
    batch=256,
    lr=2e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    epochs=22,
    warmup_epochs=1,
)
# configs/editor.toml
EDITOR = dict(
    layers=["l2.mlp.proj", "l3.mlp.proj"],
    rank=128,
    blocks=2,
    lr_init=3e-3,
    chunk=256,
    unrelated=1,
    equivalents=2,  # the world's held-out paraphrases per fact
    meta_lr=1e-4,
    w_edit=1.0,
    w_equivalent=1.0,
    w_locality=1.0,
    clip=1.0,
)


# ---------------------------------------------------------------- the GPT


def param_shapes(cfg):
    """GptConfig::param_shapes, in order."""
    d, h, v = cfg["width"], cfg["width"] * cfg["mlp_ratio"], cfg["vocab"]
    shapes = [("tok_emb", [v, d]), ("pos_emb", [cfg["context"], d])]
    for l in range(cfg["layers"]):
        for name, shape in [
            ("ln1.g", [d]),
            ("ln1.b", [d]),
            ("attn.qkv.w", [d, 3 * d]),
            ("attn.qkv.b", [3 * d]),
            ("attn.proj.w", [d, d]),
            ("attn.proj.b", [d]),
            ("ln2.g", [d]),
            ("ln2.b", [d]),
            ("mlp.fc.w", [d, h]),
            ("mlp.fc.b", [h]),
            ("mlp.proj.w", [h, d]),
            ("mlp.proj.b", [d]),
        ]:
            shapes.append((f"l{l}.{name}", shape))
    shapes += [("ln_f.g", [d]), ("ln_f.b", [d]), ("head.w", [d, v])]
    return shapes


def init_params(cfg, gen):
    """GPT-2's scheme (Gpt::init_rules): N(0, 0.02^2), the residual
    projections N(0, (0.02 / sqrt(2 layers))^2), biases 0, gains 1."""
    residual = 0.02 / math.sqrt(2 * cfg["layers"])
    p = {}
    for name, shape in param_shapes(cfg):
        if name.endswith(".g"):
            p[name] = torch.ones(shape)
        elif name.endswith(".b"):
            p[name] = torch.zeros(shape)
        else:
            std = residual if name.endswith("proj.w") else 0.02
            p[name] = torch.randn(shape, generator=gen) * std
    return p


def load_safetensors(path):
    """The f32 tensors of a safetensors file, by name."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: '{name}' is {info['dtype']}, not F32")
        start, end = info["data_offsets"]
        buf = bytearray(data[8 + n + start : 8 + n + end])
        out[name] = torch.frombuffer(buf, dtype=torch.float32).reshape(info["shape"])
    return out


def trunk(p, cfg, tokens, taps=None):
    """The residual stream [B*T, d] after the last block of i64 tokens [B, T].

    With ``taps`` (a dict of wanted layer names to None), fills in each wanted
    linear layer's (input, output) ``[B*T, in]``, ``[B*T, out]``; the first
    tapped output becomes a leaf that requires grad, so that autograd can
    differentiate with respect to every tapped output (and nothing below).
    """
    b, t = tokens.shape
    d, nh = cfg["width"], cfg["heads"]
    dh = d // nh

    def linear(x, name):
        y = torch.addmm(p[f"{name}.b"], x, p[f"{name}.w"])
        if taps is not None and name in taps:
            if not y.requires_grad:
                y = y.detach().requires_grad_()
            taps[name] = (x, y)
        return y

    def norm(x, name):
        return F.layer_norm(x, (d,), p[f"{name}.g"], p[f"{name}.b"], LN_EPS)

    x = (p["tok_emb"][tokens] + p["pos_emb"][:t]).reshape(b * t, d)
    for l in range(cfg["layers"]):
        z = linear(norm(x, f"l{l}.ln1"), f"l{l}.attn.qkv")
        q, k, v = z.view(b, t, 3, nh, dh).permute(2, 0, 3, 1, 4)  # [B, H, T, dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b * t, d)
        x = x + linear(y, f"l{l}.attn.proj")
        h = F.gelu(linear(norm(x, f"l{l}.ln2"), f"l{l}.mlp.fc"))  # exact (erf) GELU
        x = x + linear(h, f"l{l}.mlp.proj")
    return x


def rows_at(x, tokens, positions):
    """Rows ``b * T + positions[b]`` of ``x [B*T, k]``: ``[B, k]``."""
    b, t = tokens.shape
    return x.view(b, t, -1)[torch.arange(b), positions]


def readout(p, cfg, rows):
    """Final layer norm and head: ``[N, d]`` -> logits ``[N, V]``."""
    x = F.layer_norm(rows, (cfg["width"],), p["ln_f.g"], p["ln_f.b"], LN_EPS)
    head = p["head.w"] if "head.w" in p else p["tok_emb"].t()
    return x @ head


def logits_at(p, cfg, tokens, positions):
    """Gpt::logits_at: logits [B, V] after each prompt's last token."""
    return readout(p, cfg, rows_at(trunk(p, cfg, tokens), tokens, positions))


# ---------------------------------------------------------------- data


class Prompts:
    """Prompts with one answer token each, as metac's ``answer_batch``:
    ``tokens [N, T]`` (padded with 0), ``positions [N]`` (last index),
    ``answers [N]``."""

    def __init__(self, tokens, positions, answers):
        self.tokens, self.positions, self.answers = tokens, positions, answers

    @staticmethod
    def random(n, vocab, seq, gen, min_len=2):
        lengths = torch.randint(min_len, seq + 1, (n,), generator=gen)
        tokens = torch.randint(1, vocab, (n, seq), generator=gen)
        tokens[torch.arange(seq)[None, :] >= lengths[:, None]] = 0
        answers = torch.randint(1, vocab, (n,), generator=gen)
        return Prompts(tokens, lengths - 1, answers)

    def __len__(self):
        return self.tokens.shape[0]

    def take(self, idx):
        return Prompts(self.tokens[idx], self.positions[idx], self.answers[idx])

    def slice(self, start, end):
        return Prompts(
            self.tokens[start:end], self.positions[start:end], self.answers[start:end]
        )

    def padded(self, rows):
        """Padded to ``rows`` rows with copies of the first (as metac's
        static-shape chunks; their weights are 0)."""
        n = len(self)
        if n >= rows:
            return self
        idx = torch.cat([torch.arange(n), torch.zeros(rows - n, dtype=torch.long)])
        return self.take(idx)

    @staticmethod
    def interleave(groups):
        """Row i of every group, then row i + 1 of every group, ..."""
        def cat(xs):
            return torch.stack(xs, 1).reshape(-1, *xs[0].shape[1:])

        return Prompts(
            cat([g.tokens for g in groups]),
            cat([g.positions for g in groups]),
            cat([g.answers for g in groups]),
        )


def pad_rows(x, rows):
    """``x`` padded with zero rows to ``rows`` rows."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


# ---------------------------------------------------------------- pretraining


def lr_scale(step, total, warmup):
    """LmRunSettings::lr_scale with the cosine schedule."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    x = min((step - warmup) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * x))


def adam_kwargs(impl):
    return {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]


def bench_pretrain(args, cfg, gen):
    params = init_params(cfg, gen)
    for t in params.values():
        t.requires_grad_()
    opt = torch.optim.Adam(
        params.values(),
        lr=PRETRAIN["lr"],
        betas=PRETRAIN["betas"],
        eps=PRETRAIN["eps"],
        **adam_kwargs(args.adam),
    )
    data = Prompts.random(args.prompts, cfg["vocab"], args.seq, gen)
    b = PRETRAIN["batch"]
    steps = len(data) // b
    if args.steps:
        steps = min(steps, args.steps)
    total = steps * PRETRAIN["epochs"]
    warmup = round(PRETRAIN["warmup_epochs"] * steps)

    def run(epoch, n_steps):
        order = torch.randperm(len(data), generator=gen)
        loss_sum = 0.0
        for k in range(n_steps):
            for group in opt.param_groups:
                group["lr"] = PRETRAIN["lr"] * lr_scale(epoch * steps + k, total, warmup)
            batch = data.take(order[k * b : (k + 1) * b])
            logits = logits_at(params, cfg, batch.tokens, batch.positions)
            loss = F.cross_entropy(logits, batch.answers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
        return loss_sum / max(n_steps, 1)

    run(0, min(args.warmup_steps, steps))
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        run(1 + r, steps)
        times.append(time.perf_counter() - t0)
    return times, {"prompts": steps * b, "steps": steps, "batch": b, "seq": args.seq}


# ---------------------------------------------------------------- the editor


class RunningNorm:
    """Running mean and variance in float64 (runtime/src/editor/mod.rs)."""

    def __init__(self, dim):
        self.count = 1e-4
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.var = torch.ones(dim, dtype=torch.float64)

    def update(self, rows):
        x = rows.double()
        n = x.shape[0]
        if n == 0:
            return
        m, v = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = m - self.mean
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + v * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total

    def tensors(self):
        return self.mean.float(), (self.var + 1e-8).sqrt().float()


class Shift:
    """One layer's least-squares shift and its adjoint (solve.rs)."""

    def __init__(self, u, d, lamda, dtype):
        self.u = u.to(dtype)
        self.lam = math.exp(float(lamda))
        a = self.u.t() @ self.u
        a.diagonal().add_(self.lam)
        self.chol = torch.linalg.cholesky(a)
        self.s = torch.cholesky_solve(self.u.t() @ d.to(dtype), self.chol)

    def backward(self, g):
        """``dL/dD`` (f32) and ``dL/dlamda`` for ``g = dL/dS``."""
        m = torch.cholesky_solve(g.to(self.u.dtype), self.chol)
        return (self.u @ m).float(), -self.lam * float((m * self.s).sum())


class Malmen:
    """The MALMEN editor on a GPT's parameters (runtime/src/editor/mod.rs)."""

    def __init__(self, lm, cfg, args, gen):
        self.cfg, self.args = cfg, args
        self.base = {k: v.detach().clone() for k, v in lm.items()}
        self.lm = dict(self.base)
        e = EDITOR
        self.chunk = e["chunk"]
        self.solve_dtype = getattr(torch, args.solve_dtype)
        self.layers = []  # (name, d_in, d_out, group, row)
        self.groups = []  # ((d_in, d_out), [layer indices])
        for name in e["layers"]:
            w = self.base[f"{name}.w"]
            shape = tuple(w.shape)
            k = next((i for i, (s, _) in enumerate(self.groups) if s == shape), None)
            if k is None:
                self.groups.append((shape, []))
                k = len(self.groups) - 1
            self.layers.append((name, shape[0], shape[1], k, len(self.groups[k][1])))
            self.groups[k][1].append(len(self.layers) - 1)
        # Editor::hyper_init_rules
        self.hyper = {}
        for k, ((i, o), members) in enumerate(self.groups):
            d = i + o
            for b in range(e["blocks"]):
                pre = f"hyper.g{k}.b{b}"
                self.hyper[f"{pre}.a"] = torch.randn(d, e["rank"], generator=gen)
                self.hyper[f"{pre}.b"] = torch.zeros(e["rank"], d)
                self.hyper[f"{pre}.bias"] = torch.zeros(d)
                self.hyper[f"{pre}.scale"] = torch.ones(len(members), d)
                self.hyper[f"{pre}.shift"] = torch.zeros(len(members), d)
        self.hyper["hyper.lr"] = torch.full((len(self.layers),), e["lr_init"])
        self.hyper["hyper.lamda"] = torch.zeros(len(self.layers))
        for t in self.hyper.values():
            t.requires_grad_()
        self.opt = torch.optim.Adam(
            self.hyper.values(), lr=e["meta_lr"], **adam_kwargs(args.adam)
        )
        self.norms = [RunningNorm(i + o) for (i, o), _ in self.groups]

    def reset(self):
        self.lm = dict(self.base)

    def chunks(self, n):
        return [(s, min(s + self.chunk, n)) for s in range(0, n, self.chunk)]

    def pad(self, rows):
        return self.chunk * rows if self.args.pad_to_chunk else None

    # -- cache --------------------------------------------------------------

    def cache(self, edits):
        """Per edited layer: keys ``u [n, in]`` and adjoints ``delta [n, out]``
        of ``sum_j nll_j`` at the answer positions (the ``cache`` graph)."""
        names = [l[0] for l in self.layers]
        keys, deltas = [[] for _ in names], [[] for _ in names]
        for s, e in self.chunks(len(edits)):
            m = e - s
            batch = edits.slice(s, e)
            rows = self.pad(1)
            weights = None
            if rows:
                batch = batch.padded(rows)
                weights = pad_rows(torch.ones(m), rows)
            taps = dict.fromkeys(names)
            with torch.enable_grad():
                x = trunk(self.lm, self.cfg, batch.tokens, taps)
                logits = readout(self.lm, self.cfg, rows_at(x, batch.tokens, batch.positions))
                nll = F.cross_entropy(logits, batch.answers, reduction="none")
                loss = (nll * weights).sum() if weights is not None else nll.sum()
                adjoints = torch.autograd.grad(loss, [taps[n][1] for n in names])
            for i, (n, g) in enumerate(zip(names, adjoints)):
                keys[i].append(rows_at(taps[n][0], batch.tokens, batch.positions)[:m].detach())
                deltas[i].append(rows_at(g, batch.tokens, batch.positions)[:m])
        return [torch.cat(k) for k in keys], [torch.cat(d) for d in deltas]

    # -- values ---------------------------------------------------------------

    def values_of(self, li, u, delta, stats):
        """The hypernetwork's values ``d [c, out]`` of layer ``li``'s pairs."""
        name, d_in, d_out, k, row = self.layers[li]
        mean, std = stats[k]
        h = (torch.cat([u, delta], 1) - mean) / std
        for b in range(EDITOR["blocks"]):
            pre = f"hyper.g{k}.b{b}"
            z = torch.relu(h @ self.hyper[f"{pre}.a"] @ self.hyper[f"{pre}.b"] + self.hyper[f"{pre}.bias"])
            h = h + z * self.hyper[f"{pre}.scale"][row] + self.hyper[f"{pre}.shift"][row]
        coef = -(u * h[:, :d_in]).sum(1, keepdim=True) * self.hyper["hyper.lr"][li]
        return coef * h[:, d_in:]

    def values(self, keys, deltas):
        stats = [n.tensors() for n in self.norms]
        out = [[] for _ in self.layers]
        with torch.no_grad():
            for s, e in self.chunks(keys[0].shape[0]):
                for li in range(len(self.layers)):
                    u, dl = keys[li][s:e], deltas[li][s:e]
                    if self.args.pad_to_chunk:
                        u, dl = pad_rows(u, self.chunk), pad_rows(dl, self.chunk)
                    out[li].append(self.values_of(li, u, dl, stats)[: e - s])
        return [torch.cat(v) for v in out]

    # -- edit -----------------------------------------------------------------

    def edit(self, edits, learn):
        """Editor::edit: cache, (normaliser update), values, solve, W += S."""
        keys, deltas = self.cache(edits)
        if learn:
            for li, (_, _, _, k, _) in enumerate(self.layers):
                self.norms[k].update(torch.cat([keys[li], deltas[li]], 1))
        values = self.values(keys, deltas)
        lamda = self.hyper["hyper.lamda"].detach()
        shifts = []
        for li, (name, *_rest) in enumerate(self.layers):
            s = Shift(keys[li], values[li], lamda[li], self.solve_dtype)
            self.lm[f"{name}.w"] = self.lm[f"{name}.w"] + s.s.float()
            shifts.append(s)
        return keys, deltas, shifts

    # -- the locality reference ---------------------------------------------

    def reference(self, unrelated):
        """Log-probs [kl, V] of the current LM after each unrelated prompt,
        per chunk of edits (the ``logp`` graph)."""
        kl = self.chunk * EDITOR["unrelated"]
        out = []
        with torch.no_grad():
            for s, e in self.chunks(len(unrelated) // EDITOR["unrelated"]):
                batch = unrelated.slice(s * EDITOR["unrelated"], e * EDITOR["unrelated"])
                if self.args.pad_to_chunk:
                    batch = batch.padded(kl)
                out.append(F.log_softmax(logits_at(self.lm, self.cfg, batch.tokens, batch.positions), 1))
        return out

    # -- the meta-gradient ----------------------------------------------------

    def meta_backward(self, edits, equivalents, unrelated, applied, reference):
        """Editor::meta_backward: the meta-loss's gradient with respect to the
        edited weights, back through the solve and the hypernetwork; leaves
        the hypernetwork's gradients in ``.grad``; returns the loss."""
        keys, deltas, shifts = applied
        n = len(edits)
        ne, nu = EDITOR["equivalents"], EDITOR["unrelated"]
        w_edit = EDITOR["w_edit"] / n
        w_eq = EDITOR["w_equivalent"] / (n * ne)
        w_loc = EDITOR["w_locality"] / (n * nu)
        names = [l[0] for l in self.layers]
        g_w = [torch.zeros_like(self.lm[f"{nm}.w"]) for nm in names]
        loss_sum = 0.0
        for c, (s, e) in enumerate(self.chunks(n)):
            m = e - s
            groups = [edits.slice(s, e)] + [equivalents.slice(j * n + s, j * n + e) for j in range(ne)]
            ce = Prompts.interleave(groups)
            ce_w = torch.tensor([w_edit] + [w_eq] * ne).repeat(m)
            kl = unrelated.slice(s * nu, e * nu)
            kl_w = torch.full((m * nu,), w_loc)
            ref = reference[c]
            if self.args.pad_to_chunk:
                ce, ce_w = ce.padded(self.chunk * (1 + ne)), pad_rows(ce_w, self.chunk * (1 + ne))
                kl, kl_w = kl.padded(self.chunk * nu), pad_rows(kl_w, self.chunk * nu)
            with torch.enable_grad():
                ws = [self.lm[f"{nm}.w"].detach().requires_grad_() for nm in names]
                p = dict(self.lm)
                p.update({f"{nm}.w": w for nm, w in zip(names, ws)})
                nll = F.cross_entropy(
                    logits_at(p, self.cfg, ce.tokens, ce.positions), ce.answers, reduction="none"
                )
                logp = F.log_softmax(logits_at(p, self.cfg, kl.tokens, kl.positions), 1)
                kl_rows = (ref.exp() * (ref - logp)).sum(1)
                loss = (nll * ce_w).sum() + (kl_rows * kl_w).sum()
                grads = torch.autograd.grad(loss, ws)
            loss_sum += loss.item()
            for acc, g in zip(g_w, grads):
                acc += g
        # Through the solve ...
        dd, dlamda = zip(*(sh.backward(g) for sh, g in zip(shifts, g_w)))
        # ... and the hypernetwork (run again, with gradients).
        self.opt.zero_grad(set_to_none=True)
        self.hyper["hyper.lamda"].grad = torch.tensor(dlamda, dtype=torch.float32)
        stats = [nm.tensors() for nm in self.norms]
        for s, e in self.chunks(n):
            proxy = 0.0
            for li in range(len(self.layers)):
                u, dl, cot = keys[li][s:e], deltas[li][s:e], dd[li][s:e]
                if self.args.pad_to_chunk:
                    u, dl, cot = (pad_rows(x, self.chunk) for x in (u, dl, cot))
                proxy = proxy + (cot * self.values_of(li, u, dl, stats)).sum()
            proxy.backward()
        return loss_sum

    def update(self):
        """Editor::update: clip the global gradient norm, Adam."""
        norm = torch.nn.utils.clip_grad_norm_(list(self.hyper.values()), EDITOR["clip"])
        self.opt.step()
        return float(norm)

    def meta_step(self, edits, equivalents, unrelated):
        """One batch of EditorWorkload::iteration."""
        reference = self.reference(unrelated)
        applied = self.edit(edits, learn=True)
        loss = self.meta_backward(edits, equivalents, unrelated, applied, reference)
        self.update()
        return loss


def edit_requests(n, cfg, seq, gen):
    """Random stand-ins for ``n`` EditRequests: the edit prompts, the
    equivalent prompts (paraphrase j of every edit, then j + 1), the
    unrelated prompts (those of edit i together)."""
    v = cfg["vocab"]
    edits = Prompts.random(n, v, seq, gen)
    equivalents = Prompts.random(n * EDITOR["equivalents"], v, seq, gen)
    unrelated = Prompts.random(n * EDITOR["unrelated"], v, seq, gen)
    return edits, equivalents, unrelated


def lm_params(args, cfg, gen):
    path = Path(args.weights)
    if path.exists():
        w = load_safetensors(path)
        return {name: w[name].clone() for name, _ in param_shapes(cfg)}
    print(f"{path} not found: random LM weights", file=sys.stderr)
    return init_params(cfg, gen)


def bench_meta_step(args, cfg, gen):
    editor = Malmen(lm_params(args, cfg, gen), cfg, args, gen)
    n = args.meta_edits
    batches = [edit_requests(n, cfg, args.seq, gen) for _ in range(1 + args.repeats)]
    times = []
    for r, batch in enumerate(batches):
        editor.reset()
        t0 = time.perf_counter()
        editor.meta_step(*batch)
        if r > 0:  # the first is the warm-up
            times.append(time.perf_counter() - t0)
    return times, {"edits": n, "seq": args.seq}


def bench_edit(args, cfg, gen, n):
    editor = Malmen(lm_params(args, cfg, gen), cfg, args, gen)
    batches = [edit_requests(n, cfg, args.seq, gen)[0] for _ in range(1 + args.repeats)]
    times = []
    for r, edits in enumerate(batches):
        editor.reset()
        with torch.no_grad():
            t0 = time.perf_counter()
            editor.edit(edits, learn=False)
            if r > 0:
                times.append(time.perf_counter() - t0)
    return times, {"edits": n, "seq": args.seq}


# ---------------------------------------------------------------- driver


def measure(args):
    """One measurement, in this process; prints its JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = dict(LM)
    if Path(args.weights).exists():
        cfg["vocab"] = load_safetensors(args.weights)["tok_emb"].shape[0]
    if args.vocab:
        cfg["vocab"] = args.vocab
    if args.task == "pretrain-epoch":
        times, extra = bench_pretrain(args, cfg, gen)
        edits = None
    elif args.task == "meta-step":
        times, extra = bench_meta_step(args, cfg, gen)
        edits = args.meta_edits
    else:
        (edits,) = parse_edits(args.edits)
        times, extra = bench_edit(args, cfg, gen, edits)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    line = {
        "task": args.task,
        "edits": edits,
        "seconds": statistics.median(times),
        "peak_rss_mb": round(peak, 1),
        "startup_rss_mb": round(start_rss, 1),  # torch imported, nothing run
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": len(times),
        "all_seconds": [round(t, 4) for t in times],
        "vocab": cfg["vocab"],
        "pad_to_chunk": args.pad_to_chunk,
        "solve_dtype": args.solve_dtype,
    }
    line.update(extra)
    print(json.dumps(line), flush=True)


def parse_edits(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="all", choices=["all", "pretrain-epoch", "meta-step", "edit"])
    ap.add_argument("--edits", default="1024", help="edit batch sizes of `edit`, e.g. 1,16,128,1024,4096")
    ap.add_argument("--meta-edits", type=int, default=256, help="edits per `meta-step`")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    ap.add_argument("--warmup-steps", type=int, default=10, help="untimed steps before `pretrain-epoch`")
    ap.add_argument("--prompts", type=int, default=PRETRAIN["prompts"], help="pretraining prompts per epoch")
    ap.add_argument("--steps", type=int, default=0, help="cap on steps per epoch (0: the whole epoch)")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens per prompt row (metac's compiled T)")
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary (default: from --weights, else 4958)")
    ap.add_argument("--weights", default=str(REPO / "models" / "lm-facts.safetensors"))
    ap.add_argument("--pad-to-chunk", action="store_true", help="pad every chunk to 256 rows, as metac's static shapes")
    ap.add_argument("--solve-dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--adam", default="default", choices=["default", "foreach", "fused"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-process", action="store_true", help="measure here, not in a child process")
    args = ap.parse_args()
    if args.seq > LM["context"]:
        ap.error(f"--seq {args.seq} exceeds the context {LM['context']}")

    if args.in_process:
        measure(args)
        return
    tasks = ["pretrain-epoch", "meta-step", "edit"] if args.task == "all" else [args.task]
    runs = []
    for task in tasks:
        if task == "edit":
            runs += [(task, str(e)) for e in parse_edits(args.edits)]
        else:
            runs.append((task, args.edits))
    passthrough = sys.argv[1:]
    failed = 0
    for task, edits in runs:
        cmd = [sys.executable, __file__, *passthrough, "--task", task, "--edits", edits, "--in-process"]
        failed += subprocess.run(cmd).returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
