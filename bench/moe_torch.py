#!/usr/bin/env python3
"""The PyTorch reference of metac's Tiny-ONN workload (configs/moe.toml), for
bench/moe_bench.py: the same byte-level GPT with mixtures of SwiGLU experts
and the same two steps, timed on the CPU with 2 threads.

Model (as compiler/src/models/transformer.rs and models/moe.rs): token and
position embeddings; pre-LN blocks of causal multi-head attention (qkv and
output projections with biases) and a mixture of E SwiGLU experts of hidden H
(w1, w3 [d, E H], w2 [E H, d], no biases) with a router (linear with bias);
final layer norm; untied head without bias. A token takes experts in
decreasing router probability until those before reach the budget, with
min_k..max_k of them; gates are the probabilities renormalised over the
active experts; all experts are evaluated.

Steps:
* hyper: forward; autograd.grad of the main loss for every non-router
  parameter, the blocks' output gradients captured by an identity autograd
  Function (the seed's hook); surprise ||J_e^T dL/dy|| of every
  expert and token; router loss (cross-entropy to the least-surprised
  expert) from logits of the detached block input, its gradient for the
  routers; an AdamW (weight decay 0) for each part.
* single: one backward of the main loss, one AdamW over all parameters.
* --compile: the model's forward under torch.compile (the rest eager).

Prints one JSON line per task: median seconds per step over --steps steps
after --warmup, and the peak RSS (MB).
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn.functional as F


class Tap(torch.autograd.Function):
    """Identity whose backward keeps the gradient of its output (the
    seed's capture of dL/dy, usable under torch.compile where the block
    outputs are not graph outputs)."""

    @staticmethod
    def forward(ctx, y, box):
        ctx.box = box
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        ctx.box.append(g)
        return g, None


class Moe(torch.nn.Module):
    def __init__(self, d, e, h, budget, min_k, max_k):
        super().__init__()
        self.e, self.h, self.budget, self.min_k, self.max_k = e, h, budget, min_k, max_k
        self.router = torch.nn.Linear(d, e)
        self.w1 = torch.nn.Parameter(torch.randn(d, e * h) * 0.02)
        self.w3 = torch.nn.Parameter(torch.randn(d, e * h) * 0.02)
        self.w2 = torch.nn.Parameter(torch.randn(e * h, d) * 0.02)
        self.box = None

    def select(self, p):
        # rank and mass before each expert in decreasing probability (stable
        # order: ties by index), as metac's comparison matrix computes them.
        sp, idx = torch.sort(p, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sp, -1) - sp
        rank = torch.arange(self.e, device=p.device).expand_as(sp)
        take = (rank < self.max_k) & ((before < self.budget) | (self.budget >= 1.0))
        take = take | (rank < self.min_k)
        active = torch.zeros_like(p).scatter(-1, idx, take.to(p.dtype))
        return active

    def forward(self, x):
        n = x.shape[0]
        logits = self.router(x)
        p = torch.softmax(logits, -1)
        active = self.select(p.detach())
        kept = p * active
        gates = kept / kept.sum(-1, keepdim=True)
        p1 = x @ self.w1
        p3 = x @ self.w3
        a = F.silu(p1) * p3
        a = (a.view(n, self.e, self.h) * gates.unsqueeze(-1)).view(n, self.e * self.h)
        y = a @ self.w2
        if self.box is not None:
            y = Tap.apply(y, self.box)
        return y, dict(x=x, logits=logits, active=active, p1=p1, p3=p3, y=y)


class Block(torch.nn.Module):
    def __init__(self, d, heads, moe):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.heads = heads
        self.moe = moe

    def forward(self, x, b, t):
        d = x.shape[-1]
        h = self.ln1(x)
        q, k, v = self.qkv(h).split(d, -1)
        sh = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b * t, d))
        m, rec = self.moe(self.ln2(x))
        return x + m, rec


class Gpt(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["width"]
        self.tok = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Embedding(c["context"], d)
        m = c["moe"]
        self.blocks = torch.nn.ModuleList(
            Block(d, c["heads"], Moe(d, m["experts"], m["hidden"], m["budget"], m["min_k"], m["max_k"]))
            for _ in range(c["layers"])
        )
        self.ln_f = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 256, bias=False)

    def forward(self, tokens, targets):
        b, t = tokens.shape
        x = (self.tok(tokens) + self.pos.weight[:t]).view(b * t, -1)
        recs = []
        for blk in self.blocks:
            x, rec = blk(x, b, t)
            recs.append(rec)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits, targets.reshape(-1)), recs


def surprise(moe, rec, g):
    """||J_e^T g|| per token and expert, [N, E] (no graph)."""
    n, e, h = g.shape[0], moe.e, moe.h
    u = g @ moe.w2.t()
    s = torch.sigmoid(rec["p1"])
    dp1 = u * rec["p3"] * s * (1 + rec["p1"] * (1 - s))
    dp3 = u * rec["p1"] * s
    d = g.shape[1]
    w1 = moe.w1.view(d, e, h).permute(1, 2, 0)
    w3 = moe.w3.view(d, e, h).permute(1, 2, 0)
    per = lambda z: z.view(n, e, h).transpose(0, 1)
    dx = torch.bmm(per(dp1), w1) + torch.bmm(per(dp3), w3)
    return dx.norm(dim=-1).t()


def hyper_step(model, opt_main, opt_router, main_params, router_params, tokens, targets, blocks, boxes):
    for b in boxes:
        b.clear()
    loss, recs = model(tokens, targets)
    grads = torch.autograd.grad(loss, main_params)
    for p, g in zip(main_params, grads):
        p.grad = g
    opt_main.step()
    with torch.no_grad():
        sur = [surprise(blk.moe, r, box[0]) for blk, r, box in zip(blocks, recs, boxes)]
    rl = 0.0
    for blk, r, s in zip(blocks, recs, sur):
        logits = blk.moe.router(r["x"].detach())
        target = s.argmin(-1)
        rl = rl + F.cross_entropy(logits, target)
    rgrads = torch.autograd.grad(rl, router_params)
    for p, g in zip(router_params, rgrads):
        p.grad = g
    opt_router.step()
    return loss.item()


def single_step(model, opt, tokens, targets):
    opt.zero_grad(set_to_none=True)
    loss, _ = model(tokens, targets)
    loss.backward()
    opt.step()
    return loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["hyper", "single"], required=True)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = dict(context=128, width=128, layers=2, heads=4,
             moe=dict(experts=16, hidden=32, budget=0.5, min_k=1, max_k=8))
    model = Gpt(c)
    fwd = torch.compile(model) if args.compile else model
    router_params = [p for n, p in model.named_parameters() if ".router." in n]
    main_params = [p for n, p in model.named_parameters() if ".router." not in n]
    b, t = 16, 128
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 256, (b, t + 1), generator=gen) for _ in range(8)]
    if args.task == "hyper":
        om = torch.optim.AdamW(main_params, lr=2e-3, weight_decay=0.0)
        orr = torch.optim.AdamW(router_params, lr=2e-3, weight_decay=0.0)
        boxes = []
        for blk in model.blocks:
            blk.moe.box = []
            boxes.append(blk.moe.box)
        step = lambda x, y: hyper_step(fwd, om, orr, main_params, router_params, x, y,
                                       model.blocks, boxes)
    else:
        o = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        step = lambda x, y: single_step(fwd, o, x, y)
    times = []
    for i in range(args.warmup + args.steps):
        batch = data[i % len(data)]
        t0 = time.perf_counter()
        loss = step(batch[:, :-1], batch[:, 1:])
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        assert math.isfinite(loss)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(task=args.task, compile=args.compile, seconds=statistics.median(times),
                          steps=args.steps, peak_rss_mb=rss, torch=torch.__version__,
                          threads=torch.get_num_threads())))


if __name__ == "__main__":
    main()
