// The generic kernels of dropout_add_norm: any hidden size (1, odd, beyond the register tiers
// of rows.cuh), any alignment. One block per row (forward, grid-stride) or per slab (backward),
// looping over the row's groups of 8 elements with a fixed number of registers: nothing is held
// per row except the running sums. The passes that need the row again (variance, normalise; the
// backward's second pass) take it from dynamic shared memory when it fits (FLAG_SMEM, below) or
// re-read it from global memory, where the row this block just touched is still in L1/L2. Groups
// are loaded as 16-byte vectors when every pointer is 16-byte aligned and cols % 8 == 0
// (FLAG_VEC), element by element otherwise. Every index is 64-bit. Included by
// kernels/dropout_add_norm.cu (the parameters, flags and pinned arithmetic are there).
//
// Dynamic shared memory, when FLAG_SMEM: the forward keeps its row of s there for the passes
// after the first, the backward its three arrays of slab partials (dgamma, dbeta, dbias). Each
// array has 8 * groups floats (cols rounded up to a multiple of 8) and is stored transposed:
// element k of group gi lives at smem_index(k, gi, groups) = k * groups + gi. The threads of a
// warp own consecutive groups, so for a fixed k they touch consecutive words: no bank conflicts.
// (Stored in column order, c0 + k, the 32 lanes would hit 4 banks 8 ways deep: the 8-way
// conflicts cost more shared-memory cycles than the op moves bytes.) Each thread touches only its
// own groups, so no synchronisation is needed. The layout moves values, never the order of any
// addition: the bits are the same with or without shared memory.
#pragma once

#include "dropout_add_norm/block_sums.cuh"

namespace dropout_add_norm {

// Where element k of group gi sits in one shared-memory array (see above).
__device__ __forceinline__ uint64_t smem_index(int k, uint64_t gi, uint64_t groups) {
    return (uint64_t)k * groups + gi;
}

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

// xhat = (v - mean) * rstd (LayerNorm) or v * rstd (RMSNorm).
__device__ __forceinline__ float normalise(float v, float mean, float rstd, bool rms) {
    return rms ? __fmul_rn(v, rstd) : __fmul_rn(__fsub_rn(v, mean), rstd);
}

// The stream values v = f32(s) of group gi (first column c0): from the row cached in shared
// memory, or re-read from global memory (the s this thread itself wrote in pass 1).
template <typename S>
__device__ __forceinline__ void group_values(const S* s, uint64_t gi, uint64_t groups, uint64_t c0, int cnt,
                                             bool vec, bool cached, float (&v)[GROUP]) {
    if (cached) {
#pragma unroll
        for (int k = 0; k < GROUP; ++k) v[k] = k < cnt ? dyn_smem[smem_index(k, gi, groups)] : 0.f;
    } else {
        S sv[GROUP];
        load8(s + c0, cnt, vec, sv);
#pragma unroll
        for (int k = 0; k < GROUP; ++k) v[k] = to_f32(sv[k]);
    }
}

// One row per block (grid-stride over rows), blockDim.x = row_partials(cols) threads. STATS: the
// Block Influence statistics too (stats.cuh; the *_stats_* entries only).
template <typename T, typename S, bool STATS = false>
__device__ __forceinline__ void fwd(const FwdParams<T, S>& p) {
    __shared__ float s_warp[2][MAX_THREADS / 32];
    if constexpr (STATS) {
        if (threadIdx.x == 0) stat_rows().reset();  // read and written by thread 0 only
    }
    const bool vec = p.flags & FLAG_VEC, rms = p.flags & FLAG_RMS, has_beta = p.flags & FLAG_BETA;
    const bool norm_only = p.flags & FLAG_NORM_ONLY, cached = p.flags & FLAG_SMEM;
    const uint64_t groups = (p.cols + GROUP - 1) / GROUP;
    const float n = (float)p.cols;
    for (uint64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float rowm = row_multiplier(p, row);
        const uint64_t base = row * p.cols;

        // Pass 1: s = residual + m * (x + bias), stored; the first row sum (of s, or of s^2 for
        // RMSNorm) over the stored, rounded s, which is what the backward will read.
        float acc[1] = {0.f};
        [[maybe_unused]] float st[2] = {0.f, 0.f};  // STATS: this partial's r·s, |r|² (|s|²: norm_ss)
        for (uint64_t g = threadIdx.x; g < groups; g += blockDim.x) {
            const uint64_t c0 = g * GROUP, i = base + c0;
            const int cnt = (int)min((uint64_t)GROUP, p.cols - c0);
            S sv[GROUP];
            if (p.residual != nullptr || norm_only) load8(norm_only ? p.s + i : p.residual + i, cnt, vec, sv);
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
            const uint32_t keep =
                rowm != 0.f && !norm_only ? keep_bits8(p.seed, p.call, p.threshold, i, cnt, p.flags) : 0u;
            if (keep != 0u) {
                T xv[GROUP], bv[GROUP];
                load8(p.x + i, cnt, vec, xv);
                if (p.bias != nullptr) load8(p.bias + c0, cnt, vec, bv);
#pragma unroll
                for (int k = 0; k < GROUP; ++k) {
                    if ((keep >> k) & 1u) {
                        float t = to_f32(xv[k]);
                        if (p.bias != nullptr) t = __fadd_rn(t, to_f32(bv[k]));
                        const float r = p.residual != nullptr ? to_f32(sv[k]) : 0.f;
                        sv[k] = from_f32<S>(__fmaf_rn(t, rowm, r));
                    }
                }
            }
            if (!norm_only) store8(p.s + i, sv, cnt, vec);
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
                    if (cached) dyn_smem[smem_index(k, g, groups)] = v;
                    acc[0] = __fadd_rn(acc[0], rms ? __fmul_rn(v, v) : v);
                }
            }
        }
        block_sums<1>(acc, s_warp);
        if constexpr (STATS) {
            __shared__ float s_stat[2][MAX_THREADS / 32];
            block_sums<2>(st, s_stat);
        }

        float mean = 0.f, rstd;
        [[maybe_unused]] float sq = 0.f;  // LayerNorm: the sum of (s - mean)²
        if (rms) {
            rstd = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(acc[0], n), p.eps)));
        } else {
            // Pass 2: the variance around the mean (two passes: no cancellation of E[s^2] -
            // mean^2), over this thread's own values of pass 1.
            mean = __fdiv_rn(acc[0], n);
            float acc2[1] = {0.f};
            for (uint64_t g = threadIdx.x; g < groups; g += blockDim.x) {
                const uint64_t c0 = g * GROUP;
                const int cnt = (int)min((uint64_t)GROUP, p.cols - c0);
                float v[GROUP];
                group_values(p.s + base, g, groups, c0, cnt, vec, cached, v);
#pragma unroll
                for (int k = 0; k < GROUP; ++k) {
                    if (k < cnt) {
                        const float d = __fsub_rn(v[k], mean);
                        acc2[0] = __fadd_rn(acc2[0], __fmul_rn(d, d));
                    }
                }
            }
            block_sums<1>(acc2, s_warp);
            sq = acc2[0];
            rstd = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(acc2[0], n), p.eps)));
        }
        if constexpr (STATS) {
            if (threadIdx.x == 0) stat_rows().add(st[0], st[1], norm_ss(rms, acc[0], mean, sq));
        }
        if (threadIdx.x == 0) {
            p.mean[row] = mean;
            p.rstd[row] = rstd;
        }

        // Pass 3: out = T((xhat * gamma + beta) * layer_scale).
        for (uint64_t g = threadIdx.x; g < groups; g += blockDim.x) {
            const uint64_t c0 = g * GROUP, i = base + c0;
            const int cnt = (int)min((uint64_t)GROUP, p.cols - c0);
            float v[GROUP];
            T gv[GROUP], bv[GROUP], ov[GROUP];
            group_values(p.s + base, g, groups, c0, cnt, vec, cached, v);
            load8(p.gamma + c0, cnt, vec, gv);
            if (has_beta) load8(p.beta + c0, cnt, vec, bv);
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                const float xh = normalise(v[k], mean, rstd, rms);
                const float y = has_beta ? __fmaf_rn(xh, to_f32(gv[k]), to_f32(bv[k]))
                                         : __fmul_rn(xh, to_f32(gv[k]));
                ov[k] = from_f32<T>(__fmul_rn(y, p.layer_scale));
            }
            store8(p.out + i, ov, cnt, vec);
        }
    }
    if constexpr (STATS) {
        if (threadIdx.x == 0) stat_rows().flush(p.stats);
    }
}

// One slab of rows per block (grid.x = slabs), blockDim.x = row_partials(cols) threads. Thread q
// owns the columns of groups q, q + P, ...: it alone updates their (slab, column) partials, so
// they need no synchronisation. They are accumulated in shared memory when 3 * cols floats fit
// (FLAG_SMEM: the host checks the device's limit) and copied out at the end of the slab, else
// directly in global memory; the order of the additions, and so the bits, are the same.
template <typename T, typename S>
__device__ __forceinline__ void bwd(const BwdParams<T, S>& p) {
    __shared__ float s_warp[2][MAX_THREADS / 32];
    const bool vec = p.flags & FLAG_VEC, rms = p.flags & FLAG_RMS;
    const uint64_t groups = (p.cols + GROUP - 1) / GROUP;
    const float n = (float)p.cols;
    const uint64_t slab = blockIdx.x;
    const uint64_t row0 = slab * p.slab_rows, row1 = min(row0 + p.slab_rows, p.rows);
    float* glob_g = p.partials + (0 * p.slabs + slab) * p.cols;
    float* glob_b = p.partials + (1 * p.slabs + slab) * p.cols;
    float* glob_t = p.partials + (2 * p.slabs + slab) * p.cols;
    const bool smem = p.flags & FLAG_SMEM;
    // Partial of column c0 + k of group gi: transposed in shared memory, in column order in global.
    float* part_g = smem ? dyn_smem : glob_g;
    float* part_b = smem ? dyn_smem + GROUP * groups : glob_b;
    float* part_t = smem ? dyn_smem + 2 * GROUP * groups : glob_t;
    auto at = [&](int k, uint64_t gi) { return smem ? smem_index(k, gi, groups) : gi * GROUP + (uint64_t)k; };
    for (uint64_t row = row0; row < row1; ++row) {
        const bool first = row == row0;  // the slab's partials start from +0
        const float rowm = row_multiplier(p, row);
        const float mean = p.mean[row], rstd = p.rstd[row];
        const uint64_t base = row * p.cols;

        // Pass A: xhat, g = d_out * layer_scale, w = g * gamma; the row sums of xhat * w and of
        // w; the dgamma (g * xhat) and dbeta (g) partials.
        float acc[2] = {0.f, 0.f};
        for (uint64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
            const uint64_t c0 = gi * GROUP, i = base + c0;
            const int cnt = (int)min((uint64_t)GROUP, p.cols - c0);
            S sv[GROUP];
            T dv[GROUP], gv[GROUP];
            load8(p.s + i, cnt, vec, sv);
            load8(p.d_out + i, cnt, vec, dv);
            load8(p.gamma + c0, cnt, vec, gv);
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                if (k < cnt) {
                    const float xh = normalise(to_f32(sv[k]), mean, rstd, rms);
                    const float g = __fmul_rn(to_f32(dv[k]), p.layer_scale);
                    const float w = __fmul_rn(g, to_f32(gv[k]));
                    acc[0] = __fadd_rn(acc[0], __fmul_rn(xh, w));
                    acc[1] = __fadd_rn(acc[1], w);
                    const uint64_t c = at(k, gi);
                    part_g[c] = __fadd_rn(first ? 0.f : part_g[c], __fmul_rn(g, xh));
                    part_b[c] = __fadd_rn(first ? 0.f : part_b[c], g);
                }
            }
        }
        block_sums<2>(acc, s_warp);
        const float c1 = __fdiv_rn(acc[0], n);
        const float c2 = rms ? 0.f : __fdiv_rn(acc[1], n);

        // Pass B: ds = (w - u) * rstd (+ d_s), d_residual = S(ds), dx = T(m * ds), dbias partials.
        for (uint64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
            const uint64_t c0 = gi * GROUP, i = base + c0;
            const int cnt = (int)min((uint64_t)GROUP, p.cols - c0);
            S sv[GROUP], dsv[GROUP], drv[GROUP];
            T dv[GROUP], gv[GROUP], dxv[GROUP];
            load8(p.s + i, cnt, vec, sv);
            load8(p.d_out + i, cnt, vec, dv);
            load8(p.gamma + c0, cnt, vec, gv);
            if (p.d_s != nullptr) load8(p.d_s + i, cnt, vec, dsv);
            const uint32_t keep = rowm != 0.f ? keep_bits8(p.seed, p.call, p.threshold, i, cnt, p.flags) : 0u;
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                const float xh = normalise(to_f32(sv[k]), mean, rstd, rms);
                const float g = __fmul_rn(to_f32(dv[k]), p.layer_scale);
                const float w = __fmul_rn(g, to_f32(gv[k]));
                const float u = rms ? __fmul_rn(xh, c1) : __fmaf_rn(xh, c1, c2);
                float ds = __fmul_rn(__fsub_rn(w, u), rstd);
                if (p.d_s != nullptr) ds = __fadd_rn(ds, to_f32(dsv[k]));
                drv[k] = from_f32<S>(ds);
                const float m = ((keep >> k) & 1u) ? rowm : 0.f;
                const float dt = m != 0.f ? __fmul_rn(ds, m) : 0.f;
                dxv[k] = from_f32<T>(dt);
                if (k < cnt) {
                    const uint64_t c = at(k, gi);
                    part_t[c] = __fadd_rn(first ? 0.f : part_t[c], dt);
                }
            }
            if (p.d_residual != nullptr) store8(p.d_residual + i, drv, cnt, vec);
            store8(p.dx + i, dxv, cnt, vec);
        }
    }
    if (smem) {
        // The slab's partials out, each thread its own columns (coalesced within a group).
        for (uint64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
            const uint64_t c0 = gi * GROUP;
            const int cnt = (int)min((uint64_t)GROUP, p.cols - c0);
            for (int k = 0; k < cnt; ++k) {
                const uint64_t c = smem_index(k, gi, groups);
                glob_g[c0 + k] = part_g[c];
                glob_b[c0 + k] = part_b[c];
                glob_t[c0 + k] = part_t[c];
            }
        }
    }
}

}  // namespace dropout_add_norm
