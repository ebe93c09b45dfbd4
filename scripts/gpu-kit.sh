#!/usr/bin/env bash
# Builds the release GPU test binary, the unit tests, the criterion benches and the report binary
# here, and packs them with a runner into .gpu/ (git-ignored). Copy that folder to an x86-64
# machine with an NVIDIA driver (no Rust, no network needed) and run:
#
#   .gpu/run.sh OUTDIR [--sanitize] [--bench] [--criterion] [--quick] [--torch]
#
# tests run with FUSEDREG_REQUIRE_GPU=1 (a missing GPU fails them); --sanitize repeats the GPU
# tests under compute-sanitizer memcheck, racecheck, initcheck and synccheck; --bench runs the
# benchmark report and the criterion benches; --torch runs benches/compare_torch.py. Logs and
# results go to OUTDIR.
#
# For an A/B of two revisions in one device call (benches/NOTES.md): GPU_KIT_SRC builds another
# checkout (e.g. a worktree of an older commit) with this checkout's toolkit, and GPU_KIT_DIR
# (default .gpu; relative to this checkout, or absolute) packs the kit elsewhere, e.g. .gpu-a.
#
# candle's CUDA device: `scripts/gpu-kit.sh --candle` also builds, with the feature
# `candle-cuda` (-p fusedreg only: the tools member pins cudarc's dynamic loading, which cannot
# share a build with candle's linking), the GPU test binary (every GPU test plus the candle ones,
# tests/gpu/candle*.rs) and every example of the library package (e.g. examples/train_gpt, which
# needs the feature `candle`), and packs them as bin/candle-test-gpu and bin/candle-example-NAME,
# with the corpus folder data/ when there is one. `--candle-only` packs only those (a second kit
# for a second device call: GPU_KIT_DIR=.gpu-candle scripts/gpu-kit.sh --candle-only). Run them
# with `.gpu/run.sh OUTDIR --candle [--candle-example]`. Without a GPU or a CUDA toolkit here:
#  * linking: scripts/install-cuda-libs.sh puts cuBLAS, cuRAND and NVRTC 13.0 from NVIDIA's wheels
#    and a stub libcuda.so.1 into .cuda-libs/lib, and CUDA_ROOT points cudarc's build script at
#    it. None of it travels: on the GPU machine the binaries load the driver's libcuda and the
#    python3 image's pip-installed nvidia libraries (the runner sets LD_LIBRARY_PATH to them).
#  * candle-kernels' build script compiles candle's kernels for real with our nvcc, for sm_90a only
#    (CUDA_COMPUTE_CAP=90, read by cudaforge; set another to build for another GPU): the PTX of its
#    ops and the static library of its quantized-matmul/MoE kernels (libmoe.a). The first build
#    takes long (see the timings in the log of the commit that added this); later ones reuse it.
#  * size: each candle binary embeds candle's PTX; the kit prints its size: a kit over the 64 MiB
#    a device call carries needs --candle-only (and the default kit in another call).
# GPU_KIT_NICE (default 19) is the niceness of the candle build.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
default=1 candle=0
for a in "$@"; do
  case $a in
    --candle) candle=1 ;;
    --candle-only) candle=1 default=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu-kit: unknown option $a (--candle, --candle-only)" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "${GPU_KIT_SRC:-$here}" && pwd)
cd "$root"
case ${GPU_KIT_DIR:-.gpu} in
  /*) kit=$GPU_KIT_DIR ;;
  *) kit="$here/${GPU_KIT_DIR:-.gpu}" ;;
esac
export FUSEDREG_REQUIRE_KERNELS=1

"$here/scripts/install-cuda.sh" >/dev/null
# Another checkout has no .cuda/ of its own: point its build.rs at ours.
[ "$root" != "$here" ] && export NVCC=${NVCC:-$here/.cuda/nvidia/cu13/bin/nvcc}

list_executables() {  # reads cargo's JSON messages, prints "name path" of each executable
  # Every package of the workspace (the library and tools/) is listed. Two different targets that
  # would get the same kit name (e.g. a `gpu` test in both packages) fail the kit instead of one
  # silently replacing the other.
  python3 -c '
import json, sys
seen = {}
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t, kind = m["target"], m["target"]["kind"][0]
        prefix = "bench" if kind == "bench" else "test" if m["profile"]["test"] else kind
        name = prefix + "-" + t["name"]
        if seen.setdefault(name, t["src_path"]) != t["src_path"]:
            sys.exit("gpu-kit: %s names both %s and %s" % (name, seen[name], t["src_path"]))
        print(name, m["executable"])
'
}

rm -rf "$kit"
mkdir -p "$kit/bin"
if [ $default -eq 1 ]; then
  {
    cargo test --workspace --release --no-run --message-format=json 2>/dev/null
    cargo bench --workspace --no-run --message-format=json 2>/dev/null
    cargo build --workspace --release --bins --examples --message-format=json 2>/dev/null
  } | list_executables | sort -u -k1,1 | while read -r name path; do
    cp "$path" "$kit/bin/$name"
    strip --strip-all "$kit/bin/$name" 2>/dev/null || true
  done
fi
if [ $candle -eq 1 ]; then
  CUDA_ROOT=$("$here/scripts/install-cuda-libs.sh")
  export CUDA_ROOT CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  # cudaforge (candle-kernels' build script) finds nvcc through NVCC or the PATH only.
  export NVCC=${NVCC:-$here/.cuda/nvidia/cu13/bin/nvcc}
  start=$(date +%s)
  # cargo's progress and errors stay on stderr: the first build is long.
  {
    nice -n "${GPU_KIT_NICE:-19}" cargo test -p fusedreg --release --features candle-cuda --no-run --message-format=json
    nice -n "${GPU_KIT_NICE:-19}" cargo build -p fusedreg --release --features candle-cuda --examples --message-format=json
  } | list_executables | sort -u -k1,1 | while read -r name path; do
    # Only what needs candle's CUDA device: the other test binaries are in the default kit.
    case $name in test-gpu | example-*) ;; *) continue ;; esac
    cp "$path" "$kit/bin/candle-$name"
    strip --strip-all "$kit/bin/candle-$name" 2>/dev/null || true
  done
  echo "gpu-kit: candle-cuda build $(($(date +%s) - start)) s" >&2
  [ -x "$kit/bin/candle-test-gpu" ] || { echo "gpu-kit: no candle-cuda GPU test binary" >&2; exit 1; }
  # The corpus of the candle example(s), read at run time.
  if ls "$kit"/bin/candle-example-* >/dev/null 2>&1 && [ -d "$root/data" ]; then cp -r "$root/data" "$kit/data"; fi
  # What the binaries were linked against, for the runner to set beside the GPU machine's versions.
  grep '==' "$CUDA_ROOT/INSTALLED" >"$kit/CANDLE_LINKED"
fi
cp "$root/scripts/gpu-run.sh" "$kit/run.sh"
[ -f "$root/benches/compare_torch.py" ] && cp "$root/benches/compare_torch.py" "$kit/"
git -C "$root" rev-parse HEAD >"$kit/COMMIT" 2>/dev/null || echo unknown >"$kit/COMMIT"
git -C "$root" status --porcelain | grep -q . && echo "+uncommitted" >>"$kit/COMMIT" || true
chmod +x "$kit/run.sh"
ls -la "$kit/bin"
du -sh "$kit"
