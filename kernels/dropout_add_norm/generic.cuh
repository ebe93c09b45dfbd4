// The generic kernels of dropout_add_norm: any hidden size (1, odd, beyond the register tiers
// of rows.cuh), any alignment. One block per row (forward, grid-stride) or per slab (backward),
// looping over the row's groups of 8 elements with a fixed number of registers: nothing is held
// per row except the running sums. The passes that need the row again (variance, normalise; the
// backward's second pass) take it from dynamic shared memory when it fits (FLAG_SMEM, below) or
// re-read it from global memory, where the row this block just touched is still in L1/L2. Groups
// are loaded as 16-byte vectors when every pointer is 16-byte aligned and cols % 8 == 0
// (FLAG_VEC), element by element otherwise. Included by kernels/dropout_add_norm.cu (the
// parameters, flags and pinned arithmetic are there).
//
// The run-time flags that shape the loop (FLAG_VEC, FLAG_RMS, FLAG_SMEM) are read once per launch
// and select one of eight compiled bodies (fwd / bwd at the end), so no element tests them. Row
// bases are 64-bit, once per row; within a row, group indices are 32-bit (the host keeps cols / 8
// below 2^31). Whole groups run without per-element bounds tests; the tail group of a row with
// cols % 8 != 0 (the last group) alone is predicated (for_groups).
//
// Dynamic shared memory, when FLAG_SMEM: the forward keeps its row of s there for the passes
// after the first, the backward its three arrays of slab partials (dgamma, dbeta, dbias). Element
// k of thread q's j-th group (group q + j * P) lives at word (j * 8 + k) * 256 + q (forward) or
// (j * 24 + a * 8 + k) * 256 + q for array a (backward): a thread's words are a fixed stride of
// 256 apart, so each is one immediate offset from the thread's base (no per-element address
// arithmetic), and for a fixed (j, k) the lanes of a warp touch consecutive words: no bank
// conflicts. The host sizes it as ceil(groups / P) * 8 (or 24) * 256 words. Each thread touches
// only its own words, so no synchronisation is needed. The layout moves values, never the order
// of any addition: the bits are the same with or without shared memory.
#pragma once

#include "dropout_add_norm/block_sums.cuh"

namespace dropout_add_norm {

// Eight elements of T starting at p (cnt <= 8 of them valid; the rest read as 0).
template <typename T>
__device__ __forceinline__ void load8(const T* p, int cnt, bool vec, T (&out)[GROUP]) {
    if (vec && cnt == GROUP) {
        // One 16-byte access for 16-bit types, two for f32.
#pragma unroll
        for (int k = 0; k < (int)(GROUP * sizeof(T) / 16); ++k) {
            const uint4 raw = reinterpret_cast<const uint4*>(p)[k];
            memcpy(&out[k * (16 / sizeof(T))], &raw, 16);
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < GROUP; ++k) out[k] = k < cnt ? p[k] : from_f32<T>(0.f);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const T (&v)[GROUP], int cnt, bool vec) {
    if (vec && cnt == GROUP) {
#pragma unroll
        for (int k = 0; k < (int)(GROUP * sizeof(T) / 16); ++k) {
            uint4 raw;
            memcpy(&raw, &v[k * (16 / sizeof(T))], 16);
            reinterpret_cast<uint4*>(p)[k] = raw;
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < GROUP; ++k)
        if (k < cnt) p[k] = v[k];
}

// Keep bits of elements i .. i+cnt-1 under 16-bit (key8 false) or 8-bit keying: element e takes
// field e % E of Philox block e / E (E = 8 halfwords or 16 bytes, little-endian within the
// block's words: drop::keep_bits16 / keep_bits8). A whole group at a multiple of 8 is theirs;
// otherwise the fields come from blocks i / E .. (i + cnt - 1) / E, at most two.
__device__ __noinline__ uint32_t keep_bits_narrow(uint64_t seed, uint64_t call, uint64_t threshold,
                                                  uint64_t i, int cnt, bool key8) {
    if (cnt == GROUP && (i & 7) == 0)
        return key8 ? drop::keep_bits8<GROUP>(seed, call, threshold, i)
                    : drop::keep_bits16<GROUP>(seed, call, threshold, i);
    if (threshold == 0) return (1u << cnt) - 1u;
    if (threshold >= (key8 ? drop::THRESHOLD8_ALL : drop::THRESHOLD16_ALL)) return 0u;
    const uint32_t t = (uint32_t)threshold;  // 0 < threshold < 2^16 here
    const uint32_t shift = key8 ? 4u : 3u;   // log2 of the elements per block
    const uint32_t width = key8 ? 8u : 16u, per_word = 32u / width, fmask = (1u << width) - 1u;
    const uint64_t end = i + (uint64_t)cnt;
    uint32_t bits = 0;
    for (uint64_t b = i >> shift; b <= (end - 1) >> shift; ++b) {
        const uint4 w = philox_block(seed, call, b);
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
        for (uint32_t l = 0; l < (1u << shift); ++l) {
            const uint64_t e = (b << shift) + l;
            const uint32_t f = (words[l / per_word] >> (width * (l % per_word))) & fmask;
            if (e >= i && e < end && f >= t) bits |= 1u << (uint32_t)(e - i);
        }
    }
    return bits;
}

// Keep bits of elements i .. i+cnt-1 (bit k = element i+k kept), cnt <= 8, with the shared
// keying (common/dropping.cuh) at the resolution of flags (FLAG_KEY16 / FLAG_KEY8: above). A
// whole group at a multiple of 8 (always so when cols % 8 == 0) is drop::keep_bits<8>: two
// Philox blocks. Otherwise (odd row lengths: the group straddles blocks at any offset) the words
// come from blocks i/4 .. (i+cnt-1)/4, at most three, each word compared with the threshold
// exactly as there.
__device__ __forceinline__ uint32_t keep_bits8(uint64_t seed, uint64_t call, uint64_t threshold,
                                               uint64_t i, int cnt, uint32_t flags) {
    if (flags & (drop::FLAG_KEY16 | drop::FLAG_KEY8))
        return keep_bits_narrow(seed, call, threshold, i, cnt, (flags & drop::FLAG_KEY8) != 0);
    if (cnt == GROUP && (i & 7) == 0) return drop::keep_bits<GROUP>(seed, call, threshold, i);
    if (threshold == 0) return (1u << cnt) - 1u;
    if (threshold >= THRESHOLD_ALL) return 0u;
    const uint32_t t = (uint32_t)threshold;  // 0 < threshold < 2^32 here
    const uint64_t end = i + (uint64_t)cnt;
    uint32_t bits = 0;
    for (uint64_t b = i >> 2; b <= (end - 1) >> 2; ++b) {
        const uint4 w = philox_block(seed, call, b);
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const uint64_t e = 4 * b + (uint64_t)l;
            if (e >= i && e < end && words[l] >= t) bits |= 1u << (uint32_t)(e - i);
        }
    }
    return bits;
}

// The keep bits of a group: `ALIGNED` (the vector path: cols % 8 == 0, so every group is whole
// and starts at a multiple of 8) goes straight to the shared keying's whole-group functions, the
// resolution read from the flags once per group (a uniform branch); otherwise keep_bits8 above.
template <bool ALIGNED>
__device__ __forceinline__ uint32_t group_keep(uint64_t seed, uint64_t call, uint64_t threshold, uint64_t i,
                                               int cnt, uint32_t flags) {
    if constexpr (ALIGNED) {
        if (flags & drop::FLAG_KEY16) return drop::keep_bits16<GROUP>(seed, call, threshold, i);
        if (flags & drop::FLAG_KEY8) return drop::keep_bits8<GROUP>(seed, call, threshold, i);
        return drop::keep_bits<GROUP>(seed, call, threshold, i);
    } else {
        return keep_bits8(seed, call, threshold, i, cnt, flags);
    }
}

// xhat = (v - mean) * rstd (LayerNorm) or v * rstd (RMSNorm).
template <bool RMS>
__device__ __forceinline__ float normalise(float v, float mean, float rstd) {
    return RMS ? __fmul_rn(v, rstd) : __fmul_rn(__fsub_rn(v, mean), rstd);
}

// A whole group (compile-time cnt = 8: no per-element tests) or the row's tail group.
template <bool B> struct Whole {
    static constexpr bool value = B;
};

// Visits this thread's groups of a row in order: g = q, q + P, ... over the whole groups, then the
// tail group (cols % 8 != 0: the last group, owned by thread full % P, the last in its order), so
// every sum keeps its sequential order. body(Whole<true/false>{}, g, cnt, j): j counts the
// thread's groups (its slot in the shared-memory layout above).
template <typename F>
__device__ __forceinline__ void for_groups(uint32_t full, int tail, F&& body) {
    uint32_t j = 0;
    for (uint32_t g = threadIdx.x; g < full; g += blockDim.x, ++j) body(Whole<true>{}, g, GROUP, j);
    if (tail != 0 && full % blockDim.x == threadIdx.x) body(Whole<false>{}, full, tail, j);
}

// One row per block (grid-stride over rows), blockDim.x = row_partials(cols) threads, the run-time
// flags (VEC, RMS, SMEM) compiled in by fwd below. STATS: the Block Influence statistics too
// (stats.cuh; the *_stats_* entries only).
template <typename T, typename S, bool STATS, bool VEC, bool RMS, bool CACHED>
__device__ __forceinline__ void fwd_impl(const FwdParams<T, S>& p, float (*s_warp)[MAX_THREADS / 32],
                                         [[maybe_unused]] float (*s_stat)[MAX_THREADS / 32]) {
    if constexpr (STATS) {
        if (threadIdx.x == 0) stat_rows().reset();  // read and written by thread 0 only
    }
    const bool has_beta = p.flags & FLAG_BETA, norm_only = p.flags & FLAG_NORM_ONLY;
    const bool has_bias = p.bias != nullptr, has_res = p.residual != nullptr;
    // The host keeps cols / 8 below 2^31 (gpu.rs), so group indices are 32-bit.
    const uint32_t full = (uint32_t)(p.cols / GROUP);
    const int tail = (int)(p.cols % GROUP);
    const float n = (float)p.cols;
    // Element k of this thread's j-th group in the row cache (CACHED).
    float* const sm = dyn_smem + threadIdx.x;
    auto slot = [&](uint32_t j, int k) -> float& { return sm[(j * GROUP + (uint32_t)k) * MAX_THREADS]; };
    for (uint64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float rowm = row_multiplier(p, row);
        const uint64_t base = row * p.cols;  // the row's first element (64-bit once per row)
        const T* const xr = p.x + base;
        const S* const rin_row = norm_only ? p.s + base : has_res ? p.residual + base : nullptr;
        S* const sr = p.s + base;
        const bool drops = rowm != 0.f && !norm_only;

        // Pass 1: s = residual + m * (x + bias), stored; the first row sum (of s, or of s^2 for
        // RMSNorm) over the stored, rounded s, which is what the backward will read.
        float acc[1] = {0.f};
        [[maybe_unused]] float st[2] = {0.f, 0.f};  // STATS: this partial's r·s, |r|² (|s|²: norm_ss)
        for_groups(full, tail, [&](auto whole, uint32_t g, int cnt_in, uint32_t j) {
            const int cnt = decltype(whole)::value ? GROUP : cnt_in;
            const uint64_t c0 = (uint64_t)g * GROUP, i = base + c0;
            S sv[GROUP];
            if (has_res || norm_only) load8(rin_row + c0, cnt, VEC, sv);
            else {
#pragma unroll
                for (int k = 0; k < GROUP; ++k) sv[k] = from_f32<S>(0.f);
            }
            // A dropped element keeps the residual's bits and reads no x; rowm == 0 (dropped
            // row, p = 1) drops all. In norm-only mode s is read as it is.
            [[maybe_unused]] float rin[GROUP];  // STATS: the stream before the add
            if constexpr (STATS) {
#pragma unroll
                for (int k = 0; k < GROUP; ++k) rin[k] = to_f32(sv[k]);
            }
            const uint32_t keep = drops ? group_keep<VEC>(p.seed, p.call, p.threshold, i, cnt, p.flags) : 0u;
            if (keep != 0u) {
                T xv[GROUP], bv[GROUP];
                load8(xr + c0, cnt, VEC, xv);
                if (has_bias) load8(p.bias + c0, cnt, VEC, bv);
#pragma unroll
                for (int k = 0; k < GROUP; ++k) {
                    float t = to_f32(xv[k]);
                    if (has_bias) t = __fadd_rn(t, to_f32(bv[k]));
                    const float r = has_res ? to_f32(sv[k]) : 0.f;
                    const S kept = from_f32<S>(__fmaf_rn(t, rowm, r));
                    sv[k] = (keep >> k) & 1u ? kept : sv[k];  // a select, not a branch
                }
            }
            if (!norm_only) store8(sr + c0, sv, cnt, VEC);
            if constexpr (STATS) {
                float gt[2];
                stat_terms([&](int k) { return rin[k]; }, [&](int k) { return to_f32(sv[k]); }, cnt, gt);
#pragma unroll
                for (int k = 0; k < 2; ++k) st[k] = __fadd_rn(st[k], gt[k]);
            }
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                if (k < cnt) {
                    const float v = to_f32(sv[k]);
                    if constexpr (CACHED) slot(j, k) = v;
                    acc[0] = __fadd_rn(acc[0], RMS ? __fmul_rn(v, v) : v);
                }
            }
        });
        block_sums<1>(acc, s_warp);
        if constexpr (STATS) {
            block_sums<2>(st, s_stat);
        }

        // The stream values v = f32(s) of a group: from the row cache, or re-read from global
        // memory (the s this thread itself wrote in pass 1).
        auto values = [&](uint32_t g, int cnt, uint32_t j, float (&v)[GROUP]) {
            if constexpr (CACHED) {
#pragma unroll
                for (int k = 0; k < GROUP; ++k) v[k] = k < cnt ? slot(j, k) : 0.f;
            } else {
                S sv[GROUP];
                load8(sr + (uint64_t)g * GROUP, cnt, VEC, sv);
#pragma unroll
                for (int k = 0; k < GROUP; ++k) v[k] = to_f32(sv[k]);
            }
        };

        float mean = 0.f, rstd;
        [[maybe_unused]] float sq = 0.f;  // LayerNorm: the sum of (s - mean)²
        if constexpr (RMS) {
            rstd = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(acc[0], n), p.eps)));
        } else {
            // Pass 2: the variance around the mean (two passes: no cancellation of E[s^2] -
            // mean^2), over this thread's own values of pass 1.
            mean = __fdiv_rn(acc[0], n);
            float acc2[1] = {0.f};
            for_groups(full, tail, [&](auto whole, uint32_t g, int cnt_in, uint32_t j) {
                const int cnt = decltype(whole)::value ? GROUP : cnt_in;
                float v[GROUP];
                values(g, cnt, j, v);
#pragma unroll
                for (int k = 0; k < GROUP; ++k) {
                    if (k < cnt) {
                        const float d = __fsub_rn(v[k], mean);
                        acc2[0] = __fadd_rn(acc2[0], __fmul_rn(d, d));
                    }
                }
            });
            block_sums<1>(acc2, s_warp);
            sq = acc2[0];
            rstd = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(acc2[0], n), p.eps)));
        }
        if constexpr (STATS) {
            if (threadIdx.x == 0) stat_rows().add(st[0], st[1], norm_ss(RMS, acc[0], mean, sq));
        }
        if (threadIdx.x == 0) {
            p.mean[row] = mean;
            p.rstd[row] = rstd;
        }

        // Pass 3: out = T((xhat * gamma + beta) * layer_scale).
        T* const outr = p.out + base;
        for_groups(full, tail, [&](auto whole, uint32_t g, int cnt_in, uint32_t j) {
            const int cnt = decltype(whole)::value ? GROUP : cnt_in;
            const uint64_t c0 = (uint64_t)g * GROUP;
            float v[GROUP];
            T gv[GROUP], bv[GROUP], ov[GROUP];
            values(g, cnt, j, v);
            load8(p.gamma + c0, cnt, VEC, gv);
            if (has_beta) load8(p.beta + c0, cnt, VEC, bv);
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                const float xh = normalise<RMS>(v[k], mean, rstd);
                const float y = has_beta ? __fmaf_rn(xh, to_f32(gv[k]), to_f32(bv[k]))
                                         : __fmul_rn(xh, to_f32(gv[k]));
                ov[k] = from_f32<T>(__fmul_rn(y, p.layer_scale));
            }
            store8(outr + c0, ov, cnt, VEC);
        });
    }
    if constexpr (STATS) {
        if (threadIdx.x == 0) stat_rows().flush(p.stats);
    }
}

// The generic forward: the run-time flags read once, each combination its own compiled body.
template <typename T, typename S, bool STATS = false>
__device__ __forceinline__ void fwd(const FwdParams<T, S>& p) {
    __shared__ float s_warp[2][MAX_THREADS / 32];
    [[maybe_unused]] __shared__ float s_stat[STATS ? 2 : 1][MAX_THREADS / 32];
    const bool vec = p.flags & FLAG_VEC, rms = p.flags & FLAG_RMS, cached = p.flags & FLAG_SMEM;
    if (vec) {
        if (rms) cached ? fwd_impl<T, S, STATS, true, true, true>(p, s_warp, s_stat)
                        : fwd_impl<T, S, STATS, true, true, false>(p, s_warp, s_stat);
        else cached ? fwd_impl<T, S, STATS, true, false, true>(p, s_warp, s_stat)
                    : fwd_impl<T, S, STATS, true, false, false>(p, s_warp, s_stat);
    } else {
        if (rms) cached ? fwd_impl<T, S, STATS, false, true, true>(p, s_warp, s_stat)
                        : fwd_impl<T, S, STATS, false, true, false>(p, s_warp, s_stat);
        else cached ? fwd_impl<T, S, STATS, false, false, true>(p, s_warp, s_stat)
                    : fwd_impl<T, S, STATS, false, false, false>(p, s_warp, s_stat);
    }
}

// One slab of rows per block (grid.x = slabs), blockDim.x = row_partials(cols) threads. Thread q
// owns the columns of groups q, q + P, ...: it alone updates their (slab, column) partials, so
// they need no synchronisation. They are accumulated in shared memory when they fit (SMEM: the
// host checks the device's limit; zeroed first, as 0 + v is what the first row adds anyway) and
// copied out at the end of the slab, else directly in global memory; the order of the additions,
// and so the bits, are the same.
template <typename T, typename S, bool VEC, bool RMS, bool SMEM>
__device__ __forceinline__ void bwd_impl(const BwdParams<T, S>& p, float (*s_warp)[MAX_THREADS / 32]) {
    const uint32_t full = (uint32_t)(p.cols / GROUP);
    const int tail = (int)(p.cols % GROUP);
    const float n = (float)p.cols;
    const uint64_t slab = blockIdx.x;
    const uint64_t row0 = slab * p.slab_rows, row1 = min(row0 + p.slab_rows, p.rows);
    float* glob_g = p.partials + (0 * p.slabs + slab) * p.cols;
    float* glob_b = p.partials + (1 * p.slabs + slab) * p.cols;
    float* glob_t = p.partials + (2 * p.slabs + slab) * p.cols;
    const bool has_ds = p.d_s != nullptr, has_dres = p.d_residual != nullptr;
    // The partial of column 8 g + k (this thread's j-th group) of array a (0: dgamma, 1: dbeta,
    // 2: dbias): in shared memory (the layout above), else in global memory in column order.
    float* const sm = dyn_smem + threadIdx.x;
    auto part = [&](int a, uint32_t g, uint32_t j, int k) -> float& {
        if constexpr (SMEM) return sm[(j * 3 * GROUP + (uint32_t)(a * GROUP + k)) * MAX_THREADS];
        else return (a == 0 ? glob_g : a == 1 ? glob_b : glob_t)[(uint64_t)g * GROUP + (uint64_t)k];
    };
    if constexpr (SMEM) {
        for_groups((p.cols + GROUP - 1) / GROUP, 0, [&](auto, uint32_t, int, uint32_t j) {
#pragma unroll
            for (int k = 0; k < 3 * GROUP; ++k) sm[(j * 3 * GROUP + (uint32_t)k) * MAX_THREADS] = 0.f;
        });
    }
    for (uint64_t row = row0; row < row1; ++row) {
        const bool first = !SMEM && row == row0;  // the slab's global partials start from +0
        const float rowm = row_multiplier(p, row);
        const float mean = p.mean[row], rstd = p.rstd[row];
        const uint64_t base = row * p.cols;
        const S* const sr = p.s + base;
        const T* const dr = p.d_out + base;
        const S* const dsr = has_ds ? p.d_s + base : nullptr;
        S* const drr = has_dres ? p.d_residual + base : nullptr;
        T* const dxr = p.dx + base;

        // Pass A: xhat, g = d_out * layer_scale, w = g * gamma; the row sums of xhat * w and of
        // w; the dgamma (g * xhat) and dbeta (g) partials.
        float acc[2] = {0.f, 0.f};
        for_groups(full, tail, [&](auto whole, uint32_t gi, int cnt_in, uint32_t j) {
            const int cnt = decltype(whole)::value ? GROUP : cnt_in;
            const uint64_t c0 = (uint64_t)gi * GROUP;
            S sv[GROUP];
            T dv[GROUP], gv[GROUP];
            load8(sr + c0, cnt, VEC, sv);
            load8(dr + c0, cnt, VEC, dv);
            load8(p.gamma + c0, cnt, VEC, gv);
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                if (k < cnt) {
                    const float xh = normalise<RMS>(to_f32(sv[k]), mean, rstd);
                    const float g = __fmul_rn(to_f32(dv[k]), p.layer_scale);
                    const float w = __fmul_rn(g, to_f32(gv[k]));
                    acc[0] = __fadd_rn(acc[0], __fmul_rn(xh, w));
                    acc[1] = __fadd_rn(acc[1], w);
                    float& pg = part(0, gi, j, k);
                    float& pb = part(1, gi, j, k);
                    pg = __fadd_rn(first ? 0.f : pg, __fmul_rn(g, xh));
                    pb = __fadd_rn(first ? 0.f : pb, g);
                }
            }
        });
        block_sums<2>(acc, s_warp);
        const float c1 = __fdiv_rn(acc[0], n);
        const float c2 = RMS ? 0.f : __fdiv_rn(acc[1], n);

        // Pass B: ds = (w - u) * rstd (+ d_s), d_residual = S(ds), dx = T(m * ds), dbias partials.
        for_groups(full, tail, [&](auto whole, uint32_t gi, int cnt_in, uint32_t j) {
            const int cnt = decltype(whole)::value ? GROUP : cnt_in;
            const uint64_t c0 = (uint64_t)gi * GROUP, i = base + c0;
            S sv[GROUP], dsv[GROUP], drv[GROUP];
            T dv[GROUP], gv[GROUP], dxv[GROUP];
            load8(sr + c0, cnt, VEC, sv);
            load8(dr + c0, cnt, VEC, dv);
            load8(p.gamma + c0, cnt, VEC, gv);
            if (has_ds) load8(dsr + c0, cnt, VEC, dsv);
            const uint32_t keep = rowm != 0.f ? group_keep<VEC>(p.seed, p.call, p.threshold, i, cnt, p.flags) : 0u;
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                const float xh = normalise<RMS>(to_f32(sv[k]), mean, rstd);
                const float g = __fmul_rn(to_f32(dv[k]), p.layer_scale);
                const float w = __fmul_rn(g, to_f32(gv[k]));
                const float u = RMS ? __fmul_rn(xh, c1) : __fmaf_rn(xh, c1, c2);
                float ds = __fmul_rn(__fsub_rn(w, u), rstd);
                if (has_ds) ds = __fadd_rn(ds, to_f32(dsv[k]));
                drv[k] = from_f32<S>(ds);
                const float m = ((keep >> k) & 1u) ? rowm : 0.f;
                const float dt = m != 0.f ? __fmul_rn(ds, m) : 0.f;
                dxv[k] = from_f32<T>(dt);
                if (k < cnt) {
                    float& pt = part(2, gi, j, k);
                    pt = __fadd_rn(first ? 0.f : pt, dt);
                }
            }
            if (has_dres) store8(drr + c0, drv, cnt, VEC);
            store8(dxr + c0, dxv, cnt, VEC);
        });
    }
    if constexpr (SMEM) {
        // The slab's partials out, each thread its own columns (coalesced within a group).
        for_groups(full, tail, [&](auto whole, uint32_t gi, int cnt_in, uint32_t j) {
            const int cnt = decltype(whole)::value ? GROUP : cnt_in;
            const uint64_t c0 = (uint64_t)gi * GROUP;
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                if (k < cnt) {
                    glob_g[c0 + k] = part(0, gi, j, k);
                    glob_b[c0 + k] = part(1, gi, j, k);
                    glob_t[c0 + k] = part(2, gi, j, k);
                }
            }
        });
    }
}

// The generic backward: the run-time flags read once, each combination its own compiled body.
template <typename T, typename S>
__device__ __forceinline__ void bwd(const BwdParams<T, S>& p) {
    __shared__ float s_warp[2][MAX_THREADS / 32];
    const bool vec = p.flags & FLAG_VEC, rms = p.flags & FLAG_RMS, smem = p.flags & FLAG_SMEM;
    if (vec) {
        if (rms) smem ? bwd_impl<T, S, true, true, true>(p, s_warp)
                      : bwd_impl<T, S, true, true, false>(p, s_warp);
        else smem ? bwd_impl<T, S, true, false, true>(p, s_warp)
                  : bwd_impl<T, S, true, false, false>(p, s_warp);
    } else {
        if (rms) smem ? bwd_impl<T, S, false, true, true>(p, s_warp)
                      : bwd_impl<T, S, false, true, false>(p, s_warp);
        else smem ? bwd_impl<T, S, false, false, true>(p, s_warp)
                  : bwd_impl<T, S, false, false, false>(p, s_warp);
    }
}

}  // namespace dropout_add_norm
