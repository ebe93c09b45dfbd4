#!/usr/bin/env bash
# The runner packed into .gpu/ by scripts/gpu-kit.sh. Usage: run.sh OUTDIR [--sanitize]
# [--bench] [--quick] [--torch]. Needs only an NVIDIA driver (and compute-sanitizer for
# --sanitize, python3 with torch for --torch). Exit status: non-zero if any test or sanitizer
# run failed.
set -uo pipefail
kit=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: run.sh OUTDIR [--sanitize] [--bench] [--criterion] [--quick] [--torch]}
shift
mkdir -p "$out"
sanitize=0 bench=0 criterion=0 quick="" torch=0
for a in "$@"; do
  case $a in
    --sanitize) sanitize=1 ;;
    --bench) bench=1 ;;
    --criterion) criterion=1 ;;
    --quick) quick=--quick ;;
    --torch) torch=1 ;;
    *) echo "unknown option $a"; exit 2 ;;
  esac
done
export FUSEDREG_REQUIRE_GPU=1
export FUSEDREG_BENCH_BIN="$kit/bin/bin-fusedreg-bench"
export FUSEDREG_COMMIT="$(head -1 "$kit/COMMIT")$(sed -n 2p "$kit/COMMIT" | grep -q . && echo -dirty)"
status=0
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

note "commit $(head -1 "$kit/COMMIT") $(sed -n 2p "$kit/COMMIT")"
note "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu /' | tee -a "$summary"

# 1. Every test binary (unit tests, CPU integration tests, GPU tests), GPU required.
for t in "$kit"/bin/test-*; do
  name=$(basename "$t")
  log="$out/$name.log"
  "$t" --test-threads 4 >"$log" 2>&1
  rc=$?
  note "$name: rc=$rc $(grep -E '^test result' "$log" | tail -1)"
  [ $rc -eq 0 ] || status=1
done

# 2. The GPU tests under compute-sanitizer.
if [ $sanitize -eq 1 ]; then
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  # SANITIZE_TOOLS picks a subset; SANITIZE_TIMEOUT (s) bounds each tool's run.
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
    extra=""
    [ $tool = memcheck ] && extra="--leak-check full"
    # The library's GPU tests (test-gpu) and the tools' (test-gpu_tools: the trainer's kernels).
    for t in "$kit"/bin/test-gpu "$kit"/bin/test-gpu_tools; do
      [ -x "$t" ] || continue
      log="$out/sanitize-$tool-$(basename "$t").log"
      timeout "${SANITIZE_TIMEOUT:-1800}" "$cs" --tool $tool $extra --error-exitcode 99 \
        "$t" --test-threads 1 ${SANITIZE_FILTER:-} >"$log" 2>&1
      rc=$?
      note "sanitizer $tool $(basename "$t"): rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1) $(grep -E '^test result' "$log" | tail -1)"
      [ $rc -eq 0 ] || status=1
    done
  done
fi

# 3. Benchmarks: the report (--bench), the example's training run and its stochastic-depth
# benchmark, then the criterion benches (--criterion).
if [ $bench -eq 1 ]; then
  "$kit/bin/bin-fusedreg-bench" $quick --out "$out/report" 2>&1 | tee "$out/report.log"
  if [ -x "$kit/bin/example-train_mlp" ]; then
    "$kit/bin/example-train_mlp" --steps 200 >"$out/train_mlp.log" 2>&1
    "$kit/bin/example-train_mlp" --bench >>"$out/train_mlp.log" 2>&1
    note "train_mlp: rc=$? $(tail -1 "$out/train_mlp.log")"
  fi
fi
if [ $criterion -eq 1 ]; then
  export CRITERION_HOME="$out/criterion"
  for b in "$kit"/bin/bench-*; do
    [ -e "$b" ] || continue
    name=$(basename "$b")
    crit_args="--bench"
    [ -n "$quick" ] && crit_args="--bench --warm-up-time 0.5 --measurement-time 1"
    "$b" $crit_args --noplot >"$out/$name.log" 2>&1
    note "$name: rc=$?"
  done
fi

# 4. The same work through PyTorch, on the same GPU, for comparison.
if [ $torch -eq 1 ] && [ -f "$kit/compare_torch.py" ]; then
  PYTHONUNBUFFERED=1 python3 "$kit/compare_torch.py" $quick --out "$out" 2>&1 | tee "$out/torch.log"
fi

note "overall status $status"
exit $status
