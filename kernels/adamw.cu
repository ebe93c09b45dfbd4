// Fused multi-tensor AdamW: one launch updates every tensor of a set.
//
// Per tensor and step (thread 0 of each block computes the f64 parts):
//   t         = step count + 1 (per chunk counter, see below)
//   bc1       = f32(1 - b1^t)          b^t by squaring in f64, 1 - b^t in f64, one rounding
//   bc2_sqrt  = f32(sqrt(1 - b2^t))    f64 sqrt, one rounding
//   neg_step  = -(lr / bc1)            f32
//   neg_lr_wd = -(lr * wd)             f32
// Per element, in f32 (every fma written out, the file is compiled with --fmad=false):
//   g     = grad * grad_scale
//   p     = fma(neg_lr_wd, p, p)                          decoupled decay of the old p
//   m     = fma(b1, m, (1 - b1) * g)
//   v     = fma(b2, v, ((1 - b2) * g) * g)
//   denom = sqrt(v) / bc2_sqrt + eps
//   p     = fma(neg_step, m / denom, p)
// src/adamw/cpu.rs performs the same operations in the same order (f32::mul_add for each fma).
//
// When the non-finite flag (written by the global norm) is set, or a tensor's skip flag is set,
// the block returns before touching anything: params, moments, master weights and step counts
// keep their bits.
//
// Step counts live per chunk (one u32 per block of the set): each block reads and advances only
// its own counter, so there is no race between blocks of a tensor and no extra launch. The chunks
// of a tensor always advance together (the flags that stop them are per tensor or global). A
// count of UINT32_MAX stays there (saturates) and the step runs with t = UINT32_MAX.
#include "common/multi_tensor.cuh"
#include "common/philox.cuh"

using namespace fusedreg;

constexpr uint32_t ADAMW_THREADS = 512;
constexpr int ADAMW_ILP = 2;  // f32 params: 4-element groups loaded ahead per thread (8 wide loads in flight)

// The optimizer's own row per tensor (src/adamw/gpu.rs builds it): the engine's TensorEntry
// knows nothing of it. Every state buffer starts at a multiple of 64 elements of an arena, so it
// is always aligned for the vector path.
struct AdamWTensor {
    uint64_t m;       // float*: first moment
    uint64_t v;       // float*: second moment
    uint64_t master;  // float*: f32 master weights of 16-bit params, 0 for f32 params
    float weight_decay;
    uint32_t pad;
};
static_assert(sizeof(AdamWTensor) == 32, "must match src/adamw/gpu.rs");

struct AdamWParams {
    const mt::TensorEntry* tensors;
    const mt::BlockEntry* blocks;
    const AdamWTensor* state;   // per tensor
    uint32_t* chunk_steps;      // per global chunk
    const uint8_t* skip;        // per tensor (1: leave it alone this step), or 0
    const float* lr;            // device scalar
    const float* grad_scale;    // device scalar (clip coef / loss scale), or 0 for 1
    const uint32_t* nonfinite;  // device flag, or 0
    uint64_t seed;              // stochastic rounding
    float beta1;
    float beta2;
    float eps;
    uint32_t block_offset;
    uint32_t stochastic;  // 1: 16-bit params rounded stochastically from the master
    uint32_t pad;
};
static_assert(sizeof(AdamWParams) == 96, "must match src/adamw/gpu.rs");

// b^e by binary exponentiation, every product an IEEE f64 multiply: cpu::pow_by_squaring.
__device__ __forceinline__ double pow_by_squaring(double b, uint32_t e) {
    double r = 1.0;
    while (e != 0) {
        if (e & 1u) r = __dmul_rn(r, b);
        e >>= 1;
        if (e != 0) b = __dmul_rn(b, b);
    }
    return r;
}

template <typename T> __device__ __forceinline__ T from_f32_rz(float x);
template <> __device__ __forceinline__ __half from_f32_rz<__half>(float x) {
    return __float2half_rz(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32_rz<__nv_bfloat16>(float x) {
    return __float2bfloat16_rz(x);
}
template <typename T> __device__ __forceinline__ uint16_t bits16(T x) {
    uint16_t b;
    memcpy(&b, &x, 2);
    return b;
}
template <typename T> __device__ __forceinline__ T from_bits16(uint16_t b) {
    T x;
    memcpy(&x, &b, 2);
    return x;
}

// Stochastic rounding of an f32 to a 16-bit type with a 16-bit random `r` (halfword i % 8 of
// Philox block i / 8 for element i: one Philox evaluation per 8 elements). lo = x rounded toward
// zero, hi = the next value away from zero; hi when r < 2^16 x the fraction of the way from lo to
// hi, so E[result] = x (exactly where that fraction has at most 16 bits: every bf16 case and
// normal f16; f16 subnormals quantise it to 2^-16 of an ulp). NaN, infinities and x beyond the
// largest finite 16-bit value round to nearest even. Mirrored by cpu::round_stochastic.
//
// f16 (not on the lean path): the fraction by an IEEE division, every step exact in f32.
template <typename T> __device__ __forceinline__ T round_stochastic(float x, uint32_t r);
template <> __device__ __forceinline__ __half round_stochastic<__half>(float x, uint32_t r) {
    if (!isfinite(x)) return from_f32<__half>(x);
    const __half lo = from_f32_rz<__half>(x);
    const float lo_f = to_f32(lo);
    if (lo_f == x) return lo;
    const __half hi = from_bits16<__half>((uint16_t)(bits16(lo) + 1u));
    const float hi_f = to_f32(hi);
    if (isinf(hi_f)) return from_f32<__half>(x);
    const float d = __fsub_rn(fabsf(x), fabsf(lo_f));
    const float ulp = __fsub_rn(fabsf(hi_f), fabsf(lo_f));
    const uint32_t frac = __float2uint_rz(__fmul_rn(__fdiv_rn(d, ulp), 4294967296.0f));
    return (r << 16) < frac ? hi : lo;
}
// bf16 is the top half of an f32: truncating the low 16 bits is lo, the low 16 bits are the
// fraction in units of 2^-16 (a power-of-two scale, exact for normals and subnormals alike), and
// adding 1 to the top half in sign-magnitude is hi (a carry into the exponent included). So hi
// when r < low16: bit for bit the divide-based rule above with the 32-bit word r << 16
// (cpu.rs's tests prove it over every exponent and every low16). |x| in the top bf16 binade
// piece 0x7f7f (hi would be infinity), infinities and NaN: nearest even, as before.
template <>
__device__ __forceinline__ __nv_bfloat16 round_stochastic<__nv_bfloat16>(float x, uint32_t r) {
    const uint32_t u = __float_as_uint(x);
    const uint32_t sr = (u + (r < (u & 0xffffu) ? 0x10000u : 0u)) >> 16;
    const uint16_t rn = bits16(__float2bfloat16_rn(x));
    return from_bits16<__nv_bfloat16>((u & 0x7fff0000u) >= 0x7f7f0000u ? rn : (uint16_t)sr);
}

// Halfword k (0..7) of a Philox block: the low half of word k / 2 for even k, the high half for
// odd k (the dropping ops' 16-bit keying uses the same order).
__device__ __forceinline__ uint32_t philox_half(uint4 w, uint32_t k) {
    const uint32_t word = philox_word(w, k >> 1);
    return (k & 1u) ? word >> 16 : word & 0xffffu;
}

// M: the moments' storage type (float, or __nv_bfloat16 for the lean state). MASTER: 16-bit
// params are updated through an f32 master copy (the default); without it the 16-bit param
// itself is read, updated in f32 and written back rounded (stochastically when asked: llm.c's
// scheme). f32 params are always updated in place (MASTER has no effect on them).
//
// bf16 moments: loaded widened exactly to f32, updated in f32 exactly as f32 moments are, and
// the parameter update uses those f32 values; only the stored m and v are rounded to bf16
// (nearest even), after the update. cpu::step does the same.
template <typename P, typename G, typename M, bool MASTER> struct AdamWOp {
    static constexpr bool kMaster = MASTER && sizeof(P) == 2;
    P* param;
    const G* grad;
    M* m;
    M* v;
    float* master;
    float b1, omb1, b2, omb2, eps, gscale, neg_lr_wd, neg_step, bc2_sqrt;
    uint64_t seed, call;
    bool stochastic;

    // 16-bit params take groups of 8 (one Philox block keys them all under stochastic rounding),
    // loaded as two 4-element vectors (the engine's FLAG_VEC4 alignment) with one group in flight
    // per thread: the same 8 wide loads in flight as f32 params' 2 groups of 4.
    static constexpr int kWidth = sizeof(P) == 2 ? 8 : 4;
    static constexpr int kIlp = sizeof(P) == 2 ? 1 : ADAMW_ILP;
    struct Group {
        float p[kWidth], g[kWidth], m[kWidth], v[kWidth];
    };

    __device__ __forceinline__ void update(float& p, float grad_raw, float& mm, float& vv) const {
        const float g = __fmul_rn(grad_raw, gscale);
        p = __fmaf_rn(neg_lr_wd, p, p);
        mm = __fmaf_rn(b1, mm, __fmul_rn(omb1, g));
        vv = __fmaf_rn(b2, vv, __fmul_rn(__fmul_rn(omb2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), bc2_sqrt), eps);
        p = __fmaf_rn(neg_step, __fdiv_rn(mm, denom), p);
    }

    __device__ __forceinline__ void load(uint64_t i, Group& r) const {
#pragma unroll
        for (int q = 0; q < kWidth; q += 4) {
            if constexpr (kMaster) {
                mt::load4(master + i + q, r.p + q);
            } else {
                mt::load4(param + i + q, r.p + q);
            }
            mt::load4(grad + i + q, r.g + q);
            mt::load4(m + i + q, r.m + q);
            mt::load4(v + i + q, r.v + q);
        }
    }

    __device__ __forceinline__ void store(uint64_t i, Group& r) const {
#pragma unroll
        for (int k = 0; k < kWidth; ++k) update(r.p[k], r.g[k], r.m[k], r.v[k]);
#pragma unroll
        for (int q = 0; q < kWidth; q += 4) {
            mt::store4(m + i + q, r.m + q);
            mt::store4(v + i + q, r.v + q);
            if constexpr (kMaster) mt::store4(master + i + q, r.p + q);
        }
        if constexpr (sizeof(P) == 2) {
            if (stochastic) {
                const uint4 w = philox_block(seed, call, i >> 3);  // i is a multiple of 8
                P h[kWidth];
#pragma unroll
                for (int k = 0; k < kWidth; ++k) h[k] = round_stochastic<P>(r.p[k], philox_half(w, k));
                mt::store4_raw(param + i, h);
                mt::store4_raw(param + i + 4, h + 4);
            } else {
                mt::store4(param + i, r.p);
                mt::store4(param + i + 4, r.p + 4);
            }
        } else {
            mt::store4(param + i, r.p);
        }
    }

    __device__ __forceinline__ void one(uint64_t i) const {
        float p;
        if constexpr (kMaster) {
            p = master[i];
        } else {
            p = to_f32(param[i]);
        }
        float mm = to_f32(m[i]), vv = to_f32(v[i]);
        update(p, to_f32(grad[i]), mm, vv);
        m[i] = from_f32<M>(mm);
        v[i] = from_f32<M>(vv);
        if constexpr (kMaster) master[i] = p;
        if constexpr (sizeof(P) == 2) {
            param[i] = stochastic
                           ? round_stochastic<P>(p, philox_half(philox_block(seed, call, i >> 3),
                                                                (uint32_t)(i & 7)))
                           : from_f32<P>(p);
        } else {
            param[i] = from_f32<P>(p);
        }
    }
};

template <typename P, typename G, typename M, bool MASTER>
__device__ __forceinline__ void adamw(const AdamWParams& p) {
    // Block-uniform early exits, before any barrier: a skipped step changes no bit.
    if (p.nonfinite && *p.nonfinite) return;
    const mt::Chunk c = mt::locate(p.tensors, p.blocks, p.block_offset);
    if (p.skip && p.skip[c.tensor]) return;

    __shared__ uint32_t s_t;
    __shared__ float s_bc1, s_bc2_sqrt;
    if (threadIdx.x == 0) {
        // Only this thread reads or writes the block's own counter.
        // Saturating: past UINT32_MAX the count would wrap to t = 0, where 1 - b^0 = 0 (NaN
        // parameters); cpu::step saturates the same way (issue 17).
        const uint32_t old = p.chunk_steps[c.block];
        const uint32_t t = old == 0xffffffffu ? old : old + 1u;
        p.chunk_steps[c.block] = t;
        s_t = t;
        s_bc1 = __double2float_rn(__dsub_rn(1.0, pow_by_squaring((double)p.beta1, t)));
        s_bc2_sqrt =
            __double2float_rn(__dsqrt_rn(__dsub_rn(1.0, pow_by_squaring((double)p.beta2, t))));
    }
    __syncthreads();

    const float lr = *p.lr;
    AdamWOp<P, G, M, MASTER> op;
    op.param = reinterpret_cast<P*>(c.t.param);
    op.grad = reinterpret_cast<const G*>(c.t.grad);
    const AdamWTensor st = p.state[c.tensor];
    op.m = reinterpret_cast<M*>(st.m);
    op.v = reinterpret_cast<M*>(st.v);
    op.master = reinterpret_cast<float*>(st.master);
    op.b1 = p.beta1;
    op.omb1 = __fsub_rn(1.0f, p.beta1);
    op.b2 = p.beta2;
    op.omb2 = __fsub_rn(1.0f, p.beta2);
    op.eps = p.eps;
    op.gscale = p.grad_scale ? *p.grad_scale : 1.0f;
    op.neg_lr_wd = -__fmul_rn(lr, st.weight_decay);
    op.neg_step = -__fdiv_rn(lr, s_bc1);
    op.bc2_sqrt = s_bc2_sqrt;
    op.seed = p.seed;
    op.call = ((uint64_t)s_t << 32) | c.tensor;
    op.stochastic = p.stochastic != 0;
    using Op = AdamWOp<P, G, M, MASTER>;
    mt::for_each_group<Op::kWidth, Op::kIlp>(op, c, (c.t.flags & mt::FLAG_VEC4) != 0);
}

// Kernel symbols: adamw_p<P>_g<G><SUFFIX> for every (param, grad) pair and state layout:
//   (none)            f32 moments, f32 master for 16-bit params (the default)
//   _mbf16            bf16 moments, f32 master for 16-bit params
//   _nomaster         f32 moments, 16-bit params updated in place (16-bit params only)
//   _mbf16_nomaster   bf16 moments, no master (16-bit params only): the 14-byte step for bf16
#define ADAMW_KERNEL(P, PS, G, GS, M, MASTER, SUFFIX)                                         \
    extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)                               \
        adamw_p##PS##_g##GS##SUFFIX(const AdamWParams p) {                                    \
        adamw<P, G, M, MASTER>(p);                                                            \
    }
#define ADAMW_FOR_EACH_GRAD(P, PS, M, MASTER, SUFFIX)                                         \
    ADAMW_KERNEL(P, PS, float, f32, M, MASTER, SUFFIX)                                        \
    ADAMW_KERNEL(P, PS, __half, f16, M, MASTER, SUFFIX)                                       \
    ADAMW_KERNEL(P, PS, __nv_bfloat16, bf16, M, MASTER, SUFFIX)
#define ADAMW_WITH_MASTER(P, PS)                                                              \
    ADAMW_FOR_EACH_GRAD(P, PS, float, true, )                                                 \
    ADAMW_FOR_EACH_GRAD(P, PS, __nv_bfloat16, true, _mbf16)
FUSEDREG_FOR_EACH_DTYPE(ADAMW_WITH_MASTER)
#define ADAMW_NO_MASTER(P, PS)                                                                \
    ADAMW_FOR_EACH_GRAD(P, PS, float, false, _nomaster)                                       \
    ADAMW_FOR_EACH_GRAD(P, PS, __nv_bfloat16, false, _mbf16_nomaster)
ADAMW_NO_MASTER(__half, f16)
ADAMW_NO_MASTER(__nv_bfloat16, bf16)

// master = f32(param): fills the f32 master weights of 16-bit params when a set is built.
struct InitMasterParams {
    const mt::TensorEntry* tensors;
    const mt::BlockEntry* blocks;
    const AdamWTensor* state;
    uint32_t block_offset;
    uint32_t pad;
};
static_assert(sizeof(InitMasterParams) == 32, "must match src/adamw/gpu.rs");

template <typename P> struct WidenOp {
    const P* param;
    float* master;
    struct Group {
        float x[4];
    };
    __device__ __forceinline__ void load(uint64_t i, Group& r) const { mt::load4(param + i, r.x); }
    __device__ __forceinline__ void store(uint64_t i, Group& r) const { mt::store4(master + i, r.x); }
    __device__ __forceinline__ void one(uint64_t i) const { master[i] = to_f32(param[i]); }
};

#define INIT_MASTER_KERNEL(P, PS)                                                             \
    extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)                               \
        adamw_init_master_##PS(const InitMasterParams p) {                                    \
        const mt::Chunk c = mt::locate(p.tensors, p.blocks, p.block_offset);                  \
        WidenOp<P> op{reinterpret_cast<const P*>(c.t.param),                                 \
                       reinterpret_cast<float*>(p.state[c.tensor].master)};             \
        mt::for_each_group<4, ADAMW_ILP>(op, c, (c.t.flags & mt::FLAG_VEC4) != 0);            \
    }
INIT_MASTER_KERNEL(__half, f16)
INIT_MASTER_KERNEL(__nv_bfloat16, bf16)
