#!/usr/bin/env bash
# Runs the emulated AdamW kernels (scripts/emu/cases/adamw.cpp) with ADAMW_DUMP set, then checks
# the stochastic-rounding cases of every 16-bit param type and layout against the Rust CPU
# reference bit for bit (tests/adamw_emu.rs). Needs g++ >= 11 and cargo; no GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
    -DKFILE="\"$PWD/kernels/adamw.cu\"" -include scripts/emu/shim.h \
    -o "$work/emu" scripts/emu/cases/adamw.cpp
mkdir "$work/dump"
parts=${EMU_PARTS:-$(nproc)}
pids=()
for ((k = 0; k < parts; ++k)); do ADAMW_DUMP="$work/dump" "$work/emu" "$k" "$parts" > /dev/null & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "$(ls "$work/dump" | wc -l) emulated cases; checking them against the CPU reference"
ADAMW_DUMP="$work/dump" cargo test --test adamw_emu -- --ignored
