#!/usr/bin/env bash
# Runs the emulated cross-entropy kernels (scripts/emu/cases/cross_entropy.cpp) with XE_DUMP set,
# then checks every case's outputs against the Rust CPU reference bit for bit
# (tests/cross_entropy_emu.rs). Needs g++ >= 11 and cargo; no GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
    -DKFILE="\"$PWD/kernels/cross_entropy.cu\"" -include scripts/emu/shim.h \
    -o "$work/emu" scripts/emu/cases/cross_entropy.cpp
mkdir "$work/dump"
parts=${EMU_PARTS:-$(nproc)}
pids=()
for ((k = 0; k < parts; ++k)); do XE_DUMP="$work/dump" "$work/emu" "$k" "$parts" > /dev/null & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "$(ls "$work/dump" | wc -l) emulated cases; checking them against the CPU reference"
XE_DUMP="$work/dump" cargo test --test cross_entropy_emu -- --ignored
