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
