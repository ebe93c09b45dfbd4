#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, fatbinary, cicc, headers) from NVIDIA's
# PyPI wheels into .cuda/ at the repository root, where build.rs finds it. Idempotent: a second
# run with the same pins does nothing. Needs python3 with pip; no CUDA, no GPU, no root.
#
# Why these pins: the machines we run on have driver 580 (CUDA 13.0). Newer 13.x compilers emit
# PTX that a 580 driver cannot JIT, and the cu12 nvcc wheel ships no nvcc binary.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cuda"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
stamp="$dest/INSTALLED"
want=$(printf '%s\n' "${pins[@]}")

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dest/nvidia/cu13/bin/nvcc" ]; then
  echo "install-cuda: $("$dest/nvidia/cu13/bin/nvcc" --version | grep release) already in $dest"
  exit 0
fi

python=${PYTHON:-python3}
tmp="$dest.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
# One pip call for all wheels: `pip install --target` does not merge into an existing folder.
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --target "$tmp" "${pins[@]}"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
printf '%s\n' "$want" >"$stamp"
"$dest/nvidia/cu13/bin/nvcc" --version | grep release
echo "install-cuda: installed into $dest (build.rs finds it there; no PATH change needed)"
