// Plain dropout with an optional bias before it, forward and backward, and the unfused baseline.
//
//   y  = m(row, i) * (x + bias[col])      m = keep(seed, call, i) ? scale * rowscale[row] : 0
//   dx = m(row, i) * dy                   dbias[col] = sum over rows of dx (f32)
//
// The arithmetic is pinned so that src/dropout/cpu.rs reproduces it bit for bit:
//   t = x + b (one f32 add; t = x without bias), rowm = scale * rs (one f32 multiply per row;
//   rowm = scale without a row scale), y = m != 0 ? T(t * m) : +0 (a dropped element is exactly
//   +0, whatever x holds). The backward is the shared one (common/dropping.cuh:
//   dropout_bwd, dx = m != 0 ? T(dy * m) : 0, deterministic dbias), instantiated here under this
//   file's stem; so is the unfused baseline.
//
// Launch shape and keying as in dropout_residual.cu: grid.x column tiles, grid.y row slabs,
// every thread loops over the rows of its slab, UNROLL rows' loads in flight before their math;
// the flat index of a thread's first element in a row is base + row * cols + c0 (64-bit). Every
// thread of a block runs the same tile, chunk and row loops (threads past the last column skip
// only memory accesses), which the row staging (__syncthreads) and the warp-level mask writes
// rely on.
#include "common/dropping.cuh"

using namespace fusedreg;
using namespace fusedreg::drop;

namespace dropout {

template <typename T> struct FwdParams {
    const T* x;
    const T* bias;           // [cols]; null when absent
    T* y;
    const float* rowscale;   // [rows] from the caller; null when absent or generated
    float* rowscale_out;     // [rows]: the generated row scale, when non-null
    uint32_t* mask;          // [ceil(rows*cols/32)] 1-bit keep mask, when non-null
    uint64_t rows, cols, slab_rows;
    uint64_t seed, call, threshold;
    uint64_t path_call, path_threshold;
    uint64_t base;            // flat index of element 0 of this launch (RNG keying only)
    float scale, path_scale;  // DropRate::scale() of p and of p_path
    uint32_t flags;           // FLAG_DROP_PATH, FLAG_UNROLL, FLAG_KEY16
    uint32_t rows_per_sample;  // drop path: rows sharing one draw (>= 1)
};

// U consecutive rows of one thread's column group: all loads first, then the keep bits, then
// the math and the stores. rowm_smem points at the staged multipliers of these rows (null: every
// row's multiplier is p.scale). Called by every thread of the block (inactive ones too, for the
// warp-level mask writes). A group whose rows are all dropped (rowm == 0: drop path, p = 1)
// reads no x and writes zeros; it generates bits only for the mask. The test is per group and
// block-uniform.
template <typename T, int V, int U>
__device__ __forceinline__ void fwd_rows(const FwdParams<T>& p, uint64_t row, uint64_t c0, int cnt,
                                         bool active, const Pack<T, V>& bv, const float* rowm_smem) {
    // Several rows in a slab mean rows > 1, and the host takes the vector path for rows > 1 only
    // when cols % V == 0: every active group is whole.
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
        if (active) {
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
    Pack<T, V> xv[U];
    if (active) {
#pragma unroll
        for (int u = 0; u < U; ++u) xv[u] = load_pack<T, V>(p.x + (row + u) * p.cols + c0, cnt);
    }
    const uint32_t bits = active ? rows_keep_bits<V, U, true>(p, row, c0, cnt, rowm_smem, p.mask != nullptr) : 0u;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const uint64_t i = (row + u) * p.cols + c0;
        const uint32_t b = (bits >> (u * V)) & ((1u << V) - 1u);
        if (active) {
            // "m != 0" is "kept and rowm != 0": one test per row (a NaN rowm counts as live).
            const uint32_t keep = rowm[u] != 0.f ? b : 0u;
            // Every element is computed and the kept ones selected (a branch per element compiles
            // to a divergence region each).
            Pack<T, V> out;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float t = xv[u].get(k);
                if (has_bias) t = __fadd_rn(t, bv.get(k));
                const uint32_t v = f32_to_bits<T>(__fmul_rn(t, rowm[u]));
                out.set_raw(k, ((keep >> k) & 1u) ? v : 0u);
            }
            store_pack<T, V>(p.y + i, out, cnt);
        }
        if (p.mask != nullptr) write_bits<V>(p.mask, i, b, active);
    }
}

template <typename T, int V>
__device__ __forceinline__ void fwd(const FwdParams<T>& p) {
    __shared__ float s_rowm[RS_CHUNK];
    const bool has_rs = p.rowscale != nullptr || (p.flags & FLAG_DROP_PATH) != 0;
    const bool unroll = (p.flags & FLAG_UNROLL) != 0;
    const uint64_t groups = (p.cols + V - 1) / V;
    const uint64_t tiles = (groups + blockDim.x - 1) / blockDim.x;
    const uint64_t slab_begin = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t slab_end = min(slab_begin + p.slab_rows, p.rows);

    if constexpr (V > 1) {
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
                    fwd_rows<T, V, UNROLL>(p, row, c0, cnt, active, bv, has_rs ? s_rowm + (row - r0) : nullptr);
            for (; row < r1; ++row)
                fwd_rows<T, V, 1>(p, row, c0, cnt, active, bv, has_rs ? s_rowm + (row - r0) : nullptr);
        }
    }
}

}  // namespace dropout

#define DO_CHECK_SIZES(T) static_assert(sizeof(dropout::FwdParams<T>) == 136, "must match src/dropout/gpu.rs");
DO_CHECK_SIZES(float)
DO_CHECK_SIZES(__half)
DO_CHECK_SIZES(__nv_bfloat16)

// The forward holds UNROLL x vectors per thread (no residual), like the backward: 64 registers,
// 4 blocks of 256 per SM.
#define DO_KERNELS(T, S)                                                                             \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK, 4) dropout_fwd_vec_##S(                 \
        const dropout::FwdParams<T> p) {                                                             \
        dropout::fwd<T, 16 / sizeof(T)>(p);                                                          \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK, 4) dropout_fwd_scalar_##S(              \
        const dropout::FwdParams<T> p) {                                                             \
        dropout::fwd<T, 1>(p);                                                                       \
    }                                                                                                \
    FUSEDREG_DROPOUT_BWD_KERNELS(dropout, T, S, true)                                                    \
    FUSEDREG_DROPOUT_UNFUSED_KERNELS(dropout, T, S)

FUSEDREG_FOR_EACH_DTYPE(DO_KERNELS)
