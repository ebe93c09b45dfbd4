#!/usr/bin/env bash
# Runs the emulated bias_act_dropout kernels (scripts/emu/cases/bias_act_dropout.cpp) with
# BAD_DUMP set, then checks the Math::Fast / 16-bit keying / ReLU-kernel cases against the Rust
# CPU reference (tests/bias_act_dropout_emu.rs): the mask exactly, Math::Fast within the bounds
# of the module docs, Math::Exact bit for bit. Needs g++ >= 11 and cargo; no GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
    -DKFILE="\"$PWD/kernels/bias_act_dropout.cu\"" -include scripts/emu/shim.h \
    -o "$work/emu" scripts/emu/cases/bias_act_dropout.cpp
mkdir "$work/dump"
parts=${EMU_PARTS:-$(nproc)}
pids=()
for ((k = 0; k < parts; ++k)); do BAD_DUMP="$work/dump" "$work/emu" "$k" "$parts" > /dev/null & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "$(ls "$work/dump" | wc -l) emulated cases; checking them against the CPU reference"
BAD_DUMP="$work/dump" cargo test --test bias_act_dropout_emu -- --ignored
