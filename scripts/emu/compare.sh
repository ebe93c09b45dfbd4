#!/usr/bin/env bash
# Checks, on a machine without a GPU, that kernels/dropout_residual.cu (and the headers it
# includes) still produce every output bit they produced in a revision verified on a GPU: the
# kernels run under the host emulation in this folder (harness.cpp, shim.h) on ~700 cases, and
# their output hashes are compared. A speed change still needs a GPU to measure; this only says
# "same bits". Needs g++ >= 11 (C++20 <barrier>), which nvcc already needs to preprocess.
#
#   scripts/emu/compare.sh                    # the working tree against golden.txt (CI runs this)
#   scripts/emu/compare.sh REV                # the working tree against the kernels of REV
#   scripts/emu/compare.sh --write-golden REV # golden.txt from the kernels of REV
#
# golden.txt holds the hashes of the kernels last verified on a GPU (its first line names the
# revision). A change that alters outputs on purpose moves it, after the GPU suite has passed
# with the change: `--write-golden <that revision>`.
#
# Validated by mutation: swapping two keep bits of a Philox block changed 10 of 88 cases.
set -euo pipefail
cd "$(dirname "$0")/../.."
parts=${EMU_PARTS:-$(nproc)}
golden=scripts/emu/golden.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mode=golden rev=""
case ${1:-} in
  "") ;;
  --write-golden) mode=write rev=${2:?--write-golden needs a revision} ;;
  -*) echo "usage: $0 [REV | --write-golden REV]" >&2; exit 2 ;;
  *) mode=rev rev=$1 ;;
esac

kernels_of() {  # kernels_of REV DIR: the kernel sources of REV into DIR
  mkdir -p "$2/common"
  for f in dropout_residual.cu common/philox.cuh common/dtype.cuh; do
    git show "$1:kernels/$f" > "$2/$f"
  done
}

build() {  # build NAME KERNEL_DIR
  g++ -std=c++20 -O2 -pthread -Iscripts/emu/include -I"$2" -DKFILE="\"$2/dropout_residual.cu\"" \
      -include scripts/emu/shim.h -o "$work/$1" scripts/emu/harness.cpp
}

emulate() {  # emulate NAME: all cases, split over $parts processes, sorted into $work/NAME.txt
  local pids=() k
  for ((k = 0; k < parts; ++k)); do
    timeout 1200 "$work/$1" "$k" "$parts" > "$work/$1.$k.txt" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || { echo "the $1 emulation failed or hung (a warp-level call skipped?)" >&2; exit 1; }
  done
  cat "$work/$1".[0-9]*.txt | sort > "$work/$1.txt"
}

if [ $mode = write ]; then
  kernels_of "$rev" "$work/kernels-base"
  build base "$work/kernels-base"
  emulate base
  { echo "# emulated outputs of the dropout kernels of $(git rev-parse --short "$rev")"; cat "$work/base.txt"; } > "$golden"
  echo "wrote $golden: $(wc -l < "$work/base.txt") cases from $rev"
  exit 0
fi

if [ $mode = rev ]; then
  kernels_of "$rev" "$work/kernels-base"
  build base "$work/kernels-base" &
  b1=$!
  build head "$PWD/kernels" &
  b2=$!
  wait "$b1" || exit 1
  wait "$b2" || exit 1
  emulate base
  expected="$work/base.txt" against=$rev
else
  build head "$PWD/kernels"
  grep -v '^#' "$golden" > "$work/golden.txt"
  expected="$work/golden.txt" against="$(head -1 "$golden" | grep -oE '[0-9a-f]{7,}$') ($golden)"
fi
emulate head

cases=$(wc -l < "$work/head.txt")
if [ "$cases" -eq 0 ] || ! diff "$expected" "$work/head.txt" > "$work/diff.txt"; then
  echo "emulated outputs of kernels/dropout_residual.cu differ from $against ($cases cases):" >&2
  head -20 "$work/diff.txt" >&2
  exit 1
fi
echo "dropout kernels: same bits as $against in all $cases emulated cases"
