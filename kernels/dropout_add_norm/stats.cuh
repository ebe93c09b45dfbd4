// The Block Influence statistics of dropout_add_norm's forward (src/redundancy, the module docs of
// src/dropout_add_norm/mod.rs, "Redundancy statistics"): per row, cos(r, s) of the stream before
// the add (r) and after it (s, as stored), from r·s, |r|² and |s|² of values the forward already
// holds. Compiled only into the *_stats_* entries (a template flag): the default kernels do none
// of this. The norm forwards sum two terms more (r·s, |r|²; stat_terms<2>) and take |s|² from
// the norm's own row sums (norm_ss): one fused multiply-add per element fewer.
//
// dropout's residual forward (kernels/dropout.cu, dropout_fwd_res_stats_*) has no norm: it sums
// all three terms (stat_terms<3>) over its groups of 8, with block_sums.cuh's tree and StatRows.
//
// Order (the CPU's stat_sums): each group of 8 gives its terms as fused multiply-adds from
// +0.0 over its elements in order (stat_terms); the groups' terms are then summed exactly as any
// row sum of the kernel (partial q the sequential sum of its groups' terms, then the tree). The
// row's finish (StatRows::add, the CPU's redundancy::row_cos and quantize) turns the sums into an
// integer, and each block adds its rows' integers to the site's three u64 words with one integer
// atomic per word at its end: integer addition is associative, so the totals do not depend on
// which block finishes first (no float atomics).
#pragma once

#include "dropout_add_norm/block_sums.cuh"

namespace dropout_add_norm {

// Elements per group of the statistics (dropout_add_norm's GROUP; its own name here so that
// kernels/dropout.cu can include this file).
constexpr int STAT_GROUP = 8;

// The terms of one group, r·s, |r|² and (K = 3) |s|²: g = fma(a, b, g) from +0.0 over its first
// cnt elements in order. r(k), s(k): element k's f32 stream value before and after the add.
template <int K, typename FR, typename FS>
__device__ __forceinline__ void stat_terms(const FR& r, const FS& s, int cnt, float (&g)[K]) {
    static_assert(K == 2 || K == 3, "r·s, |r|² and optionally |s|²");
#pragma unroll
    for (int k = 0; k < K; ++k) g[k] = 0.f;
#pragma unroll
    for (int k = 0; k < STAT_GROUP; ++k) {
        if (k < cnt) {
            const float a = r(k), b = s(k);
            g[0] = __fmaf_rn(a, b, g[0]);
            g[1] = __fmaf_rn(a, a, g[1]);
            if constexpr (K == 3) g[K - 1] = __fmaf_rn(b, b, g[K - 1]);
        }
    }
}

// |s|² of a norm forward's row from the norm's own row sums (the CPU's norm_ss): RMSNorm's sum of
// squares as it is; LayerNorm's fma(sum, mean, sq) with sum the row sum of s, mean its quotient by
// cols and sq the sum of (s - mean)² (sq + mean·sum = |s|² - mean (sum - cols mean), the last
// factor the mean's rounding: see cpu::norm_stats_chain for the bound).
__device__ __forceinline__ float norm_ss(bool rms, float sum, float mean, float sq) {
    return rms ? sum : __fmaf_rn(sum, mean, sq);
}

// One block's rows, kept by the thread that finishes them (thread 0) in shared memory (six
// registers fewer across the row loop, where the tiers have none to spare), then its atomics.
struct StatRows {
    long long cos_sum;  // sum of round(cos * 2^32), two's complement in the u64 word
    unsigned long long rows, nonfinite;

    __device__ __forceinline__ void reset() { cos_sum = 0, rows = 0, nonfinite = 0; }

    // redundancy::row_cos then quantize: non-finite sums count apart; a zero r or s is not
    // counted; otherwise the clamped cosine as the integer round_ties_even(cos * 2^32).
    __device__ __forceinline__ void add(float dot, float rr, float ss) {
        if (!(isfinite(dot) && isfinite(rr) && isfinite(ss))) {
            ++nonfinite;
            return;
        }
        if (rr == 0.f || ss == 0.f) return;
        float c = __fdiv_rn(dot, __fmul_rn(__fsqrt_rn(rr), __fsqrt_rn(ss)));
        c = c < -1.f ? -1.f : c;  // Rust's f32::clamp(-1, 1) (the quotient is never NaN here)
        c = c > 1.f ? 1.f : c;
        cos_sum += __float2ll_rn(__fmul_rn(c, 4294967296.f));  // exact multiply, |q| <= 2^32
        ++rows;
    }

    // words: the site's cos_sum, rows, nonfinite (src/redundancy: WORDS_PER_SITE).
    __device__ __forceinline__ void flush(unsigned long long* words) const {
        if (rows != 0) {
            atomicAdd(&words[0], (unsigned long long)cos_sum);
            atomicAdd(&words[1], rows);
        }
        if (nonfinite != 0) atomicAdd(&words[2], nonfinite);
    }
};

// The block's StatRows: only the kernels that call this (the *_stats_* entries) have it.
__device__ __forceinline__ StatRows& stat_rows() {
    __shared__ StatRows rows;
    return rows;
}

}  // namespace dropout_add_norm
