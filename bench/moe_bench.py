#!/usr/bin/env python3
"""metac against PyTorch on the Tiny-ONN workload, side by side on this
machine: time per hyper step and per single-backward step of the reference
MoE LM (configs/moe.toml: width 128, 2 layers, 16 experts of hidden 32, batch
16 x 128 bytes), and each process's peak memory. Prints a markdown table (the
one in docs/benchmarks.md) and writes the raw measurements to
BENCH_TMP/moe-bench.json.

Usage (needs target/release/metac, `cargo build --release -p metac`, the
fortunes corpus, and PyTorch per bench/requirements-torch.txt):

    TORCH_PYTHON=/tmp/venv-torch/bin/python bench/moe_bench.py

Environment: TORCH_PYTHON (default python3), BENCH_TMP (default /tmp),
STEPS (default 60 steps per metac measurement, 20 per PyTorch one).

What each side times:
* metac: `metac run` of the bundle of configs/moe.toml (the hyper step) and
  of the same config with `mode = "joint"` (one backward of the main loss,
  one Adam), STEPS steps in iterations of STEPS/3 without validation; the
  seconds per step of the last two iterations (the first is warm-up), from
  metrics.jsonl. Data come from the host each step (random windows).
* PyTorch: bench/moe_torch.py (its docstring says what it matches), eager and
  with the forward under torch.compile, 2 threads, median step after 5
  warm-up steps.
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
TMP = Path(os.environ.get("BENCH_TMP", "/tmp")) / "moe-bench"
TORCH = os.environ.get("TORCH_PYTHON", "python3")
STEPS = int(os.environ.get("STEPS", "60"))


def metac_step(mode):
    """Seconds per step and peak RSS of `metac run` in `mode`."""
    cfg_text = (ROOT / "configs" / "moe.toml").read_text()
    per = max(STEPS // 3, 1)
    cfg_text = cfg_text.replace('mode = "hyper"', f'mode = "{mode}"')
    cfg_text = cfg_text.replace("steps = 3000", f"steps = {3 * per}")
    cfg_text = cfg_text.replace("steps_per_iteration = 100", f"steps_per_iteration = {per}")
    cfg_text = cfg_text.replace("evaluation_period = 1", "evaluation_period = 0")
    d = TMP / mode
    subprocess.run(["rm", "-rf", str(d)], check=True)
    d.mkdir(parents=True)
    cfg = d / "moe.toml"
    cfg.write_text(cfg_text)
    subprocess.run([METAC, "compile", "moe", "--config", cfg, "--out", d / "bundle"], check=True,
                   stdout=subprocess.DEVNULL)
    _, rss = run_rss([METAC, "run", d / "bundle", "--config", cfg, "--out", d / "run", "--quiet"])
    lines = [json.loads(l) for l in (d / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    secs = [l["seconds"] / l["steps"] for l in lines[1:]]
    return statistics.median(secs), rss


def torch_step(task, compiled):
    extra = ["--compile"] if compiled else []
    out, rss = run_rss([TORCH, ROOT / "bench" / "moe_torch.py", "--task", task, *extra])
    r = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    return r["seconds"], rss, r["torch"]


def main():
    if not METAC.exists():
        sys.exit(f"{METAC} not found: cargo build --release -p metac")
    TMP.mkdir(parents=True, exist_ok=True)
    res = {}
    res["metac_hyper"] = metac_step("hyper")
    res["metac_single"] = metac_step("joint")
    for task in ["hyper", "single"]:
        for compiled in [False, True]:
            res[f"torch_{task}{'_compile' if compiled else ''}"] = torch_step(task, compiled)
    (TMP / "moe-bench.json").write_text(json.dumps(res, indent=2))
    version = res["torch_hyper"][2]
    print(f"| step (batch 16 x 128 bytes) | metac | PyTorch {version} eager | PyTorch torch.compile | eager / metac |")
    print("|---|---|---|---|---|")
    for task, label in [("hyper", "hyper step"), ("single", "single-backward step")]:
        m, mr = res[f"metac_{task}"]
        e, er, _ = res[f"torch_{task}"]
        c, cr, _ = res[f"torch_{task}_compile"]
        print(f"| {label} | {m * 1e3:.1f} ms ({mr:.0f} MB) | {e * 1e3:.1f} ms ({er:.0f} MB) "
              f"| {c * 1e3:.1f} ms ({cr:.0f} MB) | {e / m:.2f}x |")
    mh, ms = res["metac_hyper"][0], res["metac_single"][0]
    th, ts = res["torch_hyper"][0], res["torch_single"][0]
    print(f"\nhyper step / single-backward step: metac {mh / ms:.2f}x, PyTorch eager {th / ts:.2f}x")


if __name__ == "__main__":
    main()
