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
// Keying: every resolution of the shared contract (32- or 16-bit, FLAG_KEY16 in p.flags), with
// and without a residual.
#include "common/dropping.cuh"

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
    uint32_t flags;           // FLAG_DROP_PATH, FLAG_UNROLL, FLAG_IN_PLACE, FLAG_KEY16
    uint32_t rows_per_sample;  // drop path: rows sharing one draw (>= 1)
};

// U consecutive rows of one thread's column group: all loads first, then the keep bits, then
// the math and the stores. rowm_smem points at the staged multipliers of these rows (null: every
// row's multiplier is p.scale). Called by every thread of the block (inactive ones too, for the
// warp-level mask writes). RES: the residual variant.
//
// A group whose rows are all dropped (rowm == 0: drop path, p = 1) reads no x and generates bits
// only for the mask; it writes zeros (no residual), copies the residual, or in place touches
// nothing at all. The test is per group and block-uniform; inside a live group every row is
// loaded unconditionally (conditional loads per row cost the compiler dozens of registers).
template <typename T, int V, int U, bool RES>
__device__ __forceinline__ void fwd_rows(const FwdParams<T>& p, uint64_t row, uint64_t c0, int cnt,
                                         bool active, const Pack<T, V>& bv, const float* rowm_smem) {
    // Several rows in a slab mean rows > 1, and the host takes the vector path for rows > 1 only
    // when cols % V == 0: every active group is whole. Folding that in drops the tail code.
    if constexpr (U > 1) cnt = V;
    const bool has_bias = p.bias != nullptr;
    float rowm[U];
    bool live = false;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        rowm[u] = rowm_smem != nullptr ? rowm_smem[u] : p.scale;
        live |= rowm[u] != 0.f;
    }
    if (!live) {
        if constexpr (RES) {
            // y = r: a copy, or nothing in place.
            if (active && (p.flags & FLAG_IN_PLACE) == 0) {
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const uint64_t i = (row + u) * p.cols + c0;
                    store_pack<T, V>(p.y + i, load_pack<T, V>(p.residual + i, cnt), cnt);
                }
            }
        } else if (active) {
            Pack<T, V> zero;
#pragma unroll
            for (int k = 0; k < V; ++k) zero.set_raw(k, 0u);
#pragma unroll
            for (int u = 0; u < U; ++u) store_pack<T, V>(p.y + (row + u) * p.cols + c0, zero, cnt);
        }
        if (p.mask != nullptr) {
            const uint32_t bits = active ? rows_keep_bits<V, U, true>(p, row, c0, cnt, nullptr, true) : 0u;
#pragma unroll
            for (int u = 0; u < U; ++u)
                write_bits<V>(p.mask, (row + u) * p.cols + c0, (bits >> (u * V)) & ((1u << V) - 1u), active);
        }
        return;
    }
    Pack<T, V> xv[U], rv[RES ? U : 1];
    if (active) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint64_t i = (row + u) * p.cols + c0;
            xv[u] = load_pack<T, V>(p.x + i, cnt);
            if constexpr (RES) rv[u] = load_pack<T, V>(p.residual + i, cnt);
        }
    }
    const uint32_t bits = active ? rows_keep_bits<V, U, true>(p, row, c0, cnt, rowm_smem, p.mask != nullptr) : 0u;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const uint64_t i = (row + u) * p.cols + c0;
        const uint32_t b = (bits >> (u * V)) & ((1u << V) - 1u);
        if (active) {
            // m = keep ? rowm : 0 and "m != 0" per element is "kept and rowm != 0": one test per
            // row instead of a select and a compare per element (a NaN rowm counts as live).
            const uint32_t keep = rowm[u] != 0.f ? b : 0u;
            // Every element is computed and the kept ones selected: a branch per element compiles
            // to a divergence region each (BSSY/BRA/BSYNC).
            Pack<T, V> out;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float t = xv[u].get(k);
                if (has_bias) t = __fadd_rn(t, bv.get(k));
                if constexpr (RES) {
                    const uint32_t fused = f32_to_bits<T>(__fmaf_rn(t, rowm[u], rv[u].get(k)));
                    out.set_raw(k, ((keep >> k) & 1u) ? fused : rv[u].raw(k));
                } else {
                    const uint32_t v = f32_to_bits<T>(__fmul_rn(t, rowm[u]));
                    out.set_raw(k, ((keep >> k) & 1u) ? v : 0u);
                }
            }
            store_pack<T, V>(p.y + i, out, cnt);
        }
        if (p.mask != nullptr) write_bits<V>(p.mask, i, b, active);
    }
}

template <typename T, int V, bool RES>
__device__ __forceinline__ void fwd(const FwdParams<T>& p) {
    __shared__ float s_rowm[RS_CHUNK];
    const bool has_rs = p.rowscale != nullptr || (p.flags & FLAG_DROP_PATH) != 0;
    const bool unroll = (p.flags & FLAG_UNROLL) != 0;
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
        Pack<T, V> bv;
        if (p.bias != nullptr && active) bv = load_pack<T, V>(p.bias + c0, cnt);
        for (uint64_t r0 = slab_begin; r0 < slab_end; r0 += RS_CHUNK) {
            const uint64_t r1 = min(r0 + (uint64_t)RS_CHUNK, slab_end);
            if (has_rs) stage_rows(p, s_rowm, r0, r1, p.rowscale_out, p.rowscale_out != nullptr && tile == 0);
            uint64_t row = r0;
            if (unroll)
                for (; row + UNROLL <= r1; row += UNROLL)
                    fwd_rows<T, V, UNROLL, RES>(p, row, c0, cnt, active, bv, has_rs ? s_rowm + (row - r0) : nullptr);
            for (; row < r1; ++row)
                fwd_rows<T, V, 1, RES>(p, row, c0, cnt, active, bv, has_rs ? s_rowm + (row - r0) : nullptr);
        }
    }
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
    static_assert(sizeof(dropout::UnfusedAddParams<T>) == 40, "must match src/dropout/unfused.rs");
DO_CHECK_SIZES(float)
DO_CHECK_SIZES(__half)
DO_CHECK_SIZES(__nv_bfloat16)

// Register budgets (see the .resources.txt report): without a residual the forward holds UNROLL
// vectors per thread, like the backward: 64 registers, 4 blocks of 256 per SM. With one it holds
// 2 x UNROLL 16-byte vectors, so it gets up to 85 registers (3 blocks of 256 per SM: 768 threads
// with 8 loads of 16 bytes in flight each, far more than the bandwidth-latency product needs).
// Without these bounds the compiler spends 90-130 registers on instruction-level parallelism we
// do not need. Symbols: dropout_fwd_{vec,scalar}_<S> (no residual), dropout_fwd_res_{vec,scalar}_<S>.
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
    FUSEDREG_DROPOUT_BWD_KERNELS(dropout, T, S, true)                                                \
    FUSEDREG_DROPOUT_UNFUSED_KERNELS(dropout, T, S)                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK) dropout_unfused_add_##S(                 \
        const dropout::UnfusedAddParams<T> p) {                                                      \
        flat_loop<T, dropout::UnfusedAddOp>(p);                                                      \
    }

FUSEDREG_FOR_EACH_DTYPE(DO_KERNELS)
