#!/usr/bin/env bash
# The runner packed into .gpu/ by scripts/gpu-kit.sh. Usage: run.sh OUTDIR [--sanitize]
# [--bench] [--quick] [--torch] [--candle] [--candle-example]. Needs only an NVIDIA driver (and
# compute-sanitizer for --sanitize, python3 with torch for --torch). Exit status: non-zero if any
# test or sanitizer run failed.
#
# --candle runs bin/candle-test-gpu (packed by `gpu-kit.sh --candle`, built with the feature
# candle-cuda): only its candle trials (filter `candle`) where the kit also has the plain
# bin/test-gpu, every trial otherwise. --candle-example runs each bin/candle-example-NAME at its
# full (default) size on the GPU: `--device cuda --out OUTDIR/NAME`, plus `--corpus
# KIT/data/<the .txt there>` where the example's --help lists that flag (otherwise the build
# machine's path of data/, $(cat KIT/BUILD_ROOT)/data, is made a link to KIT/data where free).
# CANDLE_EXAMPLE_ARGS adds flags (e.g. "--steps 200" for a shorter run); CANDLE_EXAMPLE_TIMEOUT
# (s, default 540: one device call runs at most 600 s) bounds each. Full size takes minutes.
#
# Those binaries link the driver's libcuda.so.1 and cuBLAS (+cuBLASLt) and cuRAND 13
# dynamically (NVRTC and libcudart too where they use them): linked here against a stub and
# CUDA 13.0 wheels (scripts/install-cuda-libs.sh), they load on the GPU machine the nvidia-* pip
# packages of its python3 (torch's): LD_LIBRARY_PATH gets every site-packages/nvidia/*/lib
# folder (cu13/lib holds the CUDA 13 ones) before they run, the loader is asked (ldd) for
# anything missing, and the summary names those packages' versions beside the ones linked
# against (KIT/CANDLE_LINKED).
set -uo pipefail
kit=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: run.sh OUTDIR [--sanitize] [--bench] [--criterion] [--quick] [--torch] [--candle] [--candle-example]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
sanitize=0 bench=0 criterion=0 quick="" torch=0 candle=0 candle_example=0
for a in "$@"; do
  case $a in
    --sanitize) sanitize=1 ;;
    --bench) bench=1 ;;
    --criterion) criterion=1 ;;
    --quick) quick=--quick ;;
    --torch) torch=1 ;;
    --candle) candle=1 ;;
    --candle-example) candle_example=1 ;;
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
  [ -e "$t" ] || continue # a kit of candle binaries only (gpu-kit.sh --candle-only)
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

# 4. candle's CUDA device: the candle-cuda GPU tests, then the example(s) at full size.
if [ $candle -eq 1 ] || [ $candle_example -eq 1 ]; then
  # The nvidia-* pip packages' library folders (namespace package `nvidia`: one lib/ per wheel
  # in the cu12 layout, nvidia/cu13/lib for CUDA 13 wheels).
  nvlibs=$(python3 - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    import site
    roots = [os.path.join(p, "nvidia") for p in site.getsitepackages()]
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "cu13", "lib")) + glob.glob(os.path.join(r, "*", "lib"))):
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
  )
  note "candle: nvidia lib folders ${nvlibs:-NONE FOUND}"
  versions=$(python3 -c '
import importlib.metadata as m
for p in ("nvidia-cublas", "nvidia-curand", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"):
    try: print("%s==%s" % (p, m.version(p)), end=" ")
    except m.PackageNotFoundError: print(p + " MISSING", end=" ")
' 2>/dev/null)
  note "candle: device packages: ${versions:-unknown}; linked against: $(tr '\n' ' ' <"$kit/CANDLE_LINKED" 2>/dev/null)"
  ld_saved=${LD_LIBRARY_PATH-unset} # restored after this step: only the candle binaries need it
  # (no empty entry: an empty one would put the working folder on the loader's path)
  export LD_LIBRARY_PATH="$nvlibs${nvlibs:+${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}"
  for b in "$kit"/bin/candle-test-gpu "$kit"/bin/candle-example-*; do
    [ -x "$b" ] || continue
    missing=$(ldd "$b" 2>/dev/null | grep 'not found' | awk '{print $1}' | tr '\n' ' ')
    [ -z "$missing" ] || { note "candle: $(basename "$b") cannot load: $missing"; status=1; }
  done
fi
if [ $candle -eq 1 ]; then
  t="$kit/bin/candle-test-gpu"
  if [ -x "$t" ]; then
    filter=""
    [ -x "$kit/bin/test-gpu" ] && filter=candle # the other trials ran in step 1
    "$t" --test-threads 4 $filter >"$out/candle-test-gpu.log" 2>&1
    rc=$?
    note "candle-test-gpu${filter:+ (filter $filter)}: rc=$rc $(grep -E '^test result' "$out/candle-test-gpu.log" | tail -1)"
    [ $rc -eq 0 ] || status=1
  else
    note "candle-test-gpu: not in this kit (gpu-kit.sh --candle packs it)"
    status=1
  fi
fi
if [ $candle_example -eq 1 ]; then
  found=0
  for ex in "$kit"/bin/candle-example-*; do
    [ -x "$ex" ] || continue
    found=1
    name=${ex##*/candle-example-}
    args=(--device cuda --out "$out/$name")
    corpus=$(ls "$kit"/data/*.txt 2>/dev/null | head -1)
    if [ -n "$corpus" ] && "$ex" --help 2>&1 | grep -q -- '--corpus'; then
      args+=(--corpus "$corpus")
    elif [ -n "$corpus" ] && [ -f "$kit/BUILD_ROOT" ]; then
      # No --corpus flag: the example reads BUILD_ROOT/data/..., the build machine's path. Make
      # that path point at the kit's copy (nothing there is replaced).
      broot=$(cat "$kit/BUILD_ROOT")
      if [ ! -e "$broot/data" ] && mkdir -p "$broot" 2>/dev/null && ln -s "$kit/data" "$broot/data"; then
        note "candle-example-$name: linked $broot/data to the kit's data/ (the example has no --corpus)"
      fi
    fi
    log="$out/candle-example-$name.log"
    echo "+ $ex ${args[*]} ${CANDLE_EXAMPLE_ARGS:-}" >"$log"
    # CANDLE_EXAMPLE_ARGS is a list of flags: split on purpose.
    timeout "${CANDLE_EXAMPLE_TIMEOUT:-540}" "$ex" "${args[@]}" ${CANDLE_EXAMPLE_ARGS:-} >>"$log" 2>&1
    rc=$?
    note "candle-example-$name: rc=$rc $(grep -v '^[[:space:]]*$' "$log" | tail -1)"
    [ $rc -eq 0 ] || status=1
  done
  [ $found -eq 1 ] || { note "candle examples: none in this kit (gpu-kit.sh --candle packs them)"; status=1; }
fi
if [ -n "${ld_saved:-}" ]; then
  if [ "$ld_saved" = unset ]; then unset LD_LIBRARY_PATH; else export LD_LIBRARY_PATH=$ld_saved; fi
fi

# 5. The same work through PyTorch, on the same GPU, for comparison.
if [ $torch -eq 1 ] && [ -f "$kit/compare_torch.py" ]; then
  PYTHONUNBUFFERED=1 python3 "$kit/compare_torch.py" $quick --out "$out" 2>&1 | tee "$out/torch.log"
fi

note "overall status $status"
exit $status
