#!/usr/bin/env bash
# Runs the emulated dropout_add_norm kernels (scripts/emu/cases/dropout_add_norm.cpp, whose
# statistics cases are in dropout_add_norm_stats.inc) with DAN_DUMP set, then checks every case
# against the Rust CPU reference bit for bit: the forward and backward outputs of the case*.bin
# dumps (tests/dropout_add_norm_emu.rs) and the statistics cases' site words and outputs against
# the reference's meter (tests/redundancy_emu.rs, the stats*.bin dumps). Every resolution of the
# keying (32-, 16- and 8-bit cases). Then the same for dropout's residual forward with the
# statistics (scripts/emu/cases/dropout.cpp with DO_ONLY_STATS: its dropout_stats.inc cases, the
# dstats*.bin dumps, tests/redundancy_emu.rs). Needs g++ >= 11 and cargo; no GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
    -DKFILE="\"$PWD/kernels/dropout_add_norm.cu\"" -include scripts/emu/shim.h \
    -o "$work/emu" scripts/emu/cases/dropout_add_norm.cpp
mkdir "$work/dump"
parts=${EMU_PARTS:-$(nproc)}
pids=()
for ((k = 0; k < parts; ++k)); do DAN_DUMP="$work/dump" "$work/emu" "$k" "$parts" > /dev/null & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "$(ls "$work/dump" | grep -c '^case') emulated cases, $(ls "$work/dump" | grep -c '^stats') statistics cases; checking them against the CPU reference"
g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
    -DKFILE="\"$PWD/kernels/dropout.cu\"" -include scripts/emu/shim.h \
    -o "$work/emu_do" scripts/emu/cases/dropout.cpp
pids=()
for ((k = 0; k < parts; ++k)); do DO_ONLY_STATS=1 DO_DUMP="$work/dump" "$work/emu_do" "$k" "$parts" > /dev/null & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "$(ls "$work/dump" | grep -c '^dstats') dropout statistics cases"
DAN_DUMP="$work/dump" DO_DUMP="$work/dump" cargo test --test dropout_add_norm_emu --test redundancy_emu -- --ignored
