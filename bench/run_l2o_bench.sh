#!/usr/bin/env bash
# Time one L2O meta-iteration (one 20-step unroll + BPTT + RMSProp meta-update
# of the HierarchicalRNN on the MNIST 784-20-10 MLP) with metac (ONNX Runtime
# and tract backends) and with the JAX reference (bench/l2o_jax.py, jax.jit on
# CPU), on this machine, and print a markdown table.
#
# Usage: bench/run_l2o_bench.sh            (from anywhere; needs
#        target/release/metac, built with `cargo build --release -p metac`,
#        and `pip install -r bench/requirements.txt`)
# Environment: METAC_ITERS (default 3; the first includes session warm-up and
# is dropped), JAX_REPEATS (default 5), UNROLL (default 20), BACKENDS
# (default "ort tract"), BENCH_TMP (default /tmp).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
METAC="$ROOT/target/release/metac"
ITERS="${METAC_ITERS:-3}"
REPEATS="${JAX_REPEATS:-5}"
UNROLL="${UNROLL:-20}"
BACKENDS="${BACKENDS:-ort tract}"
TMP="${BENCH_TMP:-/tmp}"
BUNDLE="$TMP/bench-bundle"
RESULTS="$TMP/bench-l2o-results.jsonl"
: > "$RESULTS"

[ -x "$METAC" ] || { echo "build metac first: cargo build --release -p metac" >&2; exit 1; }

echo "# machine: $(nproc) cores, $(uname -srm)" >&2
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

rm -rf "$BUNDLE"
"$METAC" compile l2o --config configs/seed.toml --out "$BUNDLE" >&2

for backend in $BACKENDS; do
    run="$TMP/bench-run-$backend"
    rm -rf "$run"
    echo "# metac run --backend $backend ($ITERS meta-iterations)" >&2
    start=$(date +%s.%N)
    "$METAC" run "$BUNDLE" --out "$run" --meta-iterations "$ITERS" --num-unrolls 1 \
        --unroll-length "$UNROLL" --evaluation-period 0 --quiet --backend "$backend" >&2
    end=$(date +%s.%N)
    python3 - "$run/metrics.jsonl" "$backend" "$start" "$end" >> "$RESULTS" <<'EOF'
import json, statistics, sys
path, backend, start, end = sys.argv[1:5]
secs = [json.loads(l)["seconds"] for l in open(path) if l.strip()]
rest = secs[1:] if len(secs) > 1 else secs
print(json.dumps({"implementation": f"metac --backend {backend}",
                  "median_seconds": statistics.median(rest),
                  "seconds": secs,
                  "wall_seconds_whole_run": float(end) - float(start)}))
EOF
done

echo "# JAX reference" >&2
python3 bench/l2o_jax.py --unroll "$UNROLL" --repeats "$REPEATS" > "$TMP/bench-jax.json"
python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))' \
    "$TMP/bench-jax.json" >> "$RESULTS"
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$RESULTS" "$UNROLL" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
unroll = sys.argv[2]
jax_row = next(r for r in rows if r["implementation"] == "jax")
ref = jax_row["median_seconds"]
print()
print(f"| implementation | seconds per meta-iteration ({unroll}-step unroll + BPTT + update) | ratio vs JAX |")
print("|---|---|---|")
for r in rows:
    name = r["implementation"]
    if name == "jax":
        name = f"JAX {r['jax_version']} (jax.jit, {r['platform']}, {r['loop']})"
    s = r["median_seconds"]
    print(f"| {name} | {s:.3f} | {s / ref:.2f}x |")
print()
fl = jax_row.get("flops_cost_analysis_unrolled") or jax_row.get("flops_cost_analysis")
if fl:
    print(f"JAX: XLA cost_analysis {fl / 1e9:.1f} GFLOP per meta-iteration "
          f"({fl / 1e9 / ref:.1f} GFLOP/s); matmul-only estimate "
          f"{jax_row['flops_analytic_matmul'] / 1e9:.1f} GFLOP; compile "
          f"{jax_row['compile_seconds']:.1f} s; peak RSS {jax_row['peak_rss_mib']:.0f} MiB.")
for r in rows:
    if r["implementation"] != "jax":
        print(f"{r['implementation']}: per-iteration seconds {[round(s, 3) for s in r['seconds']]} "
              "(median of all but the first).")
print(f"JAX per-repeat seconds {[round(s, 3) for s in jax_row['seconds']]}.")
EOF
