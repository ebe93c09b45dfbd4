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
#  * candle-kernels: the PTX of candle's ops is compiled for real by its own build steps with our
#    nvcc, for sm_90a only (CUDA_COMPUTE_CAP=90, read by cudaforge; set another for another GPU);
#    its static library of quantized (GGUF) matmul / MoE kernels, libmoe.a, is made of aborting
#    stubs through a patched copy of the crate (target/candle-kernels-kit, given to cargo as a
#    `[patch]` on the command line; Cargo.lock is restored afterwards): fusedreg never calls
#    those kernels, and compiling them is 15 heavy `nvcc -c` runs that cudaforge makes one at a
#    time on two cores. Measured here (2 cores shared by several builds, load 16-23, nice 19):
#    the PTX took 6 and 10 min (two builds; quantized.cu alone 3.5-4 min); the first of the 15
#    libmoe.a files was still in cicc after 5 min (45 s of CPU), so the real library would have
#    added over an hour there (on idle cores less; not measured).
#    GPU_KIT_CANDLE_MOE=real builds the unpatched crate (real libmoe.a), if ever needed.
#    Later kits reuse all of it (cudaforge caches per file in OUT_DIR).
#  * size: each candle binary embeds the PTX of the candle kernels it can reach (11 MB in all):
#    measured, bin/candle-test-gpu is 22.7 MB stripped (bin/test-gpu 8.2 MB) and a small candle
#    example 3.3 MB. The default kit is 70 MB and a --candle kit 91 MB, over the 64 MiB a device
#    call carries (the kit warns): carry a --candle-only kit (22 MB plus the examples) in its own
#    call, or delete bin/bench-*, bin/example-* and bin/bin-fusedreg-bench from a --candle kit
#    (about 59 MB). A second --candle-only kit with nothing changed takes a few seconds.
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

# candle-kernels for the kit: a copy whose build script compiles the PTX of candle's ops exactly as
# its own does (same cudaforge calls, so real kernels at run time), but makes libmoe.a, the static
# library of its quantized (GGUF) matmul and MoE kernels, from stubs: each of its C symbols
# (src/ffi.rs) prints what it is and aborts. Those kernels serve only quantized models, which
# nothing of fusedreg's calls; compiling them for real (15 heavy nvcc -c runs, one at a time) is
# what makes the build long. GPU_KIT_CANDLE_MOE=real builds the crate unpatched instead.
candle_kernels_copy() {  # prints the copy's folder
  local src stub
  src=$(cargo metadata --format-version 1 --features candle-cuda 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "candle-kernels"))')
  src=$(dirname "$src")
  # The copy mirrors this build script: a new candle-kernels must be looked at again.
  grep -qF '.exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"])' "$src/build.rs" &&
    grep -qF 'moe_builder.build_lib(out_dir.join("libmoe.a"))' "$src/build.rs" || {
    echo "gpu-kit: $src/build.rs is not the one scripts/gpu-kit.sh mirrors; review the copy (or GPU_KIT_CANDLE_MOE=real)" >&2
    return 1
  }
  stub="$root/target/candle-kernels-kit"
  # Built beside and kept only when it differs: an unchanged copy keeps its mtimes, so cargo does
  # not rebuild candle-kernels and everything above it at every kit.
  rm -rf "$stub.new"
  cp -rp "$src" "$stub.new"
  chmod -R u+w "$stub.new"
  cat >"$stub.new/build.rs" <<'EOF'
// scripts/gpu-kit.sh --candle: candle-kernels' build script with its PTX step unchanged and
// libmoe.a made of aborting stubs (one per symbol of src/ffi.rs); see the script's comments.
use cudaforge::{KernelBuilder, Result};
use std::path::PathBuf;

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let bindings = KernelBuilder::new()
        .source_dir("src")
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"])
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;
    bindings.write(out_dir.join("ptx.rs"))?;

    let ffi = std::fs::read_to_string("src/ffi.rs").unwrap();
    let mut c = String::from("#include <stdio.h>\n#include <stdlib.h>\n");
    let mut n = 0;
    for part in ffi.split("pub fn ").skip(1) {
        let name: String = part.chars().take_while(|ch| ch.is_alphanumeric() || *ch == '_').collect();
        c += &format!("void {name}(void) {{ fputs(\"candle-kernels stub (scripts/gpu-kit.sh): {name} was not built\\n\", stderr); abort(); }}\n");
        n += 1;
    }
    assert!(n > 40, "only {n} functions in src/ffi.rs");
    let (src, obj) = (out_dir.join("moe_stub.c"), out_dir.join("moe_stub.o"));
    std::fs::write(&src, c).unwrap();
    let run = |cmd: &mut std::process::Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    run(std::process::Command::new("cc").args(["-c", "-fPIC", "-O1", "-o"]).arg(&obj).arg(&src));
    let lib = out_dir.join("libmoe.a");
    let _ = std::fs::remove_file(&lib);
    run(std::process::Command::new("ar").arg("crs").arg(&lib).arg(&obj));
    println!("cargo:rustc-link-search={}", out_dir.display());
    println!("cargo:rustc-link-lib=moe");
    Ok(())
}
EOF
  if diff -rq "$stub.new" "$stub" >/dev/null 2>&1; then rm -rf "$stub.new"; else rm -rf "$stub" && mv "$stub.new" "$stub"; fi
  echo "$stub"
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
  patch=()
  if [ "${GPU_KIT_CANDLE_MOE:-stub}" != real ]; then
    copy=$(candle_kernels_copy)
    patch=(--config "patch.crates-io.candle-kernels.path=\"$copy\"")
    # The patch rewrites Cargo.lock's candle-kernels entry: put the committed one back.
    cp Cargo.lock "$root/target/Cargo.lock.gpu-kit"
    trap 'cp "$root/target/Cargo.lock.gpu-kit" "$root/Cargo.lock"' EXIT
  fi
  start=$(date +%s)
  # cargo's progress and errors stay on stderr: the first build is long.
  {
    # Only the GPU test target: the other test binaries would each link candle for nothing.
    nice -n "${GPU_KIT_NICE:-19}" cargo test -p fusedreg --release --features candle-cuda "${patch[@]}" --test gpu --no-run --message-format=json
    nice -n "${GPU_KIT_NICE:-19}" cargo build -p fusedreg --release --features candle-cuda "${patch[@]}" --examples --message-format=json
  } | list_executables | sort -u -k1,1 | while read -r name path; do
    case $name in test-gpu | example-*) ;; *) continue ;; esac
    cp "$path" "$kit/bin/candle-$name"
    strip --strip-all "$kit/bin/candle-$name" 2>/dev/null || true
  done
  echo "gpu-kit: candle-cuda build $(($(date +%s) - start)) s" >&2
  [ -x "$kit/bin/candle-test-gpu" ] || { echo "gpu-kit: no candle-cuda GPU test binary" >&2; exit 1; }
  # The corpus of the candle example(s), read at run time, and where the build put it: an example
  # may read it from its CARGO_MANIFEST_DIR (the runner recreates that path if it must).
  if ls "$kit"/bin/candle-example-* >/dev/null 2>&1 && [ -d "$root/data" ]; then
    cp -r "$root/data" "$kit/data"
    echo "$root" >"$kit/BUILD_ROOT"
  fi
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
bytes=$(du -sb "$kit" | cut -f1)
[ "$bytes" -le $((64 << 20)) ] || echo "gpu-kit: $kit is over the 64 MiB a device call carries" >&2
