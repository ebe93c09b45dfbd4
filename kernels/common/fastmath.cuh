// Hardware approximations of f32 transcendentals, for Math::Fast (src/math.rs).
//
// Math::Exact kernels use common/fmath.cuh (the same IEEE operations as the CPU reference: bit for
// bit, but 25-64 instructions per call). Math::Fast kernels use the single-instruction special
// function unit instead: ex2.approx.ftz.f32 (MUFU.EX2), lg2.approx.ftz.f32 (MUFU.LG2),
// tanh.approx.f32 (MUFU.TANH, sm_75+), rcp.approx.ftz.f32 (MUFU.RCP). Their error bounds (PTX ISA,
// "Floating-point instructions"): ex2 and lg2 about 2 ulp (2^-22 relative) away from the flushed
// subnormal range, tanh about 2^-10.987 maximum relative error, rcp 1 ulp. What each op builds from
// them, and the bound it states and tests, is in that op's module docs.
//
// Under host emulation (scripts/emu, no __CUDA_ARCH__) each instruction is replaced by a
// deterministic model from shim.h (emu_ex2_approx, ...): the correctly rounded f32 of the exact
// function with the instruction's subnormal flushing. The model is not the hardware's bits; it
// keeps the code around the instruction checked bit for bit in CI, and the GPU suite checks the
// hardware against the CPU reference within the stated bound.
#pragma once
#include <cstdint>

namespace fusedreg {
namespace fast {

// 2^x, subnormal inputs and results flushed to zero.
__device__ __forceinline__ float ex2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu_ex2_approx(x);
#endif
}

// log2(x), subnormal inputs flushed to zero (log2(0) = -inf).
__device__ __forceinline__ float lg2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu_lg2_approx(x);
#endif
}

// tanh(x), maximum relative error about 2^-11.
__device__ __forceinline__ float tanh(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu_tanh_approx(x);
#endif
}

// 1 / x, subnormals flushed.
__device__ __forceinline__ float rcp(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return emu_rcp_approx(x);
#endif
}

// e^x as 2^(x log2 e): two instructions (FMUL + MUFU.EX2). The product's rounding adds up to
// |x| 2^-24 relative error to the result (about 2^-17 at |x| = 88); callers that subtract a row
// maximum first keep |x| small where it matters.
__device__ __forceinline__ float exp(float x) { return ex2(__fmul_rn(x, 1.4426950408889634f)); }

}  // namespace fast
}  // namespace fusedreg
