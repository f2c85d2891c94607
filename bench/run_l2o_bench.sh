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
# (default "ort tract"; "ort-unfused" is ONNX Runtime without metac's fused
# elementwise kernel, `--unfused`), BENCH_TMP (default /tmp).
# REG (default none): a Hessian regulariser (hessian, hessian-ev, hessian-esd,
# jacob; weight 1e-4, 10 probes / power iterations / Lanczos steps) at every
# inner step. With REG set, metac is timed by
#   metac bench l2o --config configs/hessian.toml --reg-option $REG \
#       --backends <BACKENDS, comma-separated> --repeats $METAC_ITERS
# (one warm-up meta-iteration, then the median of METAC_ITERS) instead of
# `metac run` on the seed config, and JAX by bench/l2o_jax.py --reg $REG
# (without the 1-/2-step Python-loop FLOP count, which the regulariser's
# nested HVPs make slow to compile). The meta-optimizer settings differ
# (hessian.toml vs seed.toml); they do not change the work per iteration.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
METAC="$ROOT/target/release/metac"
ITERS="${METAC_ITERS:-3}"
REPEATS="${JAX_REPEATS:-5}"
UNROLL="${UNROLL:-20}"
BACKENDS="${BACKENDS:-ort tract}"
TMP="${BENCH_TMP:-/tmp}"
REG="${REG:-none}"
case "$REG" in
    none|hessian|hessian-ev|hessian-esd|jacob) ;;
    *) echo "REG must be none, hessian, hessian-ev, hessian-esd or jacob" >&2; exit 1 ;;
esac
BUNDLE="$TMP/bench-bundle"
RESULTS="$TMP/bench-l2o-results.jsonl"
: > "$RESULTS"

[ -x "$METAC" ] || { echo "build metac first: cargo build --release -p metac" >&2; exit 1; }

echo "# machine: $(nproc) cores, $(uname -srm)" >&2
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

if [ "$REG" = none ]; then
    rm -rf "$BUNDLE"
    "$METAC" compile l2o --config configs/seed.toml --out "$BUNDLE" >&2

    for backend in $BACKENDS; do
        run="$TMP/bench-run-$backend"
        rm -rf "$run"
        echo "# metac run --backend $backend ($ITERS meta-iterations)" >&2
        start=$(date +%s.%N)
        case "$backend" in
            ort-unfused) engine=(--backend ort --unfused) ;;
            *) engine=(--backend "$backend") ;;
        esac
        "$METAC" run "$BUNDLE" --out "$run" --meta-iterations "$ITERS" --num-unrolls 1 \
            --unroll-length "$UNROLL" --evaluation-period 0 --quiet "${engine[@]}" >&2
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
else
    # metac bench l2o prints a markdown table; take its "meta-iteration (s)"
    # column, one row per backend.
    echo "# metac bench l2o --reg-option $REG (backends: $BACKENDS)" >&2
    "$METAC" bench l2o --config configs/hessian.toml --reg-option "$REG" \
        --backends "$(echo $BACKENDS | tr ' ' ',')" --repeats "$ITERS" \
        --unroll-length "$UNROLL" > "$TMP/bench-metac-reg.md"
    cat "$TMP/bench-metac-reg.md" >&2
    python3 - "$TMP/bench-metac-reg.md" "$REG" >> "$RESULTS" <<'EOF'
import json, sys
path, reg = sys.argv[1:3]
rows = [l for l in open(path) if l.startswith("|")]
head = [c.strip() for c in rows[0].strip().strip("|").split("|")]
col = head.index("meta-iteration (s)")
for l in rows[2:]:
    cells = [c.strip() for c in l.strip().strip("|").split("|")]
    print(json.dumps({"implementation": f"metac --backend {cells[0]} (reg {reg})",
                      "median_seconds": float(cells[col]), "seconds": None}))
EOF
fi

echo "# JAX reference" >&2
JAX_ARGS=(--unroll "$UNROLL" --repeats "$REPEATS")
[ "$REG" = none ] || JAX_ARGS+=(--reg "$REG" --no-unrolled-flops)
python3 bench/l2o_jax.py "${JAX_ARGS[@]}" > "$TMP/bench-jax.json"
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
        name = f"JAX {r['jax_version']} (jax.jit, {r['platform']}, {r['loop']}, reg {r.get('reg', 'none')})"
    s = r["median_seconds"]
    print(f"| {name} | {s:.3f} | {s / ref:.2f}x |")
print()
fl = jax_row.get("flops_cost_analysis_unrolled") or jax_row.get("flops_cost_analysis")
if jax_row.get("reg", "none") != "none":
    fl = None  # no unrolled FLOP count and no analytic estimate with a regulariser
if fl:
    print(f"JAX: XLA cost_analysis {fl / 1e9:.1f} GFLOP per meta-iteration "
          f"({fl / 1e9 / ref:.1f} GFLOP/s); matmul-only estimate "
          f"{jax_row['flops_analytic_matmul'] / 1e9:.1f} GFLOP; compile "
          f"{jax_row['compile_seconds']:.1f} s; peak RSS {jax_row['peak_rss_mib']:.0f} MiB.")
else:
    print(f"JAX: compile {jax_row['compile_seconds']:.1f} s; peak RSS "
          f"{jax_row['peak_rss_mib']:.0f} MiB.")
for r in rows:
    if r["implementation"] != "jax" and r["seconds"]:
        print(f"{r['implementation']}: per-iteration seconds {[round(s, 3) for s in r['seconds']]} "
              "(median of all but the first).")
print(f"JAX per-repeat seconds {[round(s, 3) for s in jax_row['seconds']]}.")
EOF
