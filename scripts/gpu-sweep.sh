#!/usr/bin/env bash
# Prepares the next GPU session's verification sweep (issue #26) as ONE device call: builds here
# the GPU test binaries of both crates and the report, and packs them with benches/compare_torch.py,
# Liger-Kernel's wheel (pure Python; the device image has torch and triton) and the sweep runner
# into .gpu-sweep/ (git-ignored, ~25 MB: inside the 64 MiB a call carries). On the device:
#
#   .gpu-sweep/run.sh "$OUT"          # ~10 minutes; every step has its own time cap
#
# runs, in order: the GPU suites (FUSEDREG_REQUIRE_GPU=1), compute-sanitizer (memcheck with leak
# check, racecheck, initcheck, synccheck) on the test groups changed since the last clean
# sanitizer run, the report `--quick` (random inputs; its budget table sets every static
# prediction beside the %copy measured there) and compare_torch.py `--quick` (with Liger where it
# imports), and leaves in $OUT: summary.txt, predictions.md (prediction vs measurement, for
# benches/NOTES.md and RESULTS.md) and sweep.tgz (every log, report.json/txt/svg, torch.json).
#
# The candle kit does not fit beside it (over 64 MiB together): the second call is
#   GPU_KIT_DIR=.gpu-candle scripts/gpu-kit.sh --candle-only      # here (first build ~25 min)
#   .gpu-candle/run.sh "$OUT" --candle --candle-example           # on the device
#
# SWEEP_SANITIZE_BASE (default: the last sanitizer-clean revision, below) picks the revision the
# changed groups are computed against; SWEEP_SANITIZE_GROUPS="a b" names them outright ("all"
# for every group). SWEEP_NO_LIGER=1 packs no wheel.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
kit="$here/${GPU_SWEEP_DIR:-.gpu-sweep}"
# The last revision whose GPU suite ran clean under all four sanitizers (benches/RESULTS.md,
# H200 2026-11-30): groups untouched since then are not sanitized again.
base=${SWEEP_SANITIZE_BASE:-8b4c2de}
export FUSEDREG_REQUIRE_KERNELS=1
./scripts/install-cuda.sh >/dev/null

list_executables() {  # cargo JSON messages -> "name path" of each executable (as gpu-kit.sh)
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t, kind = m["target"], m["target"]["kind"][0]
        prefix = "test" if m["profile"]["test"] else kind
        print(prefix + "-" + t["name"], m["executable"])
'
}

rm -rf "$kit"
mkdir -p "$kit/bin"
{
  cargo test -p fusedreg --release --test gpu --no-run --message-format=json 2>/dev/null
  cargo test -p fusedreg-tools --release --test gpu_tools --test report --no-run --message-format=json 2>/dev/null
  cargo build -p fusedreg-tools --release --bin fusedreg-bench --message-format=json 2>/dev/null
} | list_executables | sort -u -k1,1 | while read -r name path; do
  cp "$path" "$kit/bin/$name"
  strip --strip-all "$kit/bin/$name" 2>/dev/null || true
done
for b in test-gpu test-gpu_tools bin-fusedreg-bench; do
  [ -x "$kit/bin/$b" ] || { echo "gpu-sweep: $b was not built" >&2; exit 1; }
done

# The test groups (the `group::` prefixes of the GPU trials) to sanitize: those whose kernels,
# host code or tests changed since $base. A change to shared code reaches every group using it.
if [ -n "${SWEEP_SANITIZE_GROUPS:-}" ]; then
  groups=$SWEEP_SANITIZE_GROUPS
else
  groups=$(git diff --name-only "$base" HEAD -- kernels src tests/gpu build 2>/dev/null | python3 -c '
import sys
ops = ["adamw", "bias_act_dropout", "cross_entropy", "dropout", "dropout_add_norm",
       "dropout_residual", "fmath", "global_norm", "philox"]
users = {  # shared files -> the groups that run them
    "dropping": ["dropout", "dropout_residual", "bias_act_dropout", "dropout_add_norm", "bad_input"],
    "philox": ["philox", "dropout", "dropout_residual", "bias_act_dropout", "dropout_add_norm", "adamw"],
    "fmath": ["fmath", "bias_act_dropout", "cross_entropy"],
    "fastmath": ["fmath", "bias_act_dropout", "cross_entropy"],
    "math": ["fmath", "bias_act_dropout", "cross_entropy"],
    "multi_tensor": ["adamw", "global_norm"],
}
out = set()
for path in sys.stdin.read().split():
    parts = path.split("/")
    stem = parts[-1].split(".")[0] if len(parts) > 1 else path
    if parts[0] == "src" and len(parts) > 2:
        stem = parts[1]
    if stem in ops or stem == "bad_input":
        out.add(stem)
    elif stem in users:
        out.update(users[stem])
    elif stem == "nvcc-flags" or stem in ("dtype", "runtime", "lib", "error", "modules", "kernels", "harness", "main", "common"):
        out.add("all")  # the build flags, or code every kernel or test runs through
print("all" if "all" in out else " ".join(sorted(out)))')
fi
printf '%s\n' "${groups:-none}" >"$kit/SANITIZE_GROUPS"
echo "$base" >"$kit/SANITIZE_BASE"

cp scripts/gpu-sweep-run.sh "$kit/run.sh"
cp benches/compare_torch.py "$kit/"
chmod +x "$kit/run.sh"
if [ "${SWEEP_NO_LIGER:-0}" != 1 ]; then
  mkdir -p "$kit/whl"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$kit/whl" liger-kernel==0.8.5 ||
    echo "gpu-sweep: no Liger-Kernel wheel (compare_torch.py runs without it)" >&2
fi
git rev-parse HEAD >"$kit/COMMIT"
git status --porcelain --untracked-files=no | grep -q . && echo "+uncommitted" >>"$kit/COMMIT" || true
du -sh "$kit"
echo "gpu-sweep: sanitizer groups since $base: $(cat "$kit/SANITIZE_GROUPS")"
bytes=$(du -sb "$kit" | cut -f1)
[ "$bytes" -le $((64 << 20)) ] || { echo "gpu-sweep: $kit is over the 64 MiB a device call carries" >&2; exit 1; }
