"""Helpers shared by the benchmark scripts of bench/."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_rss(cmd):
    """Run `cmd`; return (stdout, peak RSS of the process in MB)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(r)
        os.execv(str(cmd[0]), [str(c) for c in cmd])
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed (exit {os.waitstatus_to_exitcode(status)})")
    return b"".join(chunks).decode(), usage.ru_maxrss / 1024


def run_derived(out, feeds, vs, row):
    """Load and run the gradient and HVP graphs that `metac derive` wrote
    into `out` with ONNX Runtime's Python API (CPU): `feeds` are the data
    and parameter values by input name, `vs` the HVP direction by parameter
    name. Records node counts, load and run times in `row`; returns the
    outputs by graph ("grad", "hvp") and output name."""
    import time

    import onnx
    import onnxruntime as ort

    res = {}
    for kind in ["grad", "hvp"]:
        f = Path(out) / f"{kind}.onnx"
        row[f"{kind}_nodes"] = len(onnx.load(str(f)).graph.node)
        t0 = time.perf_counter()
        s = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        row[f"{kind}_load_s"] = time.perf_counter() - t0
        fd = dict(feeds)
        if kind == "hvp":
            fd.update({f"v_{n}": v for n, v in vs.items()})
        wanted = {i.name for i in s.get_inputs()}
        t0 = time.perf_counter()
        o = s.run(None, {k: v for k, v in fd.items() if k in wanted})
        row[f"{kind}_run_s"] = time.perf_counter() - t0
        res[kind] = dict(zip([q.name for q in s.get_outputs()], o))
    return res
