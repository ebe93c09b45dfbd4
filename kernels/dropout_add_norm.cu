// Fused dropout + residual add + LayerNorm / RMSNorm (with LayerNorm Scaling), forward and
// backward: the entry of a pre-norm transformer sub-block.
//
//   s   = residual + m(row, i) * (x + bias)       m = keep(seed, call, i) ? scale * rowscale[row] : 0
//   out = norm(s) * layer_scale                   norm = LayerNorm(gamma, beta) or RMSNorm(gamma)
//
// The arithmetic is pinned so that src/dropout_add_norm/cpu.rs reproduces it bit for bit (the
// module docs of src/dropout_add_norm/mod.rs spell it out). The parts that decide the bits:
//  * Dropout is keyed by the shared contract (common/dropping.cuh): the keep bit of flat
//    element i = row * cols + col is philox word i of (seed, call) >= threshold (integer compare;
//    threshold 0 and 2^32 do no generator work), or under 16- / 8-bit keying (FLAG_KEY16 /
//    FLAG_KEY8) halfword i % 8 of block i / 8 / byte i % 16 of block i / 16 against a threshold in
//    0 ..= 2^16 / 2^8. The backward regenerates it; nothing is stored.
//  * Row reductions (mean, variance, the backward's two row sums) have an order that depends on
//    cols only, never on the launch: element j is in group j / 8, group g in partial g % P with
//    P = row_partials(cols) = blockDim.x (the host launches exactly P threads per row); thread q
//    sums partial q sequentially, then the P partials are combined by a fixed tree.
//  * The normaliser is 1 / sqrt(var + eps) with a correctly rounded sqrt and division
//    (__fsqrt_rn, __fdiv_rn), never rsqrtf, so the CPU gets the same bits.
//  * Column reductions (dgamma, dbeta, dbias) are per slab of rows (slab_rows(rows), a function
//    of rows only): one backward block owns a slab and its threads own columns, so each
//    (slab, column) partial is a sequential sum over the slab's rows with no atomics; the colsum
//    kernel adds the slabs in order.
//
// Two families of kernels compute exactly this, with the same bits:
//  * dropout_add_norm/rows.cuh, the register tiers dropout_add_norm_{fwd,bwd}_t{1,2,4,8}_<S>:
//    the vector path (cols % 8 == 0, 16-byte aligned pointers) for rows up to 8 * 256 * 8 =
//    16384 elements, the row held in registers, one launch's choices compiled in.
//  * dropout_add_norm/generic.cuh, dropout_add_norm_{fwd,bwd}_<S>: any hidden size (1, odd,
//    past the tiers) and any alignment, looping over the row with a fixed number of registers.
// Every thread of a block runs the same row loop, so the __syncthreads of the row sums are
// reached by all of them.
#include "common/dropping.cuh"
#include "common/dtype.cuh"
#include "common/philox.cuh"

using namespace fusedreg;

namespace dropout_add_norm {

constexpr int GROUP = 8;          // elements per group: one 16-byte vector of 16-bit values
constexpr int MAX_THREADS = 256;  // row_partials(cols) <= 256 (src/dropout_add_norm/mod.rs)
using drop::THRESHOLD_ALL;        // p = 1: every element is dropped

// Flags (src/dropout_add_norm/gpu.rs): the shared ones of common/dropping.cuh keep their values
// there; this op's own start at bit 8, clear of any the shared home adds.
constexpr uint32_t FLAG_DROP_PATH = drop::FLAG_DROP_PATH;  // row scale drawn under path_call
constexpr uint32_t FLAG_VEC = 1u << 8;        // generic: 16-byte vector loads and stores
constexpr uint32_t FLAG_RMS = 1u << 9;        // RMSNorm (else LayerNorm)
constexpr uint32_t FLAG_BETA = 1u << 10;      // forward: beta is given
constexpr uint32_t FLAG_NORM_ONLY = 1u << 11; // forward: s is an input (the unfused baseline's norm)
constexpr uint32_t FLAG_SMEM = 1u << 12;      // generic: use dynamic shared memory (forward: the
                                              // row; backward: the slab partials)
constexpr uint32_t FLAG_DBETA = 1u << 13;     // backward, tiers: the dbeta partials are wanted
constexpr uint32_t FLAG_DBIAS = 1u << 14;     // backward, tiers: the dbias partials are wanted

// Dynamic shared memory: the generic kernels' row cache or slab partials (FLAG_SMEM), the
// backward tiers' column partials for NG >= 4. Under host emulation, a static array of the
// largest use: the generic backward's slab partials (24 * 256 words per group a thread owns,
// generic.cuh) up to 32 groups per thread (65536 columns), past the t8 backward's 3 * 2 * 8 *
// 256 * 4.
#ifdef __CUDACC__
extern __shared__ float dyn_smem[];
#else
static float dyn_smem[3 * 8 * 256 * 32];
#endif

// rowm = scale * rowscale[row], or scale without a row scale (one f32 multiply, as the CPU).
template <typename P>
__device__ __forceinline__ float row_multiplier(const P& p, uint64_t row) {
    if (p.rowscale == nullptr && !(p.flags & FLAG_DROP_PATH)) return p.scale;
    return __fmul_rn(p.scale, drop::row_scale(p, row));
}

template <typename T, typename S> struct FwdParams {
    const T* x;
    const S* residual;      // null: no residual (s = dropout(x + bias)); may equal s (in place)
    const T* bias;          // [cols]; null when absent
    const T* gamma;         // [cols]
    const T* beta;          // [cols]; null when absent
    const float* rowscale;  // [rows] from the caller; null when absent or generated
    T* out;
    S* s;
    float* mean;            // [rows]; 0 for RMSNorm
    float* rstd;            // [rows]
    uint64_t rows, cols;
    uint64_t seed, call, threshold;
    uint64_t path_call, path_threshold;
    float scale, path_scale;  // DropRate::scale() of p and of p_path
    float eps, layer_scale;
    uint32_t flags;
    uint32_t rows_per_sample;  // drop path: rows sharing one draw (>= 1)
    unsigned long long* stats;  // the *_stats_* entries: the meter site's 3 words (stats.cuh)
};

template <typename T, typename S> struct BwdParams {
    const T* d_out;
    const S* d_s;           // null: no gradient along the stream
    const S* s;
    const T* gamma;
    const float* mean;
    const float* rstd;
    const float* rowscale;  // as in the forward
    T* dx;
    S* d_residual;          // null: not wanted
    float* partials;        // [3][slabs][cols]: dgamma, dbeta, dbias partials
    uint64_t rows, cols, slab_rows, slabs;
    uint64_t seed, call, threshold;
    uint64_t path_call, path_threshold;
    float scale, path_scale, layer_scale;
    uint32_t flags;
    uint32_t rows_per_sample;
    uint32_t pad;
};

template <typename T> struct ColsumParams {
    const float* partials;  // [3][slabs][cols]
    T* dgamma;              // each output null when not wanted
    T* dbeta;
    T* dbias;
    uint64_t cols, slabs;
};

}  // namespace dropout_add_norm

#include "dropout_add_norm/stats.cuh"
#include "dropout_add_norm/generic.cuh"
#include "dropout_add_norm/rows.cuh"

namespace dropout_add_norm {

// out[col] = T(sum over slabs, in slab order, of partials[which][slab][col]) for the wanted
// outputs (blockIdx.y = which); slabs == 0 writes zeros. drop::dbias_finish per array: a block
// stages the partials of 32 columns through shared memory with all its warps loading, then adds
// them in slab order (the sequential order, so the same bits as one thread walking the slabs).
template <typename T>
__device__ __forceinline__ void colsum(const ColsumParams<T>& p) {
    const uint32_t which = blockIdx.y;
    T* dst = which == 0 ? p.dgamma : which == 1 ? p.dbeta : p.dbias;
    if (dst == nullptr) return;  // block-uniform
    drop::DbiasParams<T> d;
    d.partials = p.partials + which * p.slabs * p.cols;
    d.dbias = dst;
    d.cols = p.cols;
    d.slabs = p.slabs;
    drop::dbias_finish<T>(d);
}

// The register tiers: tier NG holds rows of up to NG groups per partial (8 * 256 * NG columns;
// NG = 1: up to 256 partials of one group) as NGT groups per thread over SEG segments, in blocks
// of P * SEG threads (256 * SEG when NG >= 2) with at most 65536 / (256 * SEG * MIN_BLOCKS)
// registers per thread: 64 (32 warps per SM), 80 for the t2 forward (24 warps; it needs no more:
// its grid loops over rows, while the backward's 4 blocks per SM take its 1024 slabs in 1.94
// waves). An f32 stream (WIDE) holds one group per thread up to t4; its t8 (rows of 8200 ..=
// 16384 columns) holds two over 4 segments like the 16-bit t8 (one group per thread would need
// 2048 threads): the forward takes its groups one at a time, the backward loads an f32 x's d_out
// and gamma per group in pass A and d_s in pass B (bwd_rows). No tier spills (ptxas, every dtype:
// the build's resources report) except that backward: 96 bytes of spill stores, 160 of loads per
// thread (two groups of f32 s and w, or of s and d_out / gamma, against 64 registers; keying the
// row first or re-reading s in pass B spilled more), local traffic that stays in L1.
// src/dropout_add_norm/gpu.rs mirrors this table (block size, shared memory, availability).
template <int NG, bool WIDE> struct Tier;
template <bool WIDE> struct Tier<1, WIDE> { static constexpr int NGT = 1, SEG = 1, FWD_MIN = 4, BWD_MIN = 4; };
template <> struct Tier<2, false> { static constexpr int NGT = 2, SEG = 1, FWD_MIN = 3, BWD_MIN = 4; };
template <> struct Tier<4, false> { static constexpr int NGT = 2, SEG = 2, FWD_MIN = 2, BWD_MIN = 2; };
template <> struct Tier<8, false> { static constexpr int NGT = 2, SEG = 4, FWD_MIN = 1, BWD_MIN = 1; };
template <> struct Tier<2, true> { static constexpr int NGT = 1, SEG = 2, FWD_MIN = 2, BWD_MIN = 2; };
template <> struct Tier<4, true> { static constexpr int NGT = 1, SEG = 4, FWD_MIN = 1, BWD_MIN = 1; };
template <> struct Tier<8, true> { static constexpr int NGT = 2, SEG = 4, FWD_MIN = 1, BWD_MIN = 1; };

// The tiers' entries: one launch runs one instantiation (LayerNorm or RMSNorm).
template <typename T, typename S, int NG, bool STATS = false>
__device__ __forceinline__ void fwd_tier(const FwdParams<T, S>& p) {
    using C = Tier<NG, sizeof(S) == 4>;
    if (p.flags & FLAG_RMS) fwd_rows<T, S, C::NGT, C::SEG, true, STATS>(p);
    else fwd_rows<T, S, C::NGT, C::SEG, false, STATS>(p);
}

template <typename T, typename S, int NG>
__device__ __forceinline__ void bwd_tier(const BwdParams<T, S>& p) {
    using C = Tier<NG, sizeof(S) == 4>;
    if (p.flags & FLAG_RMS) bwd_rows<T, S, C::NGT, C::SEG, true>(p);
    else bwd_rows<T, S, C::NGT, C::SEG, false>(p);
}

}  // namespace dropout_add_norm

using namespace dropout_add_norm;

#define DAN_CHECK_SIZES(T, S)                                                                       \
    static_assert(sizeof(FwdParams<T, S>) == 168, "must match src/dropout_add_norm/gpu.rs");        \
    static_assert(sizeof(BwdParams<T, S>) == 176, "must match src/dropout_add_norm/gpu.rs");        \
    static_assert(sizeof(ColsumParams<T>) == 48, "must match src/dropout_add_norm/gpu.rs");

DAN_CHECK_SIZES(float, float)
DAN_CHECK_SIZES(__half, float)

// The generic kernels' blocks per SM: their eight compiled bodies (generic.cuh) share one
// register count, which the scalar bodies (eight loads per array in flight) would raise to 124+
// (forward) and 194 (backward); these bounds keep 80 and 128, the occupancy of the one-body
// kernels before (78 and 112 registers), the vector bodies needing 53 and 72.
constexpr int GENERIC_FWD_MIN = 3, GENERIC_BWD_MIN = 2;

// T: x, out, gamma, beta, bias and their gradients; S: the stream (residual, s, d_s, d_residual),
// T itself or f32 (residual_in_f32). Generic kernels, then the register tiers (NG groups of 8
// per thread; src/dropout_add_norm/gpu.rs picks one).
#define DAN_TIER(T, S, NAME, NG)                                                                      \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS * Tier<NG, sizeof(S) == 4>::SEG,          \
                                                 Tier<NG, sizeof(S) == 4>::FWD_MIN)                    \
        dropout_add_norm_fwd_t##NG##_##NAME(const FwdParams<T, S> p) {                                 \
        fwd_tier<T, S, NG>(p);                                                                        \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS * Tier<NG, sizeof(S) == 4>::SEG,          \
                                                 Tier<NG, sizeof(S) == 4>::BWD_MIN)                    \
        dropout_add_norm_bwd_t##NG##_##NAME(const BwdParams<T, S> p) {                                 \
        bwd_tier<T, S, NG>(p);                                                                        \
    }
#define DAN_KERNELS(T, S, NAME)                                                                       \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, GENERIC_FWD_MIN)                         \
        dropout_add_norm_fwd_##NAME(const FwdParams<T, S> p) {                                        \
        fwd<T, S>(p);                                                                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, GENERIC_BWD_MIN)                         \
        dropout_add_norm_bwd_##NAME(const BwdParams<T, S> p) {                                        \
        bwd<T, S>(p);                                                                                 \
    }                                                                                                 \
    DAN_TIER(T, S, NAME, 1) DAN_TIER(T, S, NAME, 2) DAN_TIER(T, S, NAME, 4)
// t8 (see Tier; its own macro so that the statistics entries below can leave it out).
#define DAN_T8(T, S, NAME) DAN_TIER(T, S, NAME, 8)

DAN_KERNELS(float, float, f32)
DAN_KERNELS(__half, __half, f16)
DAN_KERNELS(__nv_bfloat16, __nv_bfloat16, bf16)
DAN_KERNELS(__half, float, f16_sf32)
DAN_KERNELS(__nv_bfloat16, float, bf16_sf32)
DAN_T8(__half, __half, f16)
DAN_T8(__nv_bfloat16, __nv_bfloat16, bf16)
DAN_T8(float, float, f32)
DAN_T8(__half, float, f16_sf32)
DAN_T8(__nv_bfloat16, float, bf16_sf32)

// The forwards with the Block Influence statistics (stats.cuh): the same kernels with STATS on,
// their own entries so that the default ones compile exactly as without them.
#define DAN_STATS_TIER(T, S, NAME, NG)                                                                \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS * Tier<NG, sizeof(S) == 4>::SEG,          \
                                                 Tier<NG, sizeof(S) == 4>::FWD_MIN)                    \
        dropout_add_norm_fwd_stats_t##NG##_##NAME(const FwdParams<T, S> p) {                           \
        fwd_tier<T, S, NG, true>(p);                                                                  \
    }
#define DAN_STATS(T, S, NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, GENERIC_FWD_MIN)                         \
        dropout_add_norm_fwd_stats_##NAME(const FwdParams<T, S> p) {                                  \
        fwd<T, S, true>(p);                                                                           \
    }                                                                                                 \
    DAN_STATS_TIER(T, S, NAME, 1) DAN_STATS_TIER(T, S, NAME, 2) DAN_STATS_TIER(T, S, NAME, 4)

DAN_STATS(float, float, f32)
DAN_STATS(__half, __half, f16)
DAN_STATS(__nv_bfloat16, __nv_bfloat16, bf16)
DAN_STATS(__half, float, f16_sf32)
DAN_STATS(__nv_bfloat16, float, bf16_sf32)
DAN_STATS_TIER(__half, __half, f16, 8)
DAN_STATS_TIER(__nv_bfloat16, __nv_bfloat16, bf16, 8)

#define DAN_COLSUM(T, S)                                                                              \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) dropout_add_norm_colsum_##S(             \
        const ColsumParams<T> p) {                                                                    \
        colsum<T>(p);                                                                                 \
    }

FUSEDREG_FOR_EACH_DTYPE(DAN_COLSUM)
