#!/usr/bin/env bash
# The GPU sweep's runner, packed as .gpu-sweep/run.sh by scripts/gpu-sweep.sh. Usage:
#   run.sh OUTDIR
# Needs an NVIDIA driver, compute-sanitizer (step 2) and the image's python3 with torch (steps
# 4-5). Each step has a time cap so the whole call ends within ~10 minutes (a device call may run
# 600 s): SWEEP_SUITE_S (200, each suite), SWEEP_SANITIZE_S (200, shared by the four tools),
# SWEEP_REPORT_S (90), SWEEP_TORCH_S (90); expected ~8 minutes in all. A step cut by its cap says so in summary.txt. OUTDIR gets at most
# three files (what a device call brings back best): summary.txt, predictions.md, sweep.tgz.
# Exit status: non-zero when a test or sanitizer run failed.
set -uo pipefail
kit=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: run.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/sweep.XXXXXX)
export FUSEDREG_REQUIRE_GPU=1
export FUSEDREG_BENCH_BIN="$kit/bin/bin-fusedreg-bench"
export FUSEDREG_COMMIT="$(head -1 "$kit/COMMIT")$(sed -n 2p "$kit/COMMIT" | grep -q . && echo -dirty)"
status=0
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
capped() {  # capped SECONDS LOG CMD...: runs CMD with a time cap, output to LOG; prints rc
  local s=$1 log=$2
  shift 2
  timeout --kill-after=10 "$s" "$@" >"$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "CUT AFTER ${s}s" >>"$log"
  return $rc
}
t0=$(date +%s)
elapsed() { echo $(($(date +%s) - t0)); }

note "sweep of commit $(head -1 "$kit/COMMIT") $(sed -n 2p "$kit/COMMIT")"
note "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu /' | tee -a "$summary"

# 1. The GPU suites of both crates, GPU required (a missing device fails them).
for t in test-gpu test-gpu_tools; do
  capped "${SWEEP_SUITE_S:-200}" "$work/$t.log" "$kit/bin/$t" --test-threads 4
  rc=$?
  note "1 $t: rc=$rc $(grep -E '^test result' "$work/$t.log" | tail -1) ($(elapsed) s)"
  [ $rc -eq 0 ] || status=1
done

# 2. compute-sanitizer over the test groups changed since the last clean run (SANITIZE_GROUPS,
# computed when the kit was built): every other trial is skipped by its exact name.
groups=$(cat "$kit/SANITIZE_GROUPS")
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ "$groups" = none ]; then
  note "2 sanitizer: no test group changed since $(cat "$kit/SANITIZE_BASE")"
elif [ ! -x "$cs" ]; then
  note "2 sanitizer: compute-sanitizer not found"
  status=1
else
  skips=()
  if [ "$groups" != all ]; then
    while read -r name; do
      g=${name%%::*}
      case " $groups " in *" $g "*) ;; *) skips+=(--skip "$name") ;; esac
    done < <("$kit/bin/test-gpu" --list 2>/dev/null | sed -n 's/: test$//p')
  fi
  per=$(( ${SWEEP_SANITIZE_S:-200} / 4 ))
  for tool in memcheck racecheck initcheck synccheck; do
    extra=()
    [ $tool = memcheck ] && extra=(--leak-check full)
    capped "$per" "$work/sanitize-$tool.log" "$cs" --tool $tool "${extra[@]}" --error-exitcode 99 \
      "$kit/bin/test-gpu" --test-threads 1 --exact "${skips[@]}"
    rc=$?
    note "2 sanitizer $tool [$groups]: rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$work/sanitize-$tool.log" | tail -1) $(grep -E '^test result' "$work/sanitize-$tool.log" | tail -1) ($(elapsed) s)"
    # A cap cut (124) is reported, not failed: the tests it reached ran clean or said otherwise.
    [ $rc -eq 0 ] || [ $rc -eq 124 ] || status=1
  done
fi

# 3. The report, --quick, random inputs; its budget table sets each static prediction beside the
# %copy measured here.
capped "${SWEEP_REPORT_S:-90}" "$work/report.log" "$kit/bin/bin-fusedreg-bench" --quick --out "$work/report"
note "3 report: rc=$? ($(elapsed) s)"

# 4. The same work through PyTorch (eager, torch.compile, Liger-Kernel where it imports).
if ls "$kit"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sweep-site "$kit"/whl/*.whl >"$work/pip.log" 2>&1 &&
    export PYTHONPATH=/tmp/sweep-site${PYTHONPATH:+:$PYTHONPATH}
fi
PYTHONUNBUFFERED=1 capped "${SWEEP_TORCH_S:-90}" "$work/torch.log" python3 "$kit/compare_torch.py" --quick --out "$work/report"
note "4 compare_torch: rc=$? liger=$(python3 -c 'import liger_kernel' 2>/dev/null && echo yes || echo no) ($(elapsed) s)"

# 5. Prediction vs measurement, from the report's budget lines.
python3 - "$work/report/report.json" >"$out/predictions.md" <<'EOF' || note "5 predictions: report.json missing"
import json, sys
r = json.load(open(sys.argv[1]))
dev = (r.get("device") or {}).get("name", "?")
key = "predicted_h200" if "H200" in dev else "predicted_h100"
print(f"Predictions vs this run: {dev}, commit {r['commit']}, {r['date_utc']} (report --quick, random inputs)\n")
print("| kernel | instr/elem | predicted %copy | measured %copy | measured / ceiling |")
print("| --- | --- | --- | --- | --- |")
pct = lambda f: f"{100 * f:.0f}%"
for l in r.get("budget", []):
    lo, hi = l[key]
    here = [m["frac_copy"] for m in l["measured"] if m["source"] == "this run"]
    meas = pct(here[0]) if here else "not timed here"
    # The issue-bound ceiling is the predicted band over 0.63 (uncapped where below 100%).
    ratio = f"{here[0] / (lo / 0.63):.2f}" if here and lo < 1.0 else "-"
    per = f"{l['instr_per_elem']:.1f}" + (f" ({l['worst_per_elem']:.1f} worst)" if l["worst_per_elem"] != l["instr_per_elem"] else "")
    band = "100% (memory-bound)" if lo >= 1.0 else f"{pct(lo)}-{pct(hi)}"
    print(f"| {l['label']} | {per} | {band} | {meas} | {ratio} |")
EOF
note "overall status $status ($(elapsed) s)"
cp "$summary" "$work/"
tar czf "$out/sweep.tgz" -C "$work" . 2>/dev/null
exit $status
