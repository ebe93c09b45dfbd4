// Fused bias + activation + dropout (the feed-forward site of a transformer), forward and
// backward with the bias gradient, on row-major [rows, cols] tensors:
//
//   h = x + bias[col]                 a = act(h)          y = keep(seed, call, i) ? T(a * scale) : 0
//   dx = keep ? T((dy * scale) * act'(h)) : 0             dbias[col] = sum over rows of dx (f32)
//
// act is GELU (erf), GELU (tanh approximation), SiLU or ReLU, all in f32 through the bit-exact
// math of common/fmath.cuh. The arithmetic is pinned so that src/bias_act_dropout/cpu.rs
// reproduces it bit for bit (see act_fwd / act_grad below and the module docs of
// src/bias_act_dropout/mod.rs). The mask is the shared dropout keying (common/dropping.cuh,
// drop::keep_bits): word(i) of philox(seed, call, i / 4), dropped when below the threshold (0:
// keep all, 2^32: drop all, no generator work for either); i is the 64-bit flat index.
//
// Launch shape (as kernels/dropout_residual.cu): grid.x walks column groups (blockDim.x threads,
// V consecutive columns each), grid.y walks row slabs of `slab_rows` rows; blockDim.y = LANES row
// lanes, lane l takes rows slab_start + l, + LANES, ... The slab size is a function of
// (rows, cols, dtype) only (src/dropping `slab_rows`), so the backward's dbias
// partials - per (slab, column): the lanes' in-order sums folded ((l0 + l1) + l2) + l3 - and their
// in-order sum over slabs are the same on every GPU and launch, and on the CPU. No float atomics.
//
// The vector path (V = 16 / sizeof(T)) needs cols % V == 0 and 16-byte aligned element pointers
// (checked on the host), so every thread's V elements lie in one row and start at a flat index
// that is a multiple of V (whole Philox blocks). The scalar path (V = 1) takes any shape and any
// alignment. Every index and size is 64-bit. Threads past the last column skip memory accesses
// but still reach the one __syncthreads of the backward.
#include "common/dtype.cuh"
#include "common/fmath.cuh"
#include "common/dropping.cuh"

using namespace fusedreg;

namespace bias_act_dropout {

// Activation codes: must match Activation::code in src/bias_act_dropout/mod.rs.
constexpr uint32_t ACT_GELU_ERF = 0, ACT_GELU_TANH = 1, ACT_SILU = 2, ACT_RELU = 3;
// Row lanes (blockDim.y): the shared dbias partition's (DBIAS_LANES in src/dropping).
constexpr uint32_t LANES = drop::DBIAS_LANES;
constexpr uint32_t MAX_BLOCK_X = 64;  // the host launches blockDim = (64, LANES)

// Constants as bit patterns, the same numbers as src/bias_act_dropout/cpu.rs.
__device__ __forceinline__ float kf(uint32_t b) { return __uint_as_float(b); }
#define K_FRAC_1_SQRT_2 kf(0x3f3504f3u)   // 1/sqrt(2)
#define K_FRAC_1_SQRT_2PI kf(0x3ecc422au) // 1/sqrt(2 pi)
#define K_SQRT_2_PI kf(0x3f4c422au)       // sqrt(2/pi)
#define K_GELU_C kf(0x3d372713u)          // 0.044715
#define K_GELU_3C kf(0x3e095d4fu)         // 3 * 0.044715

__device__ __forceinline__ float neg_zero() { return __uint_as_float(0x80000000u); }

// act(h). Beyond the saturation bound each activation is exactly h (positive side) or -0
// (negative side), what the formulas give there too; the branch only keeps h = +-inf (and h*h
// overflow) from producing inf * 0.
__device__ __forceinline__ float act_fwd(uint32_t act, float h) {
    const float ah = __uint_as_float(__float_as_uint(h) & 0x7fffffffu);
    switch (act) {
        case ACT_GELU_ERF: {
            if (ah >= 16.0f) return h > 0.0f ? h : neg_zero();
            const float c = __fmaf_rn(fr_erf(__fmul_rn(h, K_FRAC_1_SQRT_2)), 0.5f, 0.5f);
            return __fmul_rn(h, c);
        }
        case ACT_GELU_TANH: {
            if (ah >= 16.0f) return h > 0.0f ? h : neg_zero();
            const float h3 = __fmul_rn(__fmul_rn(h, h), h);
            const float t = fr_tanh(__fmul_rn(K_SQRT_2_PI, __fmaf_rn(K_GELU_C, h3, h)));
            return __fmul_rn(h, __fmaf_rn(t, 0.5f, 0.5f));
        }
        case ACT_SILU: {
            if (ah >= 128.0f) return h > 0.0f ? h : neg_zero();
            return __fmul_rn(h, fr_sigmoid(h));
        }
        case ACT_RELU:
        default: {  // ReLU; NaN stays NaN
            return h > 0.0f ? h : (h != h ? h : 0.0f);
        }
    }
}

// act'(h). Beyond the saturation bound: 1 (positive side) or 0 (negative side). NaN gives NaN.
__device__ __forceinline__ float act_grad(uint32_t act, float h) {
    const float ah = __uint_as_float(__float_as_uint(h) & 0x7fffffffu);
    switch (act) {
        case ACT_GELU_ERF: {
            if (ah >= 16.0f) return h > 0.0f ? 1.0f : 0.0f;
            const float c = __fmaf_rn(fr_erf(__fmul_rn(h, K_FRAC_1_SQRT_2)), 0.5f, 0.5f);
            const float pdf = __fmul_rn(fr_exp(__fmul_rn(__fmul_rn(-0.5f, h), h)), K_FRAC_1_SQRT_2PI);
            return __fmaf_rn(h, pdf, c);
        }
        case ACT_GELU_TANH: {
            if (ah >= 16.0f) return h > 0.0f ? 1.0f : 0.0f;
            const float h2 = __fmul_rn(h, h);
            const float h3 = __fmul_rn(h2, h);
            const float t = fr_tanh(__fmul_rn(K_SQRT_2_PI, __fmaf_rn(K_GELU_C, h3, h)));
            const float c = __fmaf_rn(t, 0.5f, 0.5f);
            const float s = __fmaf_rn(-t, t, 1.0f);  // 1 - t^2
            const float w = __fmul_rn(__fmul_rn(0.5f, h), s);
            const float z = __fmul_rn(K_SQRT_2_PI, __fmaf_rn(K_GELU_3C, h2, 1.0f));
            return __fmaf_rn(w, z, c);
        }
        case ACT_SILU: {
            if (ah >= 128.0f) return h > 0.0f ? 1.0f : 0.0f;
            const float sg = fr_sigmoid(h);
            return __fmul_rn(sg, __fmaf_rn(h, __fsub_rn(1.0f, sg), 1.0f));
        }
        case ACT_RELU:
        default: {  // ReLU: 1 above 0, 0 at and below 0, NaN for NaN
            return h > 0.0f ? 1.0f : (h <= 0.0f ? 0.0f : h);
        }
    }
}

template <typename T> __device__ __forceinline__ float ld(const void* p, uint64_t i) {
    return to_f32(reinterpret_cast<const T*>(p)[i]);
}
template <typename T> __device__ __forceinline__ void st(void* p, uint64_t i, float v) {
    reinterpret_cast<T*>(p)[i] = from_f32<T>(v);
}

// V elements of T at p + i as floats: one 16-byte access when V * sizeof(T) == 16.
template <typename T, int V> __device__ __forceinline__ void load_v(const void* p, uint64_t i, float (&out)[V]) {
    if constexpr (V * sizeof(T) == 16) {
        const Vec16<T> v = load16(reinterpret_cast<const T*>(p) + i);
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = to_f32(v.v[k]);
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = ld<T>(p, i + k);
    }
}
template <typename T, int V> __device__ __forceinline__ void store_v(void* p, uint64_t i, const float (&in)[V]) {
    if constexpr (V * sizeof(T) == 16) {
        Vec16<T> v;
#pragma unroll
        for (int k = 0; k < V; ++k) v.v[k] = from_f32<T>(in[k]);
        store16(reinterpret_cast<T*>(p) + i, v);
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) st<T>(p, i + k, in[k]);
    }
}

}  // namespace bias_act_dropout

using namespace bias_act_dropout;

struct BiasActDropoutFwdParams {
    const void* x;
    const void* bias;  // [cols] or null
    void* y;
    void* h_out;       // [rows, cols]: receives T(x + bias), or null
    uint64_t rows, cols, slab_rows, seed, call, threshold;
    float scale;       // 1 / (1 - p) as f32 (0 for p = 1)
    uint32_t act;
};
static_assert(sizeof(BiasActDropoutFwdParams) == 88, "must match src/bias_act_dropout/gpu.rs");

struct BiasActDropoutBwdParams {
    const void* dy;
    const void* x;     // the forward's input (with bias), or null when h is given
    const void* bias;  // [cols] or null
    const void* h;     // the saved pre-activation T(x + bias), or null
    void* dx;
    float* partials;   // [slabs, cols] f32 dbias partials, or null (no dbias)
    uint64_t rows, cols, slab_rows, seed, call, threshold;
    float scale;
    uint32_t act;
};
static_assert(sizeof(BiasActDropoutBwdParams) == 104, "must match src/bias_act_dropout/gpu.rs");

struct BiasActDropoutDbiasParams {
    const float* partials;  // [slabs, cols]
    void* dbias;            // [cols]
    uint64_t slabs, cols;
};
static_assert(sizeof(BiasActDropoutDbiasParams) == 32, "must match src/bias_act_dropout/gpu.rs");

// Rows of one lane handled per loop trip: all their loads are issued before any of their math,
// so more bytes are in flight per thread. Each lane still visits its rows in increasing order,
// so the dbias partials are the same sums.
constexpr int UNROLL = 2;

template <typename T, int V, uint32_t ACT> __device__ __forceinline__ void fwd_impl(const BiasActDropoutFwdParams& p) {
    const uint64_t c0 = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (c0 >= p.cols) return;  // no barrier in the forward
    float b[V];
#pragma unroll
    for (int k = 0; k < V; ++k) b[k] = p.bias ? ld<T>(p.bias, c0 + k) : 0.0f;
    const uint64_t s0 = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t s1 = min(s0 + p.slab_rows, p.rows);
    for (uint64_t row = s0 + threadIdx.y; row < s1; row += LANES * UNROLL) {
        float h[UNROLL][V];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint64_t r = row + (uint64_t)u * LANES;
            if (r < s1) load_v<T, V>(p.x, r * p.cols + c0, h[u]);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint64_t r = row + (uint64_t)u * LANES;
            if (r >= s1) break;
            const uint64_t i = r * p.cols + c0;
            if (p.bias) {
#pragma unroll
                for (int k = 0; k < V; ++k) h[u][k] = __fadd_rn(h[u][k], b[k]);
            }
            if (p.h_out) store_v<T, V>(p.h_out, i, h[u]);
            const uint32_t keep = drop::keep_bits<V>(p.seed, p.call, p.threshold, i);
            float y[V];
#pragma unroll
            for (int k = 0; k < V; ++k)
                y[k] = (keep >> k) & 1u ? __fmul_rn(act_fwd(ACT, h[u][k]), p.scale) : 0.0f;
            store_v<T, V>(p.y, i, y);
        }
    }
}

// The activation as a template argument, so each body is specialised (no per-element switch).
template <typename T, int V> __device__ __forceinline__ void fwd(const BiasActDropoutFwdParams& p) {
    switch (p.act) {
        case ACT_GELU_ERF: fwd_impl<T, V, ACT_GELU_ERF>(p); break;
        case ACT_GELU_TANH: fwd_impl<T, V, ACT_GELU_TANH>(p); break;
        case ACT_SILU: fwd_impl<T, V, ACT_SILU>(p); break;
        default: fwd_impl<T, V, ACT_RELU>(p); break;
    }
}

template <typename T, int V, uint32_t ACT>
__device__ __forceinline__ void bwd_rows(const BiasActDropoutBwdParams& p, uint64_t c0, uint64_t s0, uint64_t s1,
                                         const float (&b)[V], float (&acc)[V]) {
    for (uint64_t row = s0 + threadIdx.y; row < s1; row += LANES * UNROLL) {
        float g[UNROLL][V], h[UNROLL][V];
        uint32_t keep[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint64_t r = row + (uint64_t)u * LANES;
            keep[u] = 0;
            if (r >= s1) continue;
            const uint64_t i = r * p.cols + c0;
            keep[u] = drop::keep_bits<V>(p.seed, p.call, p.threshold, i);
            if (keep[u] == 0) continue;  // a dropped group reads nothing
            load_v<T, V>(p.dy, i, g[u]);
            load_v<T, V>(p.h ? p.h : p.x, i, h[u]);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint64_t r = row + (uint64_t)u * LANES;
            if (r >= s1) break;
            float d[V];
            if (keep[u] == 0) {
#pragma unroll
                for (int k = 0; k < V; ++k) d[k] = 0.0f;
            } else {
                if (!p.h && p.bias) {
#pragma unroll
                    for (int k = 0; k < V; ++k) h[u][k] = __fadd_rn(h[u][k], b[k]);
                }
#pragma unroll
                for (int k = 0; k < V; ++k)
                    d[k] = (keep[u] >> k) & 1u ? __fmul_rn(__fmul_rn(g[u][k], p.scale), act_grad(ACT, h[u][k])) : 0.0f;
            }
            store_v<T, V>(p.dx, r * p.cols + c0, d);
#pragma unroll
            for (int k = 0; k < V; ++k) acc[k] = __fadd_rn(acc[k], d[k]);
        }
    }
}

template <typename T, int V> __device__ __forceinline__ void bwd(const BiasActDropoutBwdParams& p) {
    __shared__ float lanes[LANES][MAX_BLOCK_X * V];
    const uint64_t c0 = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
    const bool active = c0 < p.cols;
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.0f;
    const uint64_t s0 = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t s1 = min(s0 + p.slab_rows, p.rows);
    if (active) {
        float b[V];
#pragma unroll
        for (int k = 0; k < V; ++k) b[k] = (p.bias && !p.h) ? ld<T>(p.bias, c0 + k) : 0.0f;
        switch (p.act) {
            case ACT_GELU_ERF: bwd_rows<T, V, ACT_GELU_ERF>(p, c0, s0, s1, b, acc); break;
            case ACT_GELU_TANH: bwd_rows<T, V, ACT_GELU_TANH>(p, c0, s0, s1, b, acc); break;
            case ACT_SILU: bwd_rows<T, V, ACT_SILU>(p, c0, s0, s1, b, acc); break;
            default: bwd_rows<T, V, ACT_RELU>(p, c0, s0, s1, b, acc); break;
        }
    }
    if (p.partials == nullptr) return;  // uniform across the block
#pragma unroll
    for (int k = 0; k < V; ++k) lanes[threadIdx.y][threadIdx.x * V + k] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float s = lanes[0][threadIdx.x * V + k];
#pragma unroll
            for (uint32_t l = 1; l < LANES; ++l) s = __fadd_rn(s, lanes[l][threadIdx.x * V + k]);
            p.partials[(uint64_t)blockIdx.y * p.cols + c0 + k] = s;
        }
    }
}

template <typename T> __device__ __forceinline__ void dbias(const BiasActDropoutDbiasParams& p) {
    for (uint64_t c = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; c < p.cols;
         c += (uint64_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (uint64_t k = 0; k < p.slabs; ++k) s = __fadd_rn(s, p.partials[k * p.cols + c]);
        st<T>(p.dbias, c, s);
    }
}

// The unfused baseline, PyTorch-eager style: three kernels forward (bias add, activation, dropout
// writing a byte mask), three backward (masked scale from the byte mask, activation gradient,
// column sum). Flat grid-stride loops; the same pinned per-element arithmetic, so the results are
// the fused op's bits except that each intermediate is rounded to T (as eager stores it).
struct BiasActDropoutUnfusedParams {
    const void* a;      // first input
    const void* b;      // second input (bias / h / mask), or null
    void* out;
    uint8_t* mask;      // byte mask out (dropout) or null
    uint64_t n, cols, seed, call, threshold;
    float scale;
    uint32_t act;
};
static_assert(sizeof(BiasActDropoutUnfusedParams) == 80, "must match src/bias_act_dropout/unfused.rs");

#define GRID_STRIDE(i, n) \
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < (n); i += (uint64_t)gridDim.x * blockDim.x)

#define INSTANTIATE(T, S)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) bias_act_dropout_fwd_vec_##S(const BiasActDropoutFwdParams p) { \
        fwd<T, 16 / sizeof(T)>(p);                                                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) bias_act_dropout_fwd_scalar_##S(const BiasActDropoutFwdParams p) { \
        fwd<T, 1>(p);                                                                                     \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) bias_act_dropout_bwd_vec_##S(const BiasActDropoutBwdParams p) { \
        bwd<T, 16 / sizeof(T)>(p);                                                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) bias_act_dropout_bwd_scalar_##S(const BiasActDropoutBwdParams p) { \
        bwd<T, 1>(p);                                                                                     \
    }                                                                                                     \
    extern "C" __global__ void bias_act_dropout_dbias_##S(const BiasActDropoutDbiasParams p) { dbias<T>(p); } \
    /* out = a + bias[i % cols] */                                                                        \
    extern "C" __global__ void bias_act_dropout_unfused_bias_add_##S(const BiasActDropoutUnfusedParams p) { \
        GRID_STRIDE(i, p.n) st<T>(p.out, i, __fadd_rn(ld<T>(p.a, i), ld<T>(p.b, i % p.cols)));         \
    }                                                                                                     \
    /* out = act(a) */                                                                                    \
    extern "C" __global__ void bias_act_dropout_unfused_act_##S(const BiasActDropoutUnfusedParams p) {     \
        GRID_STRIDE(i, p.n) st<T>(p.out, i, act_fwd(p.act, ld<T>(p.a, i)));                             \
    }                                                                                                     \
    /* mask[i] = keep; out = keep ? a * scale : 0 */                                                      \
    extern "C" __global__ void bias_act_dropout_unfused_dropout_##S(const BiasActDropoutUnfusedParams p) { \
        GRID_STRIDE(i, p.n) {                                                                             \
            const bool k = drop::keep_bits<1>(p.seed, p.call, p.threshold, i) != 0;                             \
            p.mask[i] = k ? 1 : 0;                                                                        \
            st<T>(p.out, i, k ? __fmul_rn(ld<T>(p.a, i), p.scale) : 0.0f);                                \
        }                                                                                                 \
    }                                                                                                     \
    /* out = mask[i] ? a * scale : 0  (a = dy; b = the byte mask) */                                      \
    extern "C" __global__ void bias_act_dropout_unfused_masked_scale_##S(const BiasActDropoutUnfusedParams p) { \
        GRID_STRIDE(i, p.n) {                                                                             \
            const bool k = reinterpret_cast<const uint8_t*>(p.b)[i] != 0;                                 \
            st<T>(p.out, i, k ? __fmul_rn(ld<T>(p.a, i), p.scale) : 0.0f);                                \
        }                                                                                                 \
    }                                                                                                     \
    /* out = a * act'(b)  (a = the masked, scaled gradient; b = h) */                                     \
    extern "C" __global__ void bias_act_dropout_unfused_act_grad_##S(const BiasActDropoutUnfusedParams p) { \
        GRID_STRIDE(i, p.n) st<T>(p.out, i, __fmul_rn(ld<T>(p.a, i), act_grad(p.act, ld<T>(p.b, i))));  \
    }                                                                                                     \
    /* out[c] = sum over rows of a[row, c], rows = n / cols, in row order, f32 */                        \
    extern "C" __global__ void bias_act_dropout_unfused_col_sum_##S(const BiasActDropoutUnfusedParams p) { \
        GRID_STRIDE(c, p.cols) {                                                                          \
            float s = 0.0f;                                                                               \
            for (uint64_t i = c; i < p.n; i += p.cols) s = __fadd_rn(s, ld<T>(p.a, i));                  \
            st<T>(p.out, c, s);                                                                           \
        }                                                                                                 \
    }

FUSEDREG_FOR_EACH_DTYPE(INSTANTIATE)
