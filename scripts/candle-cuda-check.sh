#!/usr/bin/env bash
# Type-checks fusedreg with the feature `candle-cuda` (candle's CUDA backend, cudarc linking
# libcuda) on a machine without a GPU or the CUDA libraries: `cargo clippy`, which compiles every
# target in check mode and links nothing.
#
# candle-core's `cuda` feature pulls in candle-kernels, whose build script compiles about 30 CUDA
# files with nvcc (many minutes on a small machine) into PTX that matters only at run time. This
# script points the build at a copy of that crate (target/candle-kernels-check) whose build script
# writes empty PTX instead, through a `[patch]` given on the command line; Cargo.lock is restored
# afterwards. So it proves that the adapter's CUDA paths compile against candle-core's real CUDA
# API, not that they run: the GPU tests (tests/gpu/candle/) do that, on a machine with the CUDA
# toolkit (libcuda, cuBLAS, cuRAND, NVRTC) to link against.
#
# Usage: scripts/candle-cuda-check.sh [extra cargo clippy arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

cargo fetch --quiet
src=$(cargo metadata --format-version 1 --features candle-cuda 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "candle-kernels"))')
stub="$root/target/candle-kernels-check"
rm -rf "$stub"
cp -r "$(dirname "$src")" "$stub"
chmod -R u+w "$stub"
# No nvcc, so no cudaforge: drop the build dependency and write empty PTX.
python3 - "$stub/Cargo.toml" <<'EOF'
import re, sys
p = sys.argv[1]
s = open(p).read()
s = re.sub(r'\n\[build-dependencies\.cudaforge\]\n(?:[^\[\n][^\n]*\n?)*', '\n', s)
open(p, 'w').write(s)
EOF
cat >"$stub/build.rs" <<'EOF'
// Check-only stand-in (scripts/candle-cuda-check.sh): every PTX module empty, nothing linked.
fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let ptx = std::fs::read_to_string("src/ptx.rs").unwrap();
    for part in ptx.split("\"/").skip(1) {
        let name = part.split('"').next().unwrap();
        std::fs::write(out.join(name), "").unwrap();
    }
    std::fs::write(out.join("ptx.rs"), ptx).unwrap();
}
EOF

cp Cargo.lock "$root/target/Cargo.lock.candle-check"
trap 'cp "$root/target/Cargo.lock.candle-check" "$root/Cargo.lock"' EXIT
# -p fusedreg: the tools member pins cudarc's dynamic loading, which cannot share a build with
# candle's linking.
cargo clippy -p fusedreg --features candle-cuda --all-targets \
  --config "patch.crates-io.candle-kernels.path=\"$stub\"" "$@" -- -D warnings
echo "candle-cuda-check: fusedreg with candle-cuda type-checks (clippy, all targets)"
