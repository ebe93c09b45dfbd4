#!/usr/bin/env bash
# Installs the pinned nvdisasm (NVIDIA's SASS disassembler) from its PyPI wheel into
# .cuda/nvdisasm/, where scripts/sass-budget finds it. The nvcc wheels of install-cuda.sh do not
# ship it; 13.2.51 decodes the sm_90 cubins of the pinned nvcc 13.0.88 (the disassembler only
# reads SASS, so its newer version does not change what is counted). Idempotent; needs python3
# with pip; no CUDA, no GPU, no root. A separate folder from install-cuda.sh's, which replaces
# its own tree when its pins change.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cuda/nvdisasm"
pin=nvidia-cuda-nvdisasm==13.2.51
bin="$dest/nvidia/cu13/bin/nvdisasm"

if [ -f "$dest/INSTALLED" ] && [ "$(cat "$dest/INSTALLED")" = "$pin" ] && [ -x "$bin" ]; then
  exit 0
fi
python=${PYTHON:-python3}
tmp="$dest.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$(dirname "$dest")"
"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --only-binary=:all: \
  --target "$tmp" "$pin"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
printf '%s\n' "$pin" >"$dest/INSTALLED"
echo "install-nvdisasm: $("$bin" --version | tail -1) in $dest" >&2
