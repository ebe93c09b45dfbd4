#!/usr/bin/env bash
# Checks, on a machine without a GPU, that every kernel under emulation still produces every output
# bit it produced in a revision verified on a GPU. One case file per kernel file, one stem:
#
#   scripts/emu/cases/<stem>.cpp    the cases: random inputs (with infinities and NaNs where the op
#                                   takes them), every dtype and code path, one line of output
#                                   hashes per case; it includes harness.h, which includes
#                                   kernels/<stem>.cu (and the kernels/common headers it uses)
#   scripts/emu/golden/<stem>.txt   those lines from the revision last verified on a GPU (its first
#                                   line names the revision)
#
# The kernels run under a host emulation of CUDA (shim.h: OS threads for a block's threads, real
# barriers for __syncthreads and the warp intrinsics). A speed change still needs a GPU to measure;
# this only says "same bits". Needs g++ >= 11 (C++20 <barrier>), which nvcc already needs.
#
#   scripts/emu/compare.sh [STEM...]                    # working tree against golden/ (CI runs this)
#   scripts/emu/compare.sh --rev REV [STEM...]          # working tree against the kernels of REV
#   scripts/emu/compare.sh --write-golden REV [STEM...] # golden/ from the kernels of REV
#
# No STEM means every case file. A change that alters outputs on purpose moves a golden file, after
# the GPU suite has passed with the change: `--write-golden <that revision> <stem>`.
#
# Validated by mutation: swapping two keep bits of a Philox block changed 10 of 88 dropout cases.
set -euo pipefail
cd "$(dirname "$0")/../.."
parts=${EMU_PARTS:-$(nproc)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mode=golden rev=""
case ${1:-} in
  --write-golden) mode=write rev=${2:?--write-golden needs a revision}; shift 2 ;;
  --rev) mode=rev rev=${2:?--rev needs a revision}; shift 2 ;;
  -*) echo "usage: $0 [--rev REV | --write-golden REV] [STEM...]" >&2; exit 2 ;;
esac
stems=("$@")
if [ ${#stems[@]} -eq 0 ]; then
  for f in scripts/emu/cases/*.cpp; do stems+=("$(basename "$f" .cpp)"); done
fi

kernels_of() {  # kernels_of REV DIR: the kernel sources of REV into DIR
  mkdir -p "$2"
  git archive "$1" kernels | tar -x -C "$2" --strip-components=1
}

build() {  # build NAME STEM KERNEL_DIR
  g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -I"$3" \
      -DKFILE="\"$3/$2.cu\"" -include scripts/emu/shim.h -o "$work/$1" "scripts/emu/cases/$2.cpp"
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

[ $mode = golden ] || kernels_of "$rev" "$work/kernels-base"
status=0
for stem in "${stems[@]}"; do
  golden=scripts/emu/golden/$stem.txt
  [ -f "scripts/emu/cases/$stem.cpp" ] || { echo "no case file scripts/emu/cases/$stem.cpp" >&2; exit 2; }
  if [ $mode = write ]; then
    build "base-$stem" "$stem" "$work/kernels-base"
    emulate "base-$stem"
    { echo "# emulated outputs of kernels/$stem.cu at $(git rev-parse --short "$rev")"; cat "$work/base-$stem.txt"; } > "$golden"
    echo "wrote $golden: $(wc -l < "$work/base-$stem.txt") cases from $rev"
    continue
  fi
  if [ $mode = rev ]; then
    build "base-$stem" "$stem" "$work/kernels-base"
    emulate "base-$stem"
    expected="$work/base-$stem.txt" against=$rev
  else
    [ -f "$golden" ] || { echo "$stem: no golden file $golden" >&2; status=1; continue; }
    grep -v '^#' "$golden" > "$work/golden-$stem.txt"
    # The revision follows the first " at " of the header, which may go on ("(UNVERIFIED ...)").
    expected="$work/golden-$stem.txt" against="$(sed -nE '1s/^# emulated outputs of [^ ]+ at ([0-9a-f]{7,}).*/\1/p' "$golden") ($golden)"
  fi
  build "head-$stem" "$stem" "$PWD/kernels"
  emulate "head-$stem"
  cases=$(wc -l < "$work/head-$stem.txt")
  if [ "$cases" -eq 0 ] || ! diff "$expected" "$work/head-$stem.txt" > "$work/diff-$stem.txt"; then
    echo "$stem: emulated outputs of kernels/$stem.cu differ from $against ($cases cases):" >&2
    head -20 "$work/diff-$stem.txt" >&2
    status=1
    continue
  fi
  echo "$stem: same bits as $against in all $cases emulated cases"
done
exit $status
