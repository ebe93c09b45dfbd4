// Dropout with an optional bias before it and an optional residual after it (in place or not),
// forward and backward, and the unfused baseline: one op, one kernel family.
//
//   y  = m(row, i) * (x + bias[col])                    no residual
//   y  = residual + m(row, i) * (x + bias[col])         with a residual (y may be the residual)
//   dx = m(row, i) * dy      dbias[col] = sum over rows of dx (f32)      dresidual = dy
//   m(row, i) = keep(seed, call, i) ? scale * rowscale[row] : 0
//
// The arithmetic is pinned so that src/dropout/cpu.rs reproduces it bit for bit (see the module
// docs of src/dropout/mod.rs): t = x + b (one f32 add; t = x without bias), rowm = scale * rs
// (one f32 multiply per row; rowm = scale without a row scale), and
//   no residual:   y = m != 0 ? T(t * m) : +0        (a dropped element is exactly +0)
//   residual:      y = m != 0 ? T(fma(t, m, r)) : r  (a dropped element keeps the residual's bits)
// whatever x holds (inf, NaN). The backward is the shared one (common/dropping.cuh: dropout_bwd,
// dx = m != 0 ? T(dy * m) : 0, deterministic dbias), instantiated here under this file's stem;
// so is the unfused baseline, plus its residual add.
//
// Launch shape: grid.x walks column tiles (blockDim.x threads, V consecutive columns each),
// grid.y walks row slabs of `slab_rows` rows; every thread loops over the rows of its slab,
// UNROLL rows' loads in flight before their math. There is no 64-bit division per element: the
// flat index of a thread's first element in a row is base + row * cols + c0. Every index and
// size is 64-bit. Every thread of a block runs the same tile, chunk and row loops (threads past
// the last column only skip memory accesses), which the shared-memory staging (__syncthreads) and
// the warp-level mask writes (__shfl_down_sync, __ballot_sync) rely on; whether a group of rows
// is dropped is decided per block, so those branches are uniform too. blockDim.x is a multiple
// of 32 (checked on the host).
//
// Keying: every resolution of the shared contract (32-, 16- or 8-bit: FLAG_KEY16 / FLAG_KEY8 in
// p.flags, dispatched once per thread to a variant compiled for it), with and without a residual.
#include "common/dropping.cuh"
#include "dropout_add_norm/stats.cuh"

using namespace fusedreg;
using namespace fusedreg::drop;

namespace dropout {

constexpr uint32_t FLAG_IN_PLACE = 4u;  // y == residual: dropped rows are not touched at all

template <typename T> struct FwdParams {
    const T* x;
    const T* bias;           // [cols]; null when absent
    const T* residual;       // null without a residual (the RES = false kernels ignore it)
    T* y;                    // may equal residual (FLAG_IN_PLACE)
    const float* rowscale;   // [rows] from the caller; null when absent or generated
    float* rowscale_out;     // [rows]: the generated row scale, when non-null
    uint32_t* mask;          // [ceil(rows*cols/32)] 1-bit keep mask, when non-null
    uint64_t rows, cols, slab_rows;
    uint64_t seed, call, threshold;
    uint64_t path_call, path_threshold;
    uint64_t base;            // flat index of element 0 of this launch (RNG keying only)
    float scale, path_scale;  // DropRate::scale() of p and of p_path
    uint32_t flags;           // FLAG_DROP_PATH, FLAG_UNROLL, FLAG_IN_PLACE, FLAG_KEY16, FLAG_KEY8
    uint32_t rows_per_sample;  // drop path: rows sharing one draw (>= 1)
};

// One row visit of the forward: y = keep ? T(t * m) : +0, or with a residual keep ? T(fma(t, m,
// r)) : r (the residual's bits), t = x + b (b = -0.0 without a bias: x + -0.0 is x for every
// non-NaN x, and a NaN gives the canonical NaN either way after the multiply); an element is kept
// when its key says so and the row is live (rowm != 0). 16-bit types convert a pair at once (pack2, the same bits as one at a
// time); a dropped element of the residual variant takes its half of the residual's word.
template <typename T, int V, bool RES, typename K>
__device__ __forceinline__ Pack<T, V> fwd_math(const Pack<T, V>& xv, const Pack<T, V>& rv, const float (&b)[V],
                                               float m, bool row_live, const K& keys) {
    Pack<T, V> out;
    if constexpr (sizeof(T) == 2 && V > 1) {
#pragma unroll
        for (int j = 0; j < V / 2; ++j) {
            float2 t = unpack2<T>(xv.w[j]);
            t.x = __fadd_rn(t.x, b[2 * j]);
            t.y = __fadd_rn(t.y, b[2 * j + 1]);
            const bool k0 = row_live & keys.keep(2 * j), k1 = row_live & keys.keep(2 * j + 1);
            if constexpr (RES) {
                const float2 r = unpack2<T>(rv.w[j]);
                const uint32_t fused = pack2<T>(__fmaf_rn(t.x, m, r.x), __fmaf_rn(t.y, m, r.y));
                uint32_t o = rv.w[j];
                if (k0) o = (o & 0xffff0000u) | (fused & 0xffffu);
                if (k1) o = (o & 0xffffu) | (fused & 0xffff0000u);
                out.w[j] = o;
            } else {
                const float lo = k0 ? __fmul_rn(t.x, m) : 0.f;
                const float hi = k1 ? __fmul_rn(t.y, m) : 0.f;
                out.w[j] = pack2<T>(lo, hi);
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float t = __fadd_rn(xv.get(k), b[k]);
            const bool kept = row_live & keys.keep(k);
            if constexpr (RES) {
                const uint32_t fused = f32_to_bits<T>(__fmaf_rn(t, m, rv.get(k)));
                out.set_raw(k, kept ? fused : rv.raw(k));
            } else {
                out.set_raw(k, f32_to_bits<T>(kept ? __fmul_rn(t, m) : 0.f));
            }
        }
    }
    return out;
}

// U consecutive rows of one thread's column group: all loads first, then per row its keys, math
// and store. rowm_smem points at the staged multipliers of these rows (null: every row's
// multiplier is p.scale). Called by every thread of the block (inactive ones too, for the
// warp-level mask writes). RES: the residual variant; KB: the keying resolution (32, 16, 8, or 0
// for a threshold without generator work).
//
// A group whose rows are all dropped (rowm == 0: drop path, p = 1) reads no x and generates keys
// only for the mask; it writes zeros (no residual), copies the residual, or in place touches
// nothing at all. The test is per group and block-uniform; inside a live group every row is
// loaded unconditionally (conditional loads per row cost the compiler dozens of registers).
// Each row's keys are generated right before its math (the loads of all U rows are already in
// flight), so one row's Philox state is live at a time.
template <typename T, int V, int U, bool RES, int KB>
__device__ __forceinline__ void fwd_rows(const FwdParams<T>& p, uint64_t row, uint64_t c0, int cnt,
                                         bool active, const float (&b)[V], const float* rowm_smem,
                                         const KeyGen<KB>& kg) {
    // Several rows in a slab mean rows > 1, and the host takes the vector path for rows > 1 only
    // when cols % V == 0: every active group is whole. Folding that in drops the tail code.
    if constexpr (U > 1) cnt = V;
    const bool want_mask = p.mask != nullptr;
    // Bits of the mask past the group's last element are 0 (a partial group of one row).
    const uint32_t cnt_bits = cnt < V ? (1u << cnt) - 1u : (V == 32 ? ~0u : (1u << V) - 1u);
    float rowm[U];
    bool live = false;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        rowm[u] = rowm_smem != nullptr ? rowm_smem[u] : p.scale;
        live |= rowm[u] != 0.f;
    }
    // Element offsets step by cols per row: one 64-bit add per row instead of a multiply, and one
    // offset live instead of a pointer per row and stream.
    const uint64_t first = row * p.cols + c0;
    if (!live) {
        if constexpr (RES) {
            // y = r: a copy, or nothing in place.
            if (active && (p.flags & FLAG_IN_PLACE) == 0) {
                uint64_t i = first;
#pragma unroll
                for (int u = 0; u < U; ++u, i += p.cols)
                    store_pack<T, V>(p.y + i, load_pack<T, V>(p.residual + i, cnt), cnt);
            }
        } else if (active) {
            Pack<T, V> zero;
#pragma unroll
            for (int k = 0; k < V; ++k) zero.set_raw(k, 0u);
            uint64_t i = first;
#pragma unroll
            for (int u = 0; u < U; ++u, i += p.cols) store_pack<T, V>(p.y + i, zero, cnt);
        }
        if (want_mask) {
            uint64_t i = first;
#pragma unroll 1
            for (int u = 0; u < U; ++u, i += p.cols) {
                const uint32_t b = active ? kg.template group<V>(p.seed, p.call, p.base + i).bits() & cnt_bits : 0u;
                write_bits<V>(p.mask, i, b, active);
            }
        }
        return;
    }
    Pack<T, V> xv[U], rv[RES ? U : 1];
    if (active) {
        uint64_t i = first;
#pragma unroll
        for (int u = 0; u < U; ++u, i += p.cols) {
            xv[u] = load_pack<T, V>(p.x + i, cnt);
            if constexpr (RES) rv[u] = load_pack<T, V>(p.residual + i, cnt);
        }
    }
    uint64_t i = first;
#pragma unroll
    for (int u = 0; u < U; ++u, i += p.cols) {
        // m = keep ? rowm : 0 and "m != 0" per element is "kept and rowm != 0": a row whose
        // multiplier is 0 drops every element (a NaN rowm counts as live). The mask holds the
        // keep bits whatever rowm is.
        const bool row_live = rowm[u] != 0.f;
        // Inactive threads generate keys too (no branch; their results are not stored), and so
        // does a row whose multiplier is 0 (drop path: a branch would cost every live row more).
        const auto keys = kg.template group<V>(p.seed, p.call, p.base + i);
        if (want_mask) write_bits<V>(p.mask, i, active ? keys.bits() & cnt_bits : 0u, active);
        if (active) store_pack<T, V>(p.y + i, fwd_math<T, V, RES>(xv[u], rv[RES ? u : 0], b, rowm[u], row_live, keys), cnt);
    }
}

template <typename T, int V, bool RES, int KB>
__device__ __forceinline__ void fwd_body(const FwdParams<T>& p, float* s_rowm) {
    const bool has_rs = p.rowscale != nullptr || (p.flags & FLAG_DROP_PATH) != 0;
    const bool unroll = (p.flags & FLAG_UNROLL) != 0;
    const KeyGen<KB> kg(p.threshold);
    const uint64_t groups = (p.cols + V - 1) / V;
    const uint64_t tiles = (groups + blockDim.x - 1) / blockDim.x;
    const uint64_t slab_begin = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t slab_end = min(slab_begin + p.slab_rows, p.rows);

    if constexpr (V > 1) {
        // Mask bytes past the last element (padding of the last word) are written by one thread;
        // every other byte belongs to exactly one element group.
        if (p.mask != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0)
            zero_mask_padding(p.mask, p.rows * p.cols);
    }

    for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint64_t c0 = (tile * blockDim.x + threadIdx.x) * V;
        const bool active = c0 < p.cols;
        const int cnt = active ? (int)min((uint64_t)V, p.cols - c0) : 0;
        // The bias as f32 once per tile; -0.0 without one (see fwd_math).
        float b[V];
#pragma unroll
        for (int k = 0; k < V; ++k) b[k] = -0.f;
        if (p.bias != nullptr && active) {
            const Pack<T, V> bv = load_pack<T, V>(p.bias + c0, cnt);
#pragma unroll
            for (int k = 0; k < V; ++k) b[k] = bv.get(k);
        }
        for (uint64_t r0 = slab_begin; r0 < slab_end; r0 += RS_CHUNK) {
            const uint64_t r1 = min(r0 + (uint64_t)RS_CHUNK, slab_end);
            if (has_rs) stage_rows(p, s_rowm, r0, r1, p.rowscale_out, p.rowscale_out != nullptr && tile == 0);
            uint64_t row = r0;
            if (unroll)
                for (; row + UNROLL <= r1; row += UNROLL)
                    fwd_rows<T, V, UNROLL, RES, KB>(p, row, c0, cnt, active, b, has_rs ? s_rowm + (row - r0) : nullptr, kg);
            for (; row < r1; ++row)
                fwd_rows<T, V, 1, RES, KB>(p, row, c0, cnt, active, b, has_rs ? s_rowm + (row - r0) : nullptr, kg);
        }
    }
}

// The forward kernel's body: the resolution picked once per thread (FLAG_KEY8 / FLAG_KEY16 in
// p.flags, 32-bit keys otherwise; KB = 0 when the threshold needs no generator); the shared
// memory belongs here so the variants share it.
template <typename T, int V, bool RES>
__device__ __forceinline__ void fwd(const FwdParams<T>& p) {
    __shared__ float s_rowm[RS_CHUNK];
    if (!generates(p.threshold, p.flags)) fwd_body<T, V, RES, 0>(p, s_rowm);
    else if ((p.flags & FLAG_KEY8) != 0) fwd_body<T, V, RES, 8>(p, s_rowm);
    else if ((p.flags & FLAG_KEY16) != 0) fwd_body<T, V, RES, 16>(p, s_rowm);
    else fwd_body<T, V, RES, 32>(p, s_rowm);
}

// The residual forward with the Block Influence statistics (src/redundancy; the module docs of
// src/dropout/mod.rs, "Redundancy statistics"): the dropout_fwd_res_stats_* entries only, their
// own params (the default entries keep theirs, and their instructions). Every output bit is the
// residual forward's: s = kept ? T(fma(t, rowm, r)) : r, t = x + b (b = -0.0 without a bias).
//
// One row per block (grid-stride over rows), blockDim.x = row_partials(cols) threads (<= 256, a
// multiple of 32): thread q owns the groups of 8 elements q, q + P, ... of the row, the partition
// of dropout_add_norm's row sums, so the row's r·s, |r|² and |s|² are summed in the order of the
// CPU's dropout_add_norm::cpu::stat_sums (stats.cuh: stat_terms; block_sums.cuh: warp_tree4), and the
// block's rows go to the site with StatRows (one integer atomic per word and block). The scalar
// entry (dropout_fwd_res_stats_<S>) reads and writes one element at a time (any alignment, any
// row width); the vector entry (dropout_fwd_res_stats_vec_<S>: cols % 8 == 0, 16-byte aligned
// views) a group as one 16-byte vector (two for f32), the same bits. The 1-bit mask is not
// written here (the host refuses it: measure in evaluation).
template <typename T> struct FwdStatsParams {
    FwdParams<T> f;
    unsigned long long* stats;  // the meter site's 3 words (src/redundancy: WORDS_PER_SITE)
};

template <typename T, int KB, bool VEC>
__device__ __forceinline__ void fwd_stats_body(const FwdParams<T>& p, unsigned long long* words) {
    using dropout_add_norm::STAT_GROUP;
    // The row's three sums through warp_tree4 (every lane stores its result), read by thread 0
    // alone; two buffers, alternating per row: a buffer is written again two rows later, after
    // the next row's barrier, which thread 0 passes only after reading it.
    __shared__ float s_lanes[2][256];
    uint32_t buf = 0;
    if (threadIdx.x == 0) dropout_add_norm::stat_rows().reset();  // thread 0 only
    const KeyGen<KB> kg(p.threshold);
    const bool has_rs = p.rowscale != nullptr || (p.flags & FLAG_DROP_PATH) != 0;
    const bool in_place = (p.flags & FLAG_IN_PLACE) != 0;
    const uint64_t groups = (p.cols + STAT_GROUP - 1) / STAT_GROUP;
    for (uint64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        // rowm = scale * rs (one f32 multiply), or scale without a row scale: stage_rows' value.
        const float rs = has_rs ? row_scale(p, row) : 1.f;
        if (p.rowscale_out != nullptr && threadIdx.x == 0) p.rowscale_out[row] = rs;
        const float rowm = has_rs ? __fmul_rn(p.scale, rs) : p.scale;
        float st[3] = {0.f, 0.f, 0.f};  // this partial's r·s, |r|², |s|²
        for (uint64_t g = threadIdx.x; g < groups; g += blockDim.x) {
            const uint64_t c0 = g * STAT_GROUP, i = row * p.cols + c0, key = p.base + i;
            float gt[3];
            if constexpr (VEC) {
                // The vector entry: cols % 8 == 0, base % 8 == 0 and 16-byte aligned views (the
                // host's test), so every group is whole, aligned and keyed by whole fields: the
                // residual forward's vector math (fwd_math, the same bits) on one or two 16-byte
                // vectors, the f32 values it converts reused for the terms.
                constexpr int V = 16 / sizeof(T);
                const bool live = rowm != 0.f;
                float rin[STAT_GROUP], sout[STAT_GROUP];
#pragma unroll
                for (int h = 0; h < STAT_GROUP / V; ++h) {
                    const uint64_t ih = i + h * V;
                    const Pack<T, V> rv = load_pack<T, V>(p.residual + ih, V);
                    const Pack<T, V> xv = live ? load_pack<T, V>(p.x + ih, V) : rv;
                    float b[V];
#pragma unroll
                    for (int k = 0; k < V; ++k) b[k] = -0.f;
                    if (p.bias != nullptr) {
                        const Pack<T, V> bv = load_pack<T, V>(p.bias + c0 + h * V, V);
#pragma unroll
                        for (int k = 0; k < V; ++k) b[k] = bv.get(k);
                    }
                    const auto keys = kg.template group<V>(p.seed, p.call, key + h * V);
                    const Pack<T, V> yv = fwd_math<T, V, true>(xv, rv, b, rowm, live, keys);
                    // In place a dropped row is left alone (its bits are the residual's).
                    if (live || !in_place) store_pack<T, V>(p.y + ih, yv, V);
#pragma unroll
                    for (int k = 0; k < V; ++k) rin[h * V + k] = rv.get(k), sout[h * V + k] = yv.get(k);
                }
                dropout_add_norm::stat_terms([&](int k) { return rin[k]; }, [&](int k) { return sout[k]; }, STAT_GROUP, gt);
            } else {
                const int cnt = (int)min((uint64_t)STAT_GROUP, p.cols - c0);
                // Keep bits: a whole aligned group at once, else element by element (the keys are a
                // function of the flat index only). A row whose multiplier is 0 keeps nothing.
                uint32_t keep = 0u;
                if (rowm != 0.f) {
                    if (cnt == STAT_GROUP && (key & 7) == 0) {
                        keep = kg.template group<STAT_GROUP>(p.seed, p.call, key).bits();
                    } else {
                        for (int k = 0; k < cnt; ++k)
                            keep |= (kg.template group<1>(p.seed, p.call, key + k).keep(0) ? 1u : 0u) << k;
                    }
                }
                float rin[STAT_GROUP], sout[STAT_GROUP];
#pragma unroll
                for (int k = 0; k < STAT_GROUP; ++k) {
                    rin[k] = 0.f, sout[k] = 0.f;
                    if (k < cnt) {
                        const T rv = p.residual[i + k];
                        T yv = rv;
                        if ((keep >> k) & 1u) {
                            const float b = p.bias != nullptr ? to_f32(p.bias[c0 + k]) : -0.f;
                            const float t = __fadd_rn(to_f32(p.x[i + k]), b);
                            yv = from_f32<T>(__fmaf_rn(t, rowm, to_f32(rv)));
                        }
                        if (!in_place || ((keep >> k) & 1u)) p.y[i + k] = yv;
                        rin[k] = to_f32(rv), sout[k] = to_f32(yv);
                    }
                }
                dropout_add_norm::stat_terms([&](int k) { return rin[k]; }, [&](int k) { return sout[k]; }, cnt, gt);
            }
#pragma unroll
            for (int k = 0; k < 3; ++k) st[k] = __fadd_rn(st[k], gt[k]);
        }
        s_lanes[buf][threadIdx.x] = dropout_add_norm::warp_tree4({st[0], st[1], st[2], 0.f});
        __syncthreads();
        if (threadIdx.x == 0) {
            const uint32_t warps = blockDim.x / 32;
            dropout_add_norm::stat_rows().add(dropout_add_norm::lanes_total(s_lanes[buf], warps, 0),
                                              dropout_add_norm::lanes_total(s_lanes[buf], warps, 1),
                                              dropout_add_norm::lanes_total(s_lanes[buf], warps, 2));
        }
        buf ^= 1;
    }
    if (threadIdx.x == 0) dropout_add_norm::stat_rows().flush(words);
}

template <typename T, bool VEC>
__device__ __forceinline__ void fwd_stats(const FwdStatsParams<T>& sp) {
    const FwdParams<T>& p = sp.f;
    if (!generates(p.threshold, p.flags)) fwd_stats_body<T, 0, VEC>(p, sp.stats);
    else if ((p.flags & FLAG_KEY8) != 0) fwd_stats_body<T, 8, VEC>(p, sp.stats);
    else if ((p.flags & FLAG_KEY16) != 0) fwd_stats_body<T, 16, VEC>(p, sp.stats);
    else fwd_stats_body<T, 32, VEC>(p, sp.stats);
}

// The residual add of the unfused baseline (its dropout kernels are common/dropping.cuh's).
template <typename T> struct UnfusedAddParams {
    const T* a;
    const T* b;
    T* out;  // out = T(a + b)
    uint64_t n;
    uint32_t vec, pad;
};

template <typename T, int W> struct UnfusedAddOp {
    static __device__ __forceinline__ void run(const UnfusedAddParams<T>& p, uint64_t i) {
        const Pack<T, W> a = load_pack<T, W>(p.a + i, W);
        const Pack<T, W> b = load_pack<T, W>(p.b + i, W);
        Pack<T, W> out;
#pragma unroll
        for (int k = 0; k < W; ++k) out.set_raw(k, f32_to_bits<T>(__fadd_rn(a.get(k), b.get(k))));
        store_pack<T, W>(p.out + i, out, W);
    }
};

}  // namespace dropout

#define DO_CHECK_SIZES(T)                                                                      \
    static_assert(sizeof(dropout::FwdParams<T>) == 144, "must match src/dropout/gpu.rs");     \
    static_assert(sizeof(dropout::UnfusedAddParams<T>) == 40, "must match src/dropout/unfused.rs"); \
    static_assert(sizeof(dropout::FwdStatsParams<T>) == 152, "must match src/dropout/gpu.rs");
DO_CHECK_SIZES(float)
DO_CHECK_SIZES(__half)
DO_CHECK_SIZES(__nv_bfloat16)

// Register budgets (see the .resources.txt report): without a residual the forward holds UNROLL
// vectors per thread, like the backward: 64 registers, 4 blocks of 256 per SM. With one it holds
// 2 x UNROLL 16-byte vectors, so it gets up to 85 registers (3 blocks of 256 per SM: 768 threads
// with 8 loads of 16 bytes in flight each, far more than the bandwidth-latency product needs).
// Without these bounds the compiler spends 90-130 registers on instruction-level parallelism we
// do not need. Symbols: dropout_fwd_{vec,scalar}_<S> (no residual), dropout_fwd_res_{vec,scalar}_<S>,
// dropout_fwd_res_stats{,_vec}_<S> (the statistics: row_partials(cols) <= 256 threads per block).
#define DO_KERNELS(T, S)                                                                             \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK, 4) dropout_fwd_vec_##S(                 \
        const dropout::FwdParams<T> p) {                                                             \
        dropout::fwd<T, 16 / sizeof(T), false>(p);                                                   \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK, 4) dropout_fwd_scalar_##S(              \
        const dropout::FwdParams<T> p) {                                                             \
        dropout::fwd<T, 1, false>(p);                                                                \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK, 3) dropout_fwd_res_vec_##S(             \
        const dropout::FwdParams<T> p) {                                                             \
        dropout::fwd<T, 16 / sizeof(T), true>(p);                                                    \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK, 3) dropout_fwd_res_scalar_##S(          \
        const dropout::FwdParams<T> p) {                                                             \
        dropout::fwd<T, 1, true>(p);                                                                 \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) dropout_fwd_res_stats_##S(                   \
        const dropout::FwdStatsParams<T> p) {                                                        \
        dropout::fwd_stats<T, false>(p);                                                             \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) dropout_fwd_res_stats_vec_##S(               \
        const dropout::FwdStatsParams<T> p) {                                                        \
        dropout::fwd_stats<T, true>(p);                                                              \
    }                                                                                                \
    FUSEDREG_DROPOUT_BWD_KERNELS(dropout, T, S, true)                                                \
    FUSEDREG_DROPOUT_UNFUSED_KERNELS(dropout, T, S)                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK) dropout_unfused_add_##S(                 \
        const dropout::UnfusedAddParams<T> p) {                                                      \
        flat_loop<T, dropout::UnfusedAddOp>(p);                                                      \
    }

FUSEDREG_FOR_EACH_DTYPE(DO_KERNELS)
