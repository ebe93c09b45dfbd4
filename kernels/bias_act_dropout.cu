// Fused bias + activation + dropout (the feed-forward site of a transformer), forward and
// backward with the bias gradient, on row-major [rows, cols] tensors:
//
//   h = x + bias[col]                 a = act(h)          y = keep(seed, call, i) ? T(a * scale) : 0
//   dx = keep ? T((dy * scale) * act'(h)) : 0             dbias[col] = sum over rows of dx (f32)
//
// act is GELU (erf), GELU (tanh approximation), SiLU or ReLU, in f32, in one of two math modes
// (p.math, src/math.rs):
//   Math::Exact  the bit-exact common/fmath.cuh, pinned so that src/bias_act_dropout/cpu.rs
//                reproduces it bit for bit (act_fwd / act_grad below, the module docs of
//                src/bias_act_dropout/mod.rs);
//   Math::Fast   the special-function unit (common/fastmath.cuh: ex2, rcp), branch-free formulas
//                (fast_fwd / fast_grad below) within the error bound stated and tested in
//                src/bias_act_dropout/mod.rs; src/bias_act_dropout/fast.rs is their CPU model.
// ReLU has no transcendental: both modes run the same code. The mask is the shared dropout
// keying (common/dropping.cuh, drop::keep_bits_of: 32-bit words, 16-bit halfwords under
// FLAG_KEY16 or bytes under FLAG_KEY8): exact in both modes, and the dropped elements are +0.
// The scale (and keep_frac, log2_scale) is the keying's: 1 / (1 - the effective p).
//
// Per element the kernels compute the value and select it (no branch on the keep bit or the
// data): every lane runs the same instructions whatever its inputs.
//
// Launch shape (as kernels/dropout_residual.cu): grid.x walks column groups (blockDim.x threads,
// V consecutive columns each), grid.y walks row slabs of `slab_rows` rows; blockDim.y = LANES row
// lanes, lane l takes rows slab_start + l, + LANES, ... The slab size is a function of
// (rows, cols, dtype) only (src/dropping `slab_rows`), so the backward's dbias
// partials - per (slab, column): the lanes' in-order sums folded ((l0 + l1) + l2) + l3 - and their
// in-order sum over slabs (the shared staged drop::dbias_finish) are the same on every GPU and
// launch, and on the CPU. No float atomics.
//
// The vector path (V = 16 / sizeof(T)) needs cols % V == 0 and 16-byte aligned element pointers
// (checked on the host), so every thread's V elements lie in one row and start at a flat index
// that is a multiple of V (whole Philox blocks). The scalar path (V = 1) takes any shape and any
// alignment. Every index and size is 64-bit. Threads past the last column skip memory accesses
// but still reach the one __syncthreads of the backward.
#include "common/dtype.cuh"
#include "common/fmath.cuh"
#include "common/fastmath.cuh"
#include "common/dropping.cuh"

using namespace fusedreg;

namespace bias_act_dropout {

// Activation codes: must match Activation::code in src/bias_act_dropout/mod.rs.
constexpr uint32_t ACT_GELU_ERF = 0, ACT_GELU_TANH = 1, ACT_SILU = 2, ACT_RELU = 3;
// Math modes: must match math_code in src/bias_act_dropout/gpu.rs (0 = Exact, so a zeroed params
// struct is the bit-exact mode).
constexpr uint32_t MATH_EXACT = 0, MATH_FAST = 1;
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


// ---------------------------------------------------------------------------------------------
// Math::Fast: the activations on the special-function unit. Same bit patterns as
// src/bias_act_dropout/fast.rs, which models these functions on the CPU (the error analysis and
// its pessimistic test live there). Every operation is written as an intrinsic, never contracted.
//
// GELU (tanh form) is h * sigmoid(2u), 2u = 2 sqrt(2/pi) (h + 0.044715 h^3), the identity
// (1 + tanh u) / 2 = 1 / (1 + e^-2u): unlike 1 + tanh.approx(u) it keeps its relative accuracy
// where GELU tends to 0 (h -> -inf). With z = -2u log2(e) = h * fma(-A1, h^2, -A0):
#define KF_NEG_A0 kf(0xc0135761u)          // -2 sqrt(2/pi) log2(e)
#define KF_NEG_A1 kf(0xbdd2d3e8u)          // -2 sqrt(2/pi) 0.044715 log2(e)
#define KF_B0 kf(0x3fcc422au)              // d(2u)/dh = B0 + B1 h^2: 2 sqrt(2/pi)
#define KF_B1 kf(0x3e5b33b6u)              //   and 2 sqrt(2/pi) 3 0.044715
#define KF_NEG_LOG2E kf(0xbfb8aa3bu)       // -log2(e)
// GELU (erf): Phi(h) = q for h < 0 and 1 - q above, q = erfc(|h| / sqrt 2) / 2 =
// t 2^(-h^2 log2(e) / 2 + F(t)), t = 1 / (1 + |h| / (2 sqrt 2)), F a cubic fitted (minimax, f32
// coefficients) to log2(erfc(a) / (2 t)) + a^2 log2(e) over |h| <= 16: relative error of q
// 2^-11.56 (the Numerical Recipes erfc form with fewer terms).
#define KF_ERF_K kf(0x3eb504f3u)           // 1 / (2 sqrt 2)
#define KF_ERF_F3 kf(0xbefc568du)          // -0.49284783
#define KF_ERF_F2 kf(0x3f7be3bbu)          //  0.98394364
#define KF_ERF_F1 kf(0x3fa99978u)          //  1.3249960
#define KF_ERF_F0 kf(0xc0343303u)          // -2.8156135
#define KF_NEG_HALF_LOG2E kf(0xbf38aa3bu)  // -log2(e) / 2
#define KF_LOG2_PDF0 kf(0xbfa9b21du)       // log2(1 / sqrt(2 pi))
// The backward's GELU (erf) shares one exponential between Phi and phi: with a = |h|,
// phi = 2^(-a^2 log2(e) / 2 + log2(1 / sqrt(2 pi))) and q = 1 - Phi(a) = phi M(a), M the Mills
// ratio, M(a) = t P(t), t = 1 / (1 + 0.3 a), P a cubic fitted (minimax in the relative error, f32
// coefficients) over a <= 16: relative error of q 2^-12.08.
#define KF_ERFB_K kf(0x3e99999au)          // 0.3
#define KF_ERFB_P3 kf(0x3f0603dfu)         // 0.52349657
#define KF_ERFB_P2 kf(0x3db6b0c7u)         // 0.089204364
#define KF_ERFB_P1 kf(0x3eb0705bu)         // 0.34460720
#define KF_ERFB_P0 kf(0x3e97b3e6u)         // 0.29629439

// scale * act(h), the kept value of the forward (before the dropout select). keep_frac = 1 - p:
// the sigmoid forms divide by it inside their reciprocal, and erf_c0 = F0 + log2(scale) puts the
// scale into the GELU-erf exponent, so no activation spends an instruction on the scale.
// Saturation and specials come out of the formulas: 2^z overflows to +inf (the reciprocal is
// then 0) or flushes to 0, and the final factor max(h, -16) keeps h = -inf from making -inf * 0
// (the result there is -0, as the exact mode's); a NaN h reaches the result through the
// reciprocal. Instructions (SASS, sm_90): GELU-tanh 8, SiLU 6, GELU-erf 14.
template <uint32_t ACT>
__device__ __forceinline__ float fast_fwd(float h, float keep_frac, float scale, float erf_c0) {
    if constexpr (ACT == ACT_GELU_TANH) {
        const float z = __fmul_rn(h, __fmaf_rn(KF_NEG_A1, __fmul_rn(h, h), KF_NEG_A0));
        const float r = fast::rcp(__fmaf_rn(fast::ex2(z), keep_frac, keep_frac));  // scale / (1 + e^-2u)
        return __fmul_rn(fmaxf(h, -16.0f), r);
    } else if constexpr (ACT == ACT_SILU) {
        const float r = fast::rcp(__fmaf_rn(fast::ex2(__fmul_rn(h, KF_NEG_LOG2E)), keep_frac, keep_frac));
        return __fmul_rn(fmaxf(h, -128.0f), r);
    } else {  // ACT_GELU_ERF
        const float t = fast::rcp(__fmaf_rn(fabsf(h), KF_ERF_K, 1.0f));
        float f = __fmaf_rn(KF_ERF_F3, t, KF_ERF_F2);
        f = __fmaf_rn(f, t, KF_ERF_F1);
        f = __fmaf_rn(f, t, erf_c0);
        const float qs = __fmul_rn(t, fast::ex2(__fmaf_rn(__fmul_rn(h, h), KF_NEG_HALF_LOG2E, f)));
        const float c = h < 0.0f ? qs : __fsub_rn(scale, qs);  // scale * Phi(h)
        return __fmul_rn(fmaxf(h, -16.0f), c);
    }
}

// scale * act'(h) of the backward as two factors (a, b), the kept dx being (dy * a) * b. h is
// first clamped (NaN kept) to where every intermediate is finite (2^z at most 2^116): beyond it
// act' is 1 or 0 to within 2^-88 of the exact value. The derivatives:
//   GELU-tanh  c (1 + h (B0 + B1 h^2) (1 - c)),  c = 1 / (1 + e), 1 - c = e c
//   SiLU       c (1 + h (1 - c)),                 c = 1 / (1 + 2^(-h log2 e))
//   GELU-erf   Phi(h) + h phi(h)
// GELU-tanh and SiLU fold the scale into c, as the forward does: the exponent takes
// log2_keep = log2(1 - p), so ek = (1 - p) e, and a = 1 / (ek + (1 - p)) = scale c, while
// ek a = e c stays the unscaled 1 - c; b = 1 + w e c (w = h (B0 + B1 h^2) for GELU-tanh, h for
// SiLU). GELU-erf returns a = 1 (bwd_row then forms dx = dy * b, one product) and b = scale act':
// with a = min(|h|, 16), act'(-a) = q - a phi = phi (t P(t) - a) and act'(a) = 1 - act'(-a), so
// r = scale act'(-a) = phis (t P(t) - a), phis = scale phi = 2^(-a^2 log2(e) / 2 + erf_c) with
// erf_c = log2(1 / sqrt(2 pi)) - log2_keep (the scale in the exponent; +inf for p = 1, where no
// element is kept and the select discards b), and b = r (h < 0) or scale - r: one ex2 and one
// rcp. Instructions per element with the dx products: GELU-tanh 14, SiLU 10, GELU-erf 14.
template <uint32_t ACT>
__device__ __forceinline__ void fast_grad(float h, float scale, float keep_frac, float log2_keep, float erf_c,
                                          float& a, float& b) {
    static_assert(ACT != ACT_RELU, "ReLU has no fast form: it runs the exact body");
    if constexpr (ACT == ACT_GELU_TANH) {
        const float hc = fast::min_nan(fast::max_nan(h, -9.0f), 9.0f);
        const float h2 = __fmul_rn(hc, hc);
        const float ek = fast::ex2(__fmaf_rn(hc, __fmaf_rn(KF_NEG_A1, h2, KF_NEG_A0), log2_keep));
        a = fast::rcp(__fadd_rn(ek, keep_frac));
        const float w = __fmul_rn(hc, __fmaf_rn(KF_B1, h2, KF_B0));
        b = __fmaf_rn(w, __fmul_rn(ek, a), 1.0f);
    } else if constexpr (ACT == ACT_SILU) {
        const float hc = fast::min_nan(fast::max_nan(h, -80.0f), 80.0f);
        const float ek = fast::ex2(__fmaf_rn(hc, KF_NEG_LOG2E, log2_keep));
        a = fast::rcp(__fadd_rn(ek, keep_frac));
        b = __fmaf_rn(hc, __fmul_rn(ek, a), 1.0f);
    } else {  // ACT_GELU_ERF
        const float ac = fast::min_nan(fabsf(h), 16.0f);
        const float t = fast::rcp(__fmaf_rn(ac, KF_ERFB_K, 1.0f));
        float pt = __fmaf_rn(KF_ERFB_P3, t, KF_ERFB_P2);
        pt = __fmaf_rn(pt, t, KF_ERFB_P1);
        pt = __fmaf_rn(pt, t, KF_ERFB_P0);
        const float v = __fmaf_rn(t, pt, -ac);  // t P(t) - a = act'(-a) / phi(a)
        const float phis = fast::ex2(__fmaf_rn(__fmul_rn(ac, ac), KF_NEG_HALF_LOG2E, erf_c));
        const float r = __fmul_rn(phis, v);
        a = 1.0f;
        b = h < 0.0f ? r : __fsub_rn(scale, r);
    }
}

template <typename T> __device__ __forceinline__ float ld(const void* p, uint64_t i) {
    return to_f32(reinterpret_cast<const T*>(p)[i]);
}
template <typename T> __device__ __forceinline__ void st(void* p, uint64_t i, float v) {
    reinterpret_cast<T*>(p)[i] = from_f32<T>(v);
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
    float keep_frac;   // 1 - p as f32 (Math::Fast's sigmoid forms divide by it)
    float log2_scale;  // log2(scale) as f32, -inf for p = 1 (Math::Fast's GELU-erf)
    uint32_t act;
    uint32_t math;     // MATH_EXACT or MATH_FAST
    uint32_t flags;    // drop::FLAG_KEY16 / FLAG_KEY8: 16- / 8-bit keying (threshold in 0 ..= 2^16 / 2^8)
};
static_assert(sizeof(BiasActDropoutFwdParams) == 104, "must match src/bias_act_dropout/gpu.rs");

struct BiasActDropoutBwdParams {
    const void* dy;
    const void* x;     // the forward's input (with bias), or null when h is given
    const void* bias;  // [cols] or null
    const void* h;     // the saved pre-activation T(x + bias), or null
    void* dx;
    float* partials;   // [slabs, cols] f32 dbias partials, or null (no dbias)
    uint64_t rows, cols, slab_rows, seed, call, threshold;
    float scale;
    uint32_t act, math, flags;
    float keep_frac;     // 1 - p as f32 (Math::Fast's GELU-tanh / SiLU fold the scale in)
    float log2_keep;     // log2(1 - p) as f32, -inf for p = 1
};
static_assert(sizeof(BiasActDropoutBwdParams) == 120, "must match src/bias_act_dropout/gpu.rs");

// Rows of one lane handled per loop trip: all their loads are issued before any of their math
// (and before their Philox words are computed), so UNROLL rows of bytes are in flight per thread.
// Each lane still visits its rows in increasing order, so the dbias partials are the same sums.
// The backward holds two tensors' rows and stays within 64 registers at 4.
constexpr int FWD_UNROLL = 4;
constexpr int BWD_UNROLL = 2;

// Keying resolutions as template arguments (bits per element's random number): KEY32, KEY16
// (FLAG_KEY16) and KEY8 (FLAG_KEY8), tested once per thread, outside the row loop.
constexpr int KEY32 = 32, KEY16 = 16, KEY8 = 8;

// The keep decisions of elements i .. i+V-1 (i a multiple of V) under the keying the kernel was
// dispatched with, as the random numbers they are compared with: kept(k) is bit k of
// drop::keep_bits<V> / keep_bits16<V> / keep_bits8<V> (the same Philox words, the same
// threshold), but it is decided where the element is selected, so the compare's predicate feeds
// the select directly (no keep bits packed into an integer and extracted again).
// threshold 0 and >= 2^bits do no generator work: the numbers are then all ones and tm1 is 0
// (all kept) or 2^bits - 1 (none).
template <int V, int KEY>
struct RowKeep {
    static_assert(V == 4 || V == 8, "the vector paths: V = 4 (f32) or 8 (f16, bf16)");
    static constexpr int NW = KEY == KEY32 ? V : KEY == KEY16 ? V / 2 : (V + 3) / 4;  // words used
    uint32_t w[NW];
    uint32_t tm1;  // threshold - 1: an element is kept when its number is above it
    __device__ __forceinline__ bool kept(int k) const {
        if constexpr (KEY == KEY32) return w[k] > tm1;
        else if constexpr (KEY == KEY16) return ((k & 1) ? w[k >> 1] >> 16 : w[k >> 1] & 0xffffu) > tm1;
        else return ((w[k >> 2] >> (8 * (k & 3))) & 0xffu) > tm1;
    }
};

template <int V, int KEY, typename P>
__device__ __forceinline__ RowKeep<V, KEY> row_keep(const P& p, uint64_t i) {
    RowKeep<V, KEY> r;
    constexpr uint64_t ALL = KEY == KEY32 ? drop::THRESHOLD_ALL : KEY == KEY16 ? drop::THRESHOLD16_ALL
                                                                              : drop::THRESHOLD8_ALL;
    if (p.threshold == 0 || p.threshold >= ALL) {
#pragma unroll
        for (int j = 0; j < r.NW; ++j) r.w[j] = 0xffffffffu;
        r.tm1 = p.threshold == 0 ? 0u : (uint32_t)(ALL - 1);
        return r;
    }
    r.tm1 = (uint32_t)p.threshold - 1u;
    if constexpr (KEY == KEY32) {  // word i % 4 of block i / 4
#pragma unroll
        for (int b = 0; b < V / 4; ++b) {
            const uint4 w = philox_block(p.seed, p.call, (i >> 2) + b);
            r.w[4 * b] = w.x, r.w[4 * b + 1] = w.y, r.w[4 * b + 2] = w.z, r.w[4 * b + 3] = w.w;
        }
    } else if constexpr (KEY == KEY16) {  // halfword i % 8 of block i / 8
        const uint4 w = philox_block(p.seed, p.call, i >> 3);
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
        const int base = V == 8 ? 0 : (int)((i & 4) >> 1);
#pragma unroll
        for (int j = 0; j < r.NW; ++j) r.w[j] = words[base + j];
    } else {  // byte i % 16 of block i / 16
        const uint4 w = philox_block(p.seed, p.call, i >> 4);
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
        const int base = (int)((i & 15) >> 2);
#pragma unroll
        for (int j = 0; j < r.NW; ++j) r.w[j] = words[base + j];
    }
    return r;
}

// The scalar path (V = 1): drop::keep_bits_of's choice, one bit.
template <int KEY, typename P>
__device__ __forceinline__ uint32_t scalar_keep_bit(const P& p, uint64_t i) {
    if constexpr (KEY == KEY8) return drop::keep_bits8<1>(p.seed, p.call, p.threshold, i);  // 8-bit keying
    else if constexpr (KEY == KEY16) return drop::keep_bits16<1>(p.seed, p.call, p.threshold, i);  // 16-bit keying
    else return drop::keep_bits<1>(p.seed, p.call, p.threshold, i);  // 32-bit keying
}

// Keep decisions of one row visit: RowKeep for the vector paths, one bit for the scalar path.
template <int V, int KEY>
struct Keep {
    RowKeep<V, KEY> r;
    __device__ __forceinline__ bool kept(int k) const { return r.kept(k); }
};
template <int KEY>
struct Keep<1, KEY> {
    uint32_t bit;
    __device__ __forceinline__ bool kept(int) const { return bit != 0u; }
};
// The forward takes the keep bits packed under 32-bit keying, and under 16-bit keying for f32
// (drop::keep_bits_of's; 16-bit T under 16-bit keying: PairKeep below):
// there ptxas turns the bit tests into one R2P per row, fewer instructions than RowKeep's compare
// per element (sm_90, nvcc 13.0, GELU-tanh: 30.2 vs 31.2 per element at 32 bits, 25.9 vs 26.3
// at 16); under 8-bit keying RowKeep is shorter (28.4 vs 30.8), and in the backward always.
template <int V, int KEY>
struct PackedKeep {
    uint32_t bits;
    __device__ __forceinline__ bool kept(int k) const { return (bits >> k) & 1u; }
};
template <int V, int KEY, typename P>
__device__ __forceinline__ PackedKeep<V, KEY> row_keep_packed(const P& p, uint64_t i) {
    if constexpr (KEY == KEY16) return {drop::keep_bits16<V>(p.seed, p.call, p.threshold, i)};  // fwd 16-bit keying
    else return {drop::keep_bits<V>(p.seed, p.call, p.threshold, i)};  // fwd 32-bit keying
}

// Halfword lanes of x at or above those of y (unsigned, each lane 0 ..= 0xffff): 0xffff in each
// such lane, 0 in the others. SWAR: r = (x | H) - (y & ~H) subtracts the low 15 bits of each lane
// without a borrow between lanes (lane value 0x8000 + xl - yl, 1 ..= 0xffff), so its lane msb is
// xl >= yl; x >= y is then (xh & !yh) | (xh == yh & that), one LOP3 on (x, y, r), and PRMT's
// sign-replicating selector spreads each lane's msb over the lane (3 + 1 instructions per word,
// where comparing two extracted halfwords costs 2 + 2 and a select per element).
__device__ __forceinline__ uint32_t ge_u16x2(uint32_t x, uint32_t y) {
    const uint32_t r = (x | 0x80008000u) - (y & 0x7fff7fffu);
    const uint32_t f = (x & ~y) | (~(x ^ y) & r);  // lane msb: x >= y
#if defined(__CUDA_ARCH__)
    uint32_t m;
    asm("prmt.b32 %0, %1, 0, 0xbb99;" : "=r"(m) : "r"(f));  // bytes 0, 1 <- sign of byte 1; 2, 3 <- of byte 3
    return m;
#else
    return ((f & 0x8000u) ? 0x0000ffffu : 0u) | ((f & 0x80000000u) ? 0xffff0000u : 0u);
#endif
}

// The forward under 16-bit keying with a 16-bit T (V = 8: one Philox block, halfword k keys
// element k): the decisions as one mask per packed output word (word j holds elements 2j, 2j + 1,
// keyed by halfwords 2j, 2j + 1 = word j of the block), applied to the packed result with one
// LOP3 per pair instead of a select per element. The same decisions as drop::keep_bits16<8>
// (kept when the halfword is >= threshold): `y` is the threshold in both halfwords and `all`
// ~0, or, where the generator has no work (tested once per thread, see pair_keying), y = 0
// (every halfword passes: threshold 0 keeps all) and all = 0 for threshold >= 2^16 (none kept).
struct PairKeying {
    uint32_t y, all;
    bool gen;
};
template <typename P> __device__ __forceinline__ PairKeying pair_keying(const P& p) {
    const bool gen = p.threshold != 0 && p.threshold < drop::THRESHOLD16_ALL;
    const uint32_t t = gen ? (uint32_t)p.threshold : 0u;
    return {t | (t << 16), p.threshold < drop::THRESHOLD16_ALL ? 0xffffffffu : 0u, gen};
}
template <int V>
struct PairKeep {
    static_assert(V == 8, "16-bit T: 8 elements, 4 words");
    uint32_t w[V / 2];
    uint32_t y, all;
    __device__ __forceinline__ uint32_t apply(int j, uint32_t word) const { return word & ge_u16x2(w[j], y) & all; }
};
template <int V, typename P>
__device__ __forceinline__ PairKeep<V> row_keep_pairs(const P& p, const PairKeying& kg, uint64_t i) {
    PairKeep<V> r;
    r.y = kg.y, r.all = kg.all;
    if (kg.gen) {
        const uint4 w = philox_block(p.seed, p.call, i >> 3);  // halfword i % 8 of block i / 8
        r.w[0] = w.x, r.w[1] = w.y, r.w[2] = w.z, r.w[3] = w.w;
    } else {
#pragma unroll
        for (int j = 0; j < V / 2; ++j) r.w[j] = 0u;  // any value: y = 0 keeps it, all = 0 drops it
    }
    return r;
}

template <int V, int KEY, typename P>
__device__ __forceinline__ Keep<V, KEY> row_keep_of(const P& p, uint64_t i) {
    if constexpr (V == 1) return Keep<1, KEY>{scalar_keep_bit<KEY>(p, i)};
    else return Keep<V, KEY>{row_keep<V, KEY>(p, i)};
}

// The forward's choice (see PackedKeep, PairKeep).
template <typename T, int V, int KEY>
constexpr bool FWD_PAIRS = KEY == KEY16 && sizeof(T) == 2 && V == 8;
template <typename T, int V, int KEY, typename P>
__device__ __forceinline__ auto fwd_keep(const P& p, const PairKeying& kg, uint64_t i) {
    if constexpr (FWD_PAIRS<T, V, KEY>) return row_keep_pairs<V>(p, kg, i);
    else if constexpr (KEY == KEY8 || V == 1) return row_keep_of<V, KEY>(p, i);
    else return row_keep_packed<V, KEY>(p, i);
}

// scale * act(h), the forward's kept value.
template <uint32_t ACT, uint32_t MATH>
__device__ __forceinline__ float fwd_value(float h, const BiasActDropoutFwdParams& p, float erf_c0) {
    return MATH == MATH_FAST ? fast_fwd<ACT>(h, p.keep_frac, p.scale, erf_c0) : __fmul_rn(act_fwd(ACT, h), p.scale);
}

template <typename T, int V, uint32_t ACT, uint32_t MATH, int KEY>
__device__ __forceinline__ void fwd_keyed(const BiasActDropoutFwdParams& p) {
    const uint64_t c0 = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (c0 >= p.cols) return;  // no barrier in the forward
    float b[V];
#pragma unroll
    for (int k = 0; k < V; ++k) b[k] = p.bias ? ld<T>(p.bias, c0 + k) : 0.0f;
    const float erf_c0 = __fadd_rn(KF_ERF_F0, p.log2_scale);
    const uint64_t s0 = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t s1 = min(s0 + p.slab_rows, p.rows);
    const uint64_t row0 = s0 + threadIdx.y;
    if (row0 >= s1) return;
    // This lane's rows row0, row0 + LANES, ...: pointers and the flat index step by `stride`
    // (no 64-bit multiply per row), and a row count replaces the 64-bit bound compares.
    const uint64_t stride = (uint64_t)LANES * p.cols;
    uint64_t i = row0 * p.cols + c0;
    const T* x = reinterpret_cast<const T*>(p.x) + i;
    T* y = reinterpret_cast<T*>(p.y) + i;
    const PairKeying kg = pair_keying(p);  // used by the FWD_PAIRS keying only
    for (uint64_t left = (s1 - row0 + LANES - 1) / LANES; left > 0;) {
        const int n = left < (uint64_t)FWD_UNROLL ? (int)left : FWD_UNROLL;
        Pack<T, V> xv[FWD_UNROLL];
#pragma unroll
        for (int u = 0; u < FWD_UNROLL; ++u)
            if (u < n) xv[u] = load_pack<T, V>(x + u * stride, V);
#pragma unroll
        for (int u = 0; u < FWD_UNROLL; ++u) {
            if (u >= n) break;
            const auto keep = fwd_keep<T, V, KEY>(p, kg, i);
            float h[V];
#pragma unroll
            for (int k = 0; k < V; ++k) h[k] = p.bias ? __fadd_rn(xv[u].get(k), b[k]) : xv[u].get(k);
            if (p.h_out) {
                Pack<T, V> hv;
#pragma unroll
                for (int k = 0; k < V; ++k) hv.set_raw(k, f32_to_bits<T>(h[k]));
                store_pack<T, V>(reinterpret_cast<T*>(p.h_out) + i, hv, V);
            }
            Pack<T, V> yv;
            if constexpr (FWD_PAIRS<T, V, KEY>) {  // a dropped element's bits are 0: +0, as T(0.0f)
#pragma unroll
                for (int j = 0; j < V / 2; ++j)
                    yv.w[j] = keep.apply(j, pack2<T>(fwd_value<ACT, MATH>(h[2 * j], p, erf_c0),
                                                     fwd_value<ACT, MATH>(h[2 * j + 1], p, erf_c0)));
            } else {
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const float v = fwd_value<ACT, MATH>(h[k], p, erf_c0);
                    yv.set_raw(k, f32_to_bits<T>(keep.kept(k) ? v : 0.0f));
                }
            }
            store_pack<T, V>(y + u * stride, yv, V);
            i += stride;
        }
        x += n * stride;
        y += n * stride;
        left -= n;
    }
}

template <typename T, int V, uint32_t ACT, uint32_t MATH>
__device__ __forceinline__ void fwd_impl(const BiasActDropoutFwdParams& p) {
    if (p.flags & drop::FLAG_KEY8) fwd_keyed<T, V, ACT, MATH, KEY8>(p);
    else if (p.flags & drop::FLAG_KEY16) fwd_keyed<T, V, ACT, MATH, KEY16>(p);
    else fwd_keyed<T, V, ACT, MATH, KEY32>(p);
}

// The activation and math mode as template arguments, so each body is specialised (no
// per-element switch). One kernel per math mode (the host picks the symbol): the fmath bodies
// need more registers than the fast ones, and a kernel's register count is its largest body's.
// ReLU has no transcendental: both kernels run the same body for it.
template <typename T, int V, uint32_t MATH> __device__ __forceinline__ void fwd(const BiasActDropoutFwdParams& p) {
    switch (p.act) {
        case ACT_GELU_ERF: fwd_impl<T, V, ACT_GELU_ERF, MATH>(p); break;
        case ACT_GELU_TANH: fwd_impl<T, V, ACT_GELU_TANH, MATH>(p); break;
        case ACT_SILU: fwd_impl<T, V, ACT_SILU, MATH>(p); break;
        default: fwd_impl<T, V, ACT_RELU, MATH_EXACT>(p); break;
    }
}

// The backward's keep decisions of one row visit. Unlike row_keep, the threshold is not tested
// here: bwd_keyed tests it once per thread and passes GEN = false when the generator has no work
// (threshold 0: all kept, tm1 = 0; threshold >= 2^bits: none kept, tm1 = 2^bits - 1), so the row
// loop carries no per-row test. The words and kept(k) are row_keep's (the same RowKeep).
template <int V, int KEY, bool GEN, typename P>
__device__ __forceinline__ Keep<V, KEY> bwd_row_keep(const P& p, uint64_t i, uint32_t tm1) {
    if constexpr (V == 1) {
        return Keep<1, KEY>{scalar_keep_bit<KEY>(p, i)};
    } else {
        Keep<V, KEY> k;
        k.r.tm1 = tm1;
        if constexpr (!GEN) {
#pragma unroll
            for (int j = 0; j < k.r.NW; ++j) k.r.w[j] = 0xffffffffu;
        } else if constexpr (KEY == KEY32) {  // word i % 4 of block i / 4
#pragma unroll
            for (int b = 0; b < V / 4; ++b) {
                const uint4 w = philox_block(p.seed, p.call, (i >> 2) + b);
                k.r.w[4 * b] = w.x, k.r.w[4 * b + 1] = w.y, k.r.w[4 * b + 2] = w.z, k.r.w[4 * b + 3] = w.w;
            }
        } else if constexpr (KEY == KEY16) {  // halfword i % 8 of block i / 8
            const uint4 w = philox_block(p.seed, p.call, i >> 3);
            const uint32_t words[4] = {w.x, w.y, w.z, w.w};
            const int base = V == 8 ? 0 : (int)((i & 4) >> 1);
#pragma unroll
            for (int j = 0; j < k.r.NW; ++j) k.r.w[j] = words[base + j];
        } else {  // byte i % 16 of block i / 16
            const uint4 w = philox_block(p.seed, p.call, i >> 4);
            const uint32_t words[4] = {w.x, w.y, w.z, w.w};
            const int base = (int)((i & 15) >> 2);
#pragma unroll
            for (int j = 0; j < k.r.NW; ++j) k.r.w[j] = words[base + j];
        }
        return k;
    }
}

// One row visit of the backward: V elements of dy and h (or x) in, V of dx out, the dbias
// accumulators updated. b is the bias, or -0.0f where none is added (h given, or no bias):
// h + (-0) is h exactly for every h (+0 + -0 = +0 under round-to-nearest), so the add is
// unconditional. 16-bit results are packed in pairs (pack2: one F2FP per pair, the same
// round-to-nearest-even bits as f32_to_bits).
template <typename T, int V, uint32_t ACT, uint32_t MATH, int KEY, bool GEN>
__device__ __forceinline__ void bwd_row(const BiasActDropoutBwdParams& p, const Pack<T, V>& gv, const Pack<T, V>& hv,
                                        T* dx, uint64_t i, uint32_t tm1, float scale, float erf_c, const float (&b)[V],
                                        float (&acc)[V]) {
    const Keep<V, KEY> keep = bwd_row_keep<V, KEY, GEN>(p, i, tm1);
    float d[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float h = __fadd_rn(hv.get(k), b[k]);
        float ga = scale, gb;  // dx = (dy * ga) * gb: (scale, act') or fast_grad's factors
        if constexpr (MATH == MATH_FAST) fast_grad<ACT>(h, scale, p.keep_frac, p.log2_keep, erf_c, ga, gb);
        else gb = act_grad(ACT, h);
        // Fast GELU (erf): ga is 1 and gb carries the scale, so dx = dy * gb (dy * 1 is dy exactly).
        constexpr bool ONE = MATH == MATH_FAST && ACT == ACT_GELU_ERF;
        d[k] = keep.kept(k) ? __fmul_rn(ONE ? gv.get(k) : __fmul_rn(gv.get(k), ga), gb) : 0.0f;
        acc[k] = __fadd_rn(acc[k], d[k]);
    }
    Pack<T, V> dv;
    if constexpr (sizeof(T) == 2 && V % 2 == 0) {
#pragma unroll
        for (int j = 0; j < V / 2; ++j) dv.w[j] = pack2<T>(d[2 * j], d[2 * j + 1]);
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) dv.set_raw(k, f32_to_bits<T>(d[k]));
    }
    store_pack<T, V>(dx, dv, V);
}

// This lane's rows row0, row0 + LANES, ... of the slab, in increasing order (so the dbias
// partials are the same sums): whole trips of BWD_UNROLL rows with every load issued before any
// math and no per-row test, then the remainder row. Pointers and the flat index step by `stride`
// (no 64-bit multiply per row).
template <typename T, int V, uint32_t ACT, uint32_t MATH, int KEY, bool GEN>
__device__ __forceinline__ void bwd_rows(const BiasActDropoutBwdParams& p, uint64_t c0, uint64_t row0, uint64_t s1,
                                         uint32_t tm1, const float (&b)[V], float (&acc)[V]) {
    static_assert(BWD_UNROLL == 2, "the remainder below is one row");
    const float scale = p.scale;
    const float erf_c = __fsub_rn(KF_LOG2_PDF0, p.log2_keep);  // Math::Fast GELU (erf): see fast_grad
    const uint64_t stride = (uint64_t)LANES * p.cols;
    uint64_t i = row0 * p.cols + c0;
    const T* dy = reinterpret_cast<const T*>(p.dy) + i;
    const T* hs = reinterpret_cast<const T*>(p.h ? p.h : p.x) + i;
    T* dx = reinterpret_cast<T*>(p.dx) + i;
    const uint64_t rows = (s1 - row0 + LANES - 1) / LANES;
    for (uint64_t trips = rows / BWD_UNROLL; trips > 0; --trips) {
        Pack<T, V> gv[BWD_UNROLL], hv[BWD_UNROLL];
#pragma unroll
        for (int u = 0; u < BWD_UNROLL; ++u) {
            gv[u] = load_pack<T, V>(dy + u * stride, V);
            hv[u] = load_pack<T, V>(hs + u * stride, V);
        }
#pragma unroll
        for (int u = 0; u < BWD_UNROLL; ++u)
            bwd_row<T, V, ACT, MATH, KEY, GEN>(p, gv[u], hv[u], dx + u * stride, i + u * stride, tm1, scale, erf_c, b, acc);
        dy += BWD_UNROLL * stride;
        hs += BWD_UNROLL * stride;
        dx += BWD_UNROLL * stride;
        i += BWD_UNROLL * stride;
    }
    if (rows % BWD_UNROLL != 0) {
        const Pack<T, V> gv = load_pack<T, V>(dy, V), hv = load_pack<T, V>(hs, V);  // the remainder row
        bwd_row<T, V, ACT, MATH, KEY, GEN>(p, gv, hv, dx, i, tm1, scale, erf_c, b, acc);
    }
}

// One activation's whole backward: its rows, then the lanes' partials folded through shared
// memory. Each activation is a complete body (the switch in bwd picks one and returns), so the
// register allocator sees no merge of four bodies' accumulators.
template <typename T, int V, uint32_t ACT, uint32_t MATH, int KEY>
__device__ __forceinline__ void bwd_keyed(const BiasActDropoutBwdParams& p, float (*lanes)[MAX_BLOCK_X * V]) {
    const uint64_t c0 = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
    const bool active = c0 < p.cols;
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.0f;
    const uint64_t s0 = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t s1 = min(s0 + p.slab_rows, p.rows);
    const uint64_t row0 = s0 + threadIdx.y;
    if (active && row0 < s1) {
        float b[V];  // -0.0f: no bias added (see bwd_row)
#pragma unroll
        for (int k = 0; k < V; ++k) b[k] = (p.bias && !p.h) ? ld<T>(p.bias, c0 + k) : neg_zero();
        // The generator's special thresholds, tested once per thread (see bwd_row_keep).
        constexpr uint64_t ALL = KEY == KEY32 ? drop::THRESHOLD_ALL : KEY == KEY16 ? drop::THRESHOLD16_ALL
                                                                                  : drop::THRESHOLD8_ALL;
        if constexpr (V == 1)  // scalar_keep_bit tests the threshold itself
            bwd_rows<T, V, ACT, MATH, KEY, true>(p, c0, row0, s1, 0u, b, acc);
        else if (p.threshold != 0 && p.threshold < ALL)
            bwd_rows<T, V, ACT, MATH, KEY, true>(p, c0, row0, s1, (uint32_t)p.threshold - 1u, b, acc);
        else
            bwd_rows<T, V, ACT, MATH, KEY, false>(p, c0, row0, s1, p.threshold == 0 ? 0u : (uint32_t)(ALL - 1), b,
                                                  acc);
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

// The keying is dispatched here, around whole bodies (a merge of the two loops' accumulators
// before the partials made ptxas spill).
template <typename T, int V, uint32_t ACT, uint32_t MATH>
__device__ __forceinline__ void bwd_body(const BiasActDropoutBwdParams& p, float (*lanes)[MAX_BLOCK_X * V]) {
    if (p.flags & drop::FLAG_KEY8) {
        bwd_keyed<T, V, ACT, MATH, KEY8>(p, lanes);
        return;
    }
    if (p.flags & drop::FLAG_KEY16) {
        bwd_keyed<T, V, ACT, MATH, KEY16>(p, lanes);
        return;
    }
    bwd_keyed<T, V, ACT, MATH, KEY32>(p, lanes);
}

// One body, one keying: the entries of the per-activation vector kernels. The keying is a
// template argument of the entry (the host picks the symbol by MaskResolution, p.flags is not
// read), so each kernel holds one keying's loop (GEN true and false) instead of three: with the
// three behind a run-time test ptxas spilled (224 bytes per thread for GELU-tanh).
template <typename T, int V, uint32_t ACT, uint32_t MATH, int KEY>
__device__ __forceinline__ void bwd_one(const BiasActDropoutBwdParams& p) {
    __shared__ float lanes[LANES][MAX_BLOCK_X * V];
    bwd_keyed<T, V, ACT, MATH, KEY>(p, lanes);
}

template <typename T, int V, uint32_t MATH> __device__ __forceinline__ void bwd(const BiasActDropoutBwdParams& p) {
    __shared__ float lanes[LANES][MAX_BLOCK_X * V];
    switch (p.act) {
        case ACT_GELU_ERF: bwd_body<T, V, ACT_GELU_ERF, MATH>(p, lanes); return;
        case ACT_GELU_TANH: bwd_body<T, V, ACT_GELU_TANH, MATH>(p, lanes); return;
        case ACT_SILU: bwd_body<T, V, ACT_SILU, MATH>(p, lanes); return;
        default: bwd_body<T, V, ACT_RELU, MATH_EXACT>(p, lanes); return;
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

#define BAD_FWD_KERNEL(NAME, BODY) \
    extern "C" __global__ void __launch_bounds__(256) NAME(const BiasActDropoutFwdParams p) { BODY; }
/* the backward holds BWD_UNROLL rows of two tensors: 64 registers give 4 blocks of 256 per SM */
#define BAD_BWD_KERNEL(NAME, BODY) \
    extern "C" __global__ void __launch_bounds__(256, 4) NAME(const BiasActDropoutBwdParams p) { BODY; }

/* one vector backward kernel per (body, keying): <name>S (32-bit keys), <name>k16_S, <name>k8_S */
#define BAD_BWD_KEYED(T, S, NAME, ACT, MATH)                                                              \
    BAD_BWD_KERNEL(bias_act_dropout_bwd_vec_##NAME##S, (bwd_one<T, 16 / sizeof(T), ACT, MATH, KEY32>(p)))  \
    BAD_BWD_KERNEL(bias_act_dropout_bwd_vec_##NAME##k16_##S, (bwd_one<T, 16 / sizeof(T), ACT, MATH, KEY16>(p))) \
    BAD_BWD_KERNEL(bias_act_dropout_bwd_vec_##NAME##k8_##S, (bwd_one<T, 16 / sizeof(T), ACT, MATH, KEY8>(p)))

#define INSTANTIATE(T, S)                                                                                 \
    /* Vector kernels, one per body (one body per kernel keeps each within 64 registers in the    \
       backward; four bodies in one kernel made ptxas spill): ReLU (no transcendental), the three \
       Math::Fast activations, and one kernel with the Math::Exact bodies of all four (fmath:    \
       the bit-exact mode; p.act picks the body). Scalar kernels: one per math mode. The host    \
       picks by (act, math) in src/bias_act_dropout/gpu.rs. */                                   \
    BAD_FWD_KERNEL(bias_act_dropout_fwd_vec_##S, (fwd<T, 16 / sizeof(T), MATH_EXACT>(p)))               \
    BAD_FWD_KERNEL(bias_act_dropout_fwd_vec_relu_##S, (fwd_impl<T, 16 / sizeof(T), ACT_RELU, MATH_EXACT>(p))) \
    BAD_FWD_KERNEL(bias_act_dropout_fwd_vec_gelu_erf_fast_##S, (fwd_impl<T, 16 / sizeof(T), ACT_GELU_ERF, MATH_FAST>(p))) \
    BAD_FWD_KERNEL(bias_act_dropout_fwd_vec_gelu_tanh_fast_##S, (fwd_impl<T, 16 / sizeof(T), ACT_GELU_TANH, MATH_FAST>(p))) \
    BAD_FWD_KERNEL(bias_act_dropout_fwd_vec_silu_fast_##S, (fwd_impl<T, 16 / sizeof(T), ACT_SILU, MATH_FAST>(p))) \
    BAD_FWD_KERNEL(bias_act_dropout_fwd_scalar_##S, (fwd<T, 1, MATH_EXACT>(p)))                         \
    BAD_FWD_KERNEL(bias_act_dropout_fwd_scalar_fast_##S, (fwd<T, 1, MATH_FAST>(p)))                     \
    /* the four fmath bodies need more than 64 registers without spilling: 3 blocks per SM */        \
    extern "C" __global__ void __launch_bounds__(256, 3) bias_act_dropout_bwd_vec_##S(const BiasActDropoutBwdParams p) { \
        bwd<T, 16 / sizeof(T), MATH_EXACT>(p);                                                            \
    }                                                                                                     \
    BAD_BWD_KEYED(T, S, relu_, ACT_RELU, MATH_EXACT)                                                      \
    BAD_BWD_KEYED(T, S, gelu_erf_fast_, ACT_GELU_ERF, MATH_FAST)                                          \
    BAD_BWD_KEYED(T, S, gelu_tanh_fast_, ACT_GELU_TANH, MATH_FAST)                                        \
    BAD_BWD_KEYED(T, S, silu_fast_, ACT_SILU, MATH_FAST)                                                  \
    BAD_BWD_KERNEL(bias_act_dropout_bwd_scalar_##S, (bwd<T, 1, MATH_EXACT>(p)))                         \
    BAD_BWD_KERNEL(bias_act_dropout_bwd_scalar_fast_##S, (bwd<T, 1, MATH_FAST>(p)))                     \
    /* dbias = the ordered sum over slabs of the partials: the shared staged finish */                    \
    extern "C" __global__ void __launch_bounds__(drop::MAX_BLOCK) bias_act_dropout_dbias_##S(const drop::DbiasParams<T> p) { \
        drop::dbias_finish<T>(p);                                                                         \
    }                                                                                                     \
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
