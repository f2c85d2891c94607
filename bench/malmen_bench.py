#!/usr/bin/env python3
"""metac against PyTorch eager on the editing workload, side by side on this
machine: one pretraining epoch of the reference LM (configs/lm.toml), one
editor meta-training step at 256 edits (configs/editor.toml), and the edit
pass (cache, values, solve, apply) at 1 to 4,096 edits, with each process's
peak memory. Prints a markdown table (the one in docs/benchmarks.md) and
writes the raw measurements to BENCH_TMP/malmen-bench.json.

Usage (from anywhere; needs target/release/metac, built with
`cargo build --release -p metac`, and PyTorch per bench/requirements-torch.txt):

    TORCH_PYTHON=/tmp/venv-torch/bin/python bench/malmen_bench.py

Environment: TORCH_PYTHON (default python3), BENCH_TMP (default /tmp),
EDITS (default 1,16,128,1024,4096), REPEATS (default 3), SKIP_EPOCH=1 to
leave out the pretraining epoch (about a minute and a half for each side).

What each side times:
* metac, epoch: `metac run` of an LM bundle for one epoch without
  validation; the epoch's wall time from metrics.jsonl.
* metac, meta-step: `metac run` of an editor bundle with trajectories of one
  batch of 256 edits and no validation; a trajectory is then exactly one
  step (locality reference, edit, meta-loss and its gradient, back through
  the solve and the hypernetwork, Adam). Median over REPEATS after the
  first (warm-up) trajectory.
* metac, edit: `metac edit` of E facts; the edit's own time from edit.json
  (the process also measures ES/GS/LS before and after, which the peak
  memory includes). Median over REPEATS processes.
* PyTorch: bench/malmen_torch.py, one process per task (its docstring says
  what it matches).
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import run_rss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METAC = ROOT / "target" / "release" / "metac"
TMP = Path(os.environ.get("BENCH_TMP", "/tmp")) / "malmen-bench"
TORCH = os.environ.get("TORCH_PYTHON", "python3")
EDITS = [int(x) for x in os.environ.get("EDITS", "1,16,128,1024,4096").split(",")]
REPEATS = int(os.environ.get("REPEATS", "3"))


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def torch(task, *extra):
    out, _ = run_rss([TORCH, ROOT / "bench" / "malmen_torch.py", "--task", task, "--repeats", REPEATS, *extra])
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def main():
    if not METAC.is_file():
        sys.exit("build metac first: cargo build --release -p metac")
    TMP.mkdir(parents=True, exist_ok=True)
    res = {"machine": f"{os.cpu_count()} cores", "load": open("/proc/loadavg").read().split()[:3]}
    print(f"# {res['machine']}, load {' '.join(res['load'])}", file=sys.stderr)

    # The pretraining epoch.
    if os.environ.get("SKIP_EPOCH") != "1":
        run_rss([METAC, "compile", "lm", "--config", "configs/lm.toml", "--out", TMP / "lm"])
        d = TMP / "lm-run"
        subprocess.run(["rm", "-rf", str(d)], check=True)
        _, rss = run_rss([METAC, "run", TMP / "lm", "--config", "configs/lm.toml", "--out", d,
                          "--epochs", "1", "--evaluation-period", "0", "--quiet"])
        res["metac_epoch"] = {"seconds": metrics(d)[0]["seconds"], "peak_rss_mb": rss}
        res["torch_epoch"] = torch("pretrain-epoch")[0]
        print(f"# epoch: metac {res['metac_epoch']}, torch {res['torch_epoch']}", file=sys.stderr)

    # One meta-training step at 256 edits: trajectories of one batch.
    cfg = (ROOT / "configs" / "editor.toml").read_text()
    cfg = cfg.replace("batches = 20 ", "batches = 1 ").replace("edits = 100", "edits = 256")
    cfg = cfg.replace("evaluation_period = 1", "evaluation_period = 0")
    assert "batches = 1 " in cfg and "edits = 256" in cfg
    (TMP / "editor.toml").write_text(cfg)
    run_rss([METAC, "compile", "editor", "--config", TMP / "editor.toml", "--out", TMP / "editor"])
    d = TMP / "editor-run"
    subprocess.run(["rm", "-rf", str(d)], check=True)
    _, rss = run_rss([METAC, "run", TMP / "editor", "--config", TMP / "editor.toml", "--out", d,
                      "--trajectories", str(REPEATS + 1), "--quiet"])
    steps = [m["seconds"] for m in metrics(d)[1:]]
    res["metac_meta_step"] = {"seconds": statistics.median(steps), "peak_rss_mb": rss}
    res["torch_meta_step"] = torch("meta-step", "--meta-edits", "256")[0]
    print(f"# meta-step: metac {res['metac_meta_step']}, torch {res['torch_meta_step']}", file=sys.stderr)

    # The edit pass at each size.
    res["metac_edit"], res["torch_edit"] = {}, {}
    for n in EDITS:
        facts = TMP / f"facts-{n}.jsonl"
        run_rss([METAC, "facts", "--config", "configs/lm.toml", "--edits", n, "--out", facts])
        secs, peaks = [], []
        for _ in range(REPEATS):
            out = TMP / f"edited-{n}"
            _, rss = run_rss([METAC, "edit", d, "--facts", facts, "--weights", "final", "--out", out])
            secs.append(json.loads((out / "edit.json").read_text())["seconds"])
            peaks.append(rss)
        res["metac_edit"][n] = {"seconds": statistics.median(secs), "peak_rss_mb": max(peaks)}
    for r in torch("edit", "--edits", ",".join(map(str, EDITS))):
        res["torch_edit"][r["edits"]] = r
    (TMP / "malmen-bench.json").write_text(json.dumps(res, indent=1))

    def row(what, m, t):
        ratio = t["seconds"] / m["seconds"]
        return (f"| {what} | {m['seconds']:.3f} | {t['seconds']:.3f} | {ratio:.2f}x | "
                f"{m['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} |")

    print("| measurement | metac s | PyTorch s | PyTorch / metac | metac peak MB | PyTorch peak MB |")
    print("|---|---:|---:|---:|---:|---:|")
    if "metac_epoch" in res:
        print(row("pretraining epoch (644 steps of 256)", res["metac_epoch"], res["torch_epoch"]))
    print(row("editor meta-training step, 256 edits", res["metac_meta_step"], res["torch_meta_step"]))
    for n in EDITS:
        print(row(f"edit (cache + values + solve + apply), {n} edits", res["metac_edit"][n], res["torch_edit"][n]))


if __name__ == "__main__":
    main()
