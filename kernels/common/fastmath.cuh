// Hardware approximations of f32 transcendentals, for Math::Fast (src/math.rs).
//
// Math::Exact kernels use common/fmath.cuh (the same IEEE operations as the CPU reference: bit for
// bit, but 25-64 instructions per call). Math::Fast kernels use the single-instruction special
// function unit (MUFU) instead. The worst errors we design against (and that the pessimistic
// model in src/math.rs perturbs every result by, both signs):
//
//   ex2  ex2.approx.ftz.f32   MUFU.EX2   2 ulp of the result over the full range (CUDA documents
//                                        exp2f, which is this instruction, at 2 ulp); subnormal
//                                        inputs read as 0 (2^0 = 1), subnormal results flushed to
//                                        +0; 2^-inf = +0, 2^+inf = +inf, 2^x >= 2^128 is +inf
//   lg2  lg2.approx.ftz.f32   MUFU.LG2   absolute 2^-22 for x in [0.5, 2], else 2 ulp (CUDA's
//                                        __log2f); subnormal inputs read as 0 (-inf), x < 0 NaN
//   rcp  rcp.approx.ftz.f32   MUFU.RCP   1 ulp; subnormal inputs read as 0 (1/+-0 = +-inf),
//                                        subnormal results (|x| > 2^126) flushed to +-0
//   tanh tanh.approx.f32      MUFU.TANH  relative 2^-10.987 (PTX ISA; sm_75+). NVIDIA staff have
//                                        measured ~2^-16.5 on sm_75, but only the documented
//                                        figure is a bound. Prefer ex2 + rcp where the relative
//                                        accuracy of 1 + tanh or 1 - tanh matters (GELU's tail).
//
// "ftz" flushes subnormal f32 operands and results to sign-preserving zero. NaN in gives NaN out
// (the canonical 0x7fffffff). What each op builds from these, the bound it states and how it is
// tested, is in that op's module docs (e.g. src/bias_act_dropout/mod.rs, "Math::Fast").
//
// Under host emulation (scripts/emu, no __CUDA_ARCH__) each instruction is replaced by a
// deterministic model from shim.h (emu_ex2_approx, ...): the exact function evaluated in f64 and
// rounded once to f32, with the instruction's flushing. The model is not the hardware's bits; it
// keeps the code around the instruction checked bit for bit in CI (the golden hashes), and the
// GPU suite checks the hardware against the CPU reference within each op's stated bound.
#pragma once
#include <cstdint>

namespace fusedreg {
namespace fast {

// 2^x (MUFU.EX2), 2 ulp; subnormal inputs and results flushed to zero.
__device__ __forceinline__ float ex2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu_ex2_approx(x);
#endif
}

// log2(x) (MUFU.LG2): absolute 2^-22 on [0.5, 2], 2 ulp elsewhere; subnormal inputs read as 0
// (log2(0) = -inf), negative inputs give NaN.
__device__ __forceinline__ float lg2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu_lg2_approx(x);
#endif
}

// tanh(x) (MUFU.TANH), documented maximum relative error 2^-10.987. No bias_act_dropout formula
// uses it: 0.5 (1 + tanh u) loses all relative accuracy where tanh u is near -1.
__device__ __forceinline__ float tanh(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu_tanh_approx(x);
#endif
}

// 1 / x (MUFU.RCP), 1 ulp; subnormal inputs and results flushed (1/+-0 = +-inf, 1/+-inf = +-0).
__device__ __forceinline__ float rcp(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu_rcp_approx(x);
#endif
}

// e^x as 2^(x log2 e): two instructions (FMUL + MUFU.EX2). Besides ex2's 2 ulp, the product's
// rounding (and log2 e's own, 2^-25 relative) shift the exponent by up to 1.5 |x| 2^-24, a
// relative error of up to 1.5 |x| 2^-24 in the result (about 2^-16.4 at |x| = 88); callers that
// subtract a row maximum first keep |x| small where it matters.
__device__ __forceinline__ float exp(float x) { return ex2(__fmul_rn(x, 1.4426950408889634f)); }

// max(x, lo) and min(x, hi) that keep a NaN x a NaN (fmaxf / fminf return the other operand):
// one FMNMX each on sm_80+. Used to clamp a formula's argument into the range where its
// intermediate values stay finite, without losing NaN propagation.
__device__ __forceinline__ float max_nan(float x, float lo) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(lo));
    return y;
#else
    return x != x ? x : (x < lo ? lo : x);
#endif
}
__device__ __forceinline__ float min_nan(float x, float hi) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("min.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(hi));
    return y;
#else
    return x != x ? x : (x > hi ? hi : x);
#endif
}

}  // namespace fast
}  // namespace fusedreg
