// Bit-exact f32 transcendentals: exp, log, erf, tanh, sigmoid.
//
// The same sequence of IEEE-754 binary32 operations as src/fmath.rs (read that file's module docs
// for the algorithms, the accuracy bounds and the domain), so kernels and CPU references agree bit
// for bit. Every operation is written as a correctly rounded intrinsic (__fadd_rn, __fsub_rn,
// __fmul_rn, __fdiv_rn, __fmaf_rn), never as an expression the compiler could contract or
// reassociate; kernels are built with --fmad=false and without fast math, so subnormals are kept.
// The coefficient tables are the same bit patterns as the Rust tables. Do not use expf, logf, erff,
// tanhf in a kernel that has a bit-exact CPU reference: their last bits differ from any CPU libm.
//
// NaN inputs come back unchanged (no arithmetic touches them, so the device's canonical NaN never
// appears); ln of a negative number is the quiet NaN 0x7fc00000 on both sides.
#pragma once
#include <cstdint>

namespace fusedreg {

namespace fmath_detail {

__device__ __forceinline__ float bits(uint32_t b) { return __uint_as_float(b); }
__device__ __forceinline__ float fabs_bits(float x) { return __uint_as_float(__float_as_uint(x) & 0x7fffffffu); }
// r (non-negative) with the sign bit of x.
__device__ __forceinline__ float with_sign_of(float r, float x) {
    return __uint_as_float(__float_as_uint(r) | (__float_as_uint(x) & 0x80000000u));
}

// p * 2^k for p in about [0.7, 1.42] and k in [-150, 128], rounded once.
__device__ __forceinline__ float scale2(float p, int k) {
    if (k > 127) return __fmul_rn(__fmul_rn(p, bits(0x7f000000u)), 2.0f);  // k == 128
    if (k < -126) return __fmul_rn(__fmul_rn(p, bits((uint32_t)(k + 64 + 127) << 23)), bits(0x1f800000u));
    return __fmul_rn(p, bits((uint32_t)(k + 127) << 23));
}

}  // namespace fmath_detail

// e^x (fusedreg::fmath::exp).
__device__ __forceinline__ float fr_exp(float x) {
    using namespace fmath_detail;
    if (x != x) return x;
    if (x >= 89.0f) return bits(0x7f800000u);
    if (x < -104.0f) return 0.0f;
    const float SHIFT = bits(0x4b400000u);  // 1.5 * 2^23
    const float j = __fmaf_rn(x, bits(0x3fb8aa3bu), SHIFT);
    const int k = (int)__float_as_uint(j) - (int)0x4b400000u;
    const float kf = __fsub_rn(j, SHIFT);
    float r = __fmaf_rn(kf, -bits(0x3f317200u), x);
    r = __fmaf_rn(kf, -bits(0x35bfbe8eu), r);
    float p = bits(0x39500d01u);             // 1/5040
    p = __fmaf_rn(p, r, bits(0x3ab60b61u));  // 1/720
    p = __fmaf_rn(p, r, bits(0x3c088889u));  // 1/120
    p = __fmaf_rn(p, r, bits(0x3d2aaaabu));  // 1/24
    p = __fmaf_rn(p, r, bits(0x3e2aaaabu));  // 1/6
    p = __fmaf_rn(p, r, 0.5f);
    p = __fmaf_rn(p, r, 1.0f);
    p = __fmaf_rn(p, r, 1.0f);
    return scale2(p, k);
}

// Natural logarithm (fusedreg::fmath::ln): the fdlibm / musl logf reduction.
__device__ __forceinline__ float fr_log(float x) {
    using namespace fmath_detail;
    if (x != x) return x;
    uint32_t ix = __float_as_uint(x);
    int k = 0;
    if (ix < 0x00800000u || (ix >> 31) != 0) {
        if ((ix << 1) == 0) return bits(0xff800000u);  // -inf
        if ((ix >> 31) != 0) return bits(0x7fc00000u);  // negative: NaN
        k = -25;                                        // subnormal: scale by 2^25 (exact)
        ix = __float_as_uint(__fmul_rn(x, bits(0x4c000000u)));
    } else if (ix >= 0x7f800000u) {
        return x;  // +inf
    }
    ix += 0x3f800000u - 0x3f3504f3u;
    k += (int)(ix >> 23) - 0x7f;
    ix = (ix & 0x007fffffu) + 0x3f3504f3u;
    const float f = __fsub_rn(bits(ix), 1.0f);
    const float s = __fdiv_rn(f, __fadd_rn(2.0f, f));
    const float z = __fmul_rn(s, s);
    const float w = __fmul_rn(z, z);
    const float t1 = __fmul_rn(w, __fmaf_rn(w, bits(0x3e789e26u), bits(0x3eccce13u)));
    const float t2 = __fmul_rn(z, __fmaf_rn(w, bits(0x3e91e9eeu), bits(0x3f2aaaaau)));
    const float R = __fadd_rn(t2, t1);
    const float hfsq = __fmul_rn(__fmul_rn(0.5f, f), f);
    const float dk = (float)k;  // |k| <= 152: exact
    const float a = __fmaf_rn(s, __fadd_rn(hfsq, R), __fmul_rn(dk, bits(0x3717f7d1u)));
    return __fadd_rn(__fadd_rn(__fsub_rn(a, hfsq), f), __fmul_rn(dk, bits(0x3f317180u)));
}

// The error function (fusedreg::fmath::erf).
__device__ __forceinline__ float fr_erf(float x) {
    using namespace fmath_detail;
    if (x != x) return x;
    const float a = fabs_bits(x);
    if (a >= 4.0f) return with_sign_of(1.0f, x);
    if (a < 1.0f) {
        if (a == 0.0f) return x;  // keeps the sign of zero (the sum below would give +0 for -0)
        const float z = __fmul_rn(x, x);
        float p = bits(0x358e20d6u);
        p = __fmaf_rn(p, z, bits(0xb7695c29u));
        p = __fmaf_rn(p, z, bits(0x38fabf4eu));
        p = __fmaf_rn(p, z, bits(0xba5ff0acu));
        p = __fmaf_rn(p, z, bits(0x3bab2c46u));
        p = __fmaf_rn(p, z, bits(0xbcdc165du));
        p = __fmaf_rn(p, z, bits(0x3de71790u));
        p = __fmaf_rn(p, z, bits(0xbec093a3u));
        // x * (2/sqrt(pi) + z p) with 2/sqrt(pi) as hi + lo.
        const float t = __fmaf_rn(p, z, bits(0xb37bd649u));
        return __fmaf_rn(x, bits(0x3f906ebbu), __fmul_rn(x, t));
    }
    const float u = __fsub_rn(a, 2.0f);  // exact on [1, 4)
    float q = bits(0xb3a2d63cu);
    q = __fmaf_rn(q, u, bits(0x36035199u));
    q = __fmaf_rn(q, u, bits(0xb7a85cfdu));
    q = __fmaf_rn(q, u, bits(0x390d470fu));
    q = __fmaf_rn(q, u, bits(0xba40140cu));
    q = __fmaf_rn(q, u, bits(0x3b6a0bf4u));
    q = __fmaf_rn(q, u, bits(0xbc86e1d3u));
    q = __fmaf_rn(q, u, bits(0x3d9c2874u));
    q = __fmaf_rn(q, u, bits(0xbed6192cu));
    q = __fmaf_rn(q, u, bits(0xbfaeb665u));
    const float e = fr_exp(__fmaf_rn(-a, a, q));
    return with_sign_of(__fsub_rn(1.0f, e), x);
}

// The hyperbolic tangent (fusedreg::fmath::tanh).
__device__ __forceinline__ float fr_tanh(float x) {
    using namespace fmath_detail;
    if (x != x) return x;
    const float a = fabs_bits(x);
    if (a >= 9.5f) return with_sign_of(1.0f, x);
    if (a < bits(0x39800000u)) return x;  // |x| < 2^-12: tanh(x) rounds to x
    if (a < 0.625f) {
        const float z = __fmul_rn(x, x);
        float p = bits(0x39a9ffd6u);
        p = __fmaf_rn(p, z, bits(0xbaab4529u));
        p = __fmaf_rn(p, z, bits(0x3b685f4cu));
        p = __fmaf_rn(p, z, bits(0xbc1114a9u));
        p = __fmaf_rn(p, z, bits(0x3cb325f7u));
        p = __fmaf_rn(p, z, bits(0xbd5d0dc7u));
        p = __fmaf_rn(p, z, bits(0x3e088888u));
        p = __fmaf_rn(p, z, bits(0xbeaaaaabu));  // -1/3
        return __fmaf_rn(x, __fmul_rn(z, p), x);
    }
    const float e = fr_exp(__fadd_rn(a, a));
    const float r = __fsub_rn(1.0f, __fdiv_rn(2.0f, __fadd_rn(e, 1.0f)));
    return with_sign_of(r, x);
}

// The logistic function 1 / (1 + e^-x) (fusedreg::fmath::sigmoid).
__device__ __forceinline__ float fr_sigmoid(float x) {
    if (x != x) return x;
    if (x < -20.0f) return fr_exp(x);  // 1 + e^x rounds to 1; keeps subnormal results
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, fr_exp(-x)));
}

}  // namespace fusedreg
