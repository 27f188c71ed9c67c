#!/usr/bin/env bash
# End-to-end validation of the released binary on a GPU machine, as a user would run it:
# self-test, the default `decodebench run` (seed preset, 320 cases), the measurement-method
# checks (hot/cold L2, events/graph, shared/unique pool, telemetry) and the kernel table (graph
# timing). Expects target/release/decodebench; writes logs and CSVs under $OUT.
# Usage: bench/gpu/validate.sh [selftest] [seed] [methods] [table | table-kv table-fp8q] [layouts]
#        [target4] [target3] [verdict]
# (default: selftest seed methods table). table-kv and table-fp8q are the table's two halves (the
# FlashInfer modes, the FP8-query modes), for machines that limit one command to 10 minutes. The
# table and layout steps time the optimized kernel only (what their comparisons need). target4
# runs the four cells of issue 7's target 4 (bench/grids/target4.toml) T4_RUNS times (5), each a
# process of its own with its own calibration, for the spread of the cells with the least margin;
# target3 the same for target 3's short cells (bench/grids/target3.toml, T3_RUNS times, 5),
# then each cell's ratios over the runs (summarize.py repeats). verdict prints issue 7's six
# targets from this call's table and layouts runs (summarize.py targets TABLE LAYOUTS): measured
# on FlashInfer's H100, predicted by the H100 model elsewhere. On an H100, the issue's check is
#   bash bench/gpu/validate.sh selftest table layouts verdict
set -u
RESULT_DIR=${OUT:-/tmp/validate_out}
# Everything is logged under one folder, packed into $OUT/validate.tgz at the end (the device
# tool brings back at most 8 files).
OUT=/tmp/validate_logs
mkdir -p "$OUT" "$RESULT_DIR"
trap 'tar czf "$RESULT_DIR/validate-$(date +%H%M%S).tgz" -C /tmp validate_logs; cp "$OUT"/*.md "$RESULT_DIR"/ 2>/dev/null' EXIT
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DECODEBENCH_CACHE_DIR=${DECODEBENCH_CACHE_DIR:-/tmp/decodebench-cache}
B=target/release/decodebench
S="python3 bench/gpu/summarize.py"
STEPS=${*:-selftest seed methods table}
W=/tmp/validate_runs
rm -rf "$W"; mkdir -p "$W"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader | tee "$OUT/gpu.txt"
# repeat_grid NAME GRID RUNS PATTERN: the grid RUNS times, each a process of its own; prints the
# lines of `summarize.py targets` that match PATTERN for each run and keeps its results.csv.
repeat_grid() {
  echo "=== $1's cells, $3 runs (graph timing)"
  for i in $(seq 1 "$3"); do
    timeout 300 $B run --grid "$2" --kernels optimized --out $W/$1-$i > "$OUT/$1-$i.log" 2>&1
    echo "run $i exit $?: $($S targets $W/$1-$i | grep -E "$4" | tr '\n' ' ')" | tee -a "$OUT/$1.txt"
    cp $W/$1-$i/results.csv "$OUT/$1-${i}_results.csv"
  done
}
for step in $STEPS; do
  case $step in
    selftest)
      echo "=== selftest"
      ( time timeout 300 $B selftest ) > "$OUT/selftest.txt" 2>&1; echo "selftest exit $?"
      grep -cE " ok | PASS" "$OUT/selftest.txt" | sed 's/^/pass lines: /'; grep -E "FAIL|passed|checks" "$OUT/selftest.txt" | tail -5 ;;
    seed)
      echo "=== decodebench run (seed preset)"
      ( time timeout 560 $B run --out $W/seed ) > "$OUT/seed.log" 2>&1; echo "run exit $?"
      grep -E "^real|units done" "$OUT/seed.log"
      $S status $W/seed
      $S checks $W/seed | tee "$OUT/seed_checks.txt"
      cp $W/seed/results.csv "$OUT/seed_results.csv"
      cp $W/seed/decode_attention_benchmark_*.csv "$OUT/" 2>/dev/null
      $B report $W/seed > "$OUT/seed_report.txt" 2>&1; head -4 "$OUT/seed_report.txt" ;;
    methods)
      echo "=== method checks"
      G=bench/grids/method_checks.toml
      timeout 200 $B run --grid $G --out $W/hot > "$OUT/m_hot.log" 2>&1; echo "hot exit $?"
      timeout 200 $B run --grid $G --l2 cold --out $W/cold > "$OUT/m_cold.log" 2>&1; echo "cold exit $?"
      timeout 200 $B run --grid $G --timing graph --out $W/graph > "$OUT/m_graph.log" 2>&1; echo "graph exit $?"
      timeout 200 $B run --grid $G --target-rse 0.005 --max-trials 400 --out $W/rse > "$OUT/m_rse.log" 2>&1; echo "rse exit $?"
      $S checks $W/hot | tee "$OUT/checks.txt"
      echo "--- cold / hot (optimized and baseline, median)"; $S compare $W/hot $W/cold | tee "$OUT/cold_vs_hot.md"
      echo "--- graph / events"; $S compare $W/hot $W/graph | tee "$OUT/graph_vs_events.md"
      $S checks $W/rse | tail -3
      cp $W/hot/results.csv "$OUT/methods_hot.csv" ;;
    table|table-kv|table-fp8q)
      G=${step/-/_}
      echo "=== kernel table $G (graph timing)"
      ( time timeout 560 $B run --grid bench/grids/flashinfer_$G.toml --kernels optimized --out $W/$G ) > "$OUT/$G.log" 2>&1; echo "$G exit $?"
      grep -E "^real|units done" "$OUT/$G.log"
      $S table $W/$G | tee "$OUT/$G.md"
      [ "$G" = table ] && $S targets $W/$G | tee "$OUT/targets.txt"
      $S status $W/$G | head -20
      cp $W/$G/results.csv "$OUT/${G}_results.csv" ;;
    target4) repeat_grid target4 bench/grids/target4.toml "${T4_RUNS:-5}" '^(card|4\.)' ;;
    target3)
      repeat_grid target3 bench/grids/target3.toml "${T3_RUNS:-5}" '^3\.'
      $S repeats $(seq -f "$W/target3-%g" 1 "${T3_RUNS:-5}") | tee -a "$OUT/target3.txt" ;;
    verdict)
      echo "=== issue 7's targets (table and layouts of this call)"
      $S targets $W/table $W/layouts | tee "$OUT/verdict.txt" ;;
    layouts)
      echo "=== layouts and block sizes (graph timing)"
      ( time timeout 560 $B run --grid bench/grids/layouts.toml --kernels optimized --out $W/layouts ) > "$OUT/layouts.log" 2>&1; echo "layouts exit $?"
      grep -E "^real|units done" "$OUT/layouts.log"
      $S layouts $W/layouts | tee "$OUT/layouts.md" | tail -8
      cp $W/layouts/results.csv "$OUT/layouts_results.csv" ;;
  esac
done
