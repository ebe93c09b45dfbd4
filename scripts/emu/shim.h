// Host emulation of the CUDA features the emulated kernels use, for scripts/emu/compare.sh.
// Blocks run one after another; the threads of a block are OS threads, with real barriers for
// __syncthreads and for the warp intrinsics, so a lane that skips a warp-level call deadlocks the
// emulation (compare.sh runs it under a timeout). Arithmetic is IEEE f32 on the host, with the
// GPU's canonical NaN; the conversions round to nearest even like the CUDA intrinsics.
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim, gridDim;

template <class T> inline T min(T a, T b) { return a < b ? a : b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
// GPU arithmetic returns the canonical NaN (0x7fffffff) whatever the inputs' payloads; x86 keeps
// an operand's payload, which would make the result depend on the host compiler's operand order.
inline float emu_canon(float x) { if (x != x) { unsigned u = 0x7fffffffu; memcpy(&x, &u, 4); } return x; }
inline float __fadd_rn(float a, float b) { return emu_canon(a + b); }
inline float __fmul_rn(float a, float b) { return emu_canon(a * b); }
inline float __fmaf_rn(float a, float b, float c) { return emu_canon(std::fmaf(a, b, c)); }
inline float __fsub_rn(float a, float b) { return emu_canon(a - b); }
inline float __fdiv_rn(float a, float b) { return emu_canon(a / b); }
inline float __fsqrt_rn(float a) { return emu_canon(std::sqrt(a)); }
// f64 arithmetic: IEEE on both sides. NaN results get one fixed encoding so the hashes do not
// depend on the host compiler's operand order; whether the device's f64 NaN payload matches it is
// not verified (the norm's f64 sum is only NaN when a partial is, and then its bits are hashed).
inline double emu_canon_d(double x) { if (x != x) { uint64_t u = 0x7fffffffffffffffull; memcpy(&x, &u, 8); } return x; }
inline double __dadd_rn(double a, double b) { return emu_canon_d(a + b); }
inline double __dsub_rn(double a, double b) { return emu_canon_d(a - b); }
inline double __dmul_rn(double a, double b) { return emu_canon_d(a * b); }
inline double __ddiv_rn(double a, double b) { return emu_canon_d(a / b); }
inline double __dsqrt_rn(double a) { return emu_canon_d(std::sqrt(a)); }
inline float __double2float_rn(double x) { return emu_canon((float)x); }
// f32 -> u32 toward zero, saturating like the device (NaN -> 0).
inline unsigned __float2uint_rz(float x) {
    if (!(x > 0.f)) return 0;
    if (x >= 4294967296.0f) return 0xffffffffu;
    return (unsigned)x;
}
using std::isfinite;
using std::isinf;
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

struct __half { unsigned short __x; };
struct __nv_bfloat16 { unsigned short __x; };
inline float __half2float(__half h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; memcpy(&h, &f, 2); return h; }
inline __half __ushort_as_half(unsigned short s) { __half h; h.__x = s; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.__x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    unsigned u = __float_as_uint(x);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) { b.__x = 0x7fff; return b; }
    u += 0x7fffu + ((u >> 16) & 1u);
    b.__x = (unsigned short)(u >> 16);
    return b;
}
// Toward zero: the nearest-even result stepped one ulp toward zero when it rounded away; finite
// values past the largest half give 65504 (as the device does), NaN gives the canonical 0x7fff.
inline __half __float2half_rz(float x) {
    __half h;
    if (x != x) { h.__x = 0x7fff; return h; }
    h = __float2half_rn(x);
    const float r = __half2float(h);
    if (std::fabs(r) > std::fabs(x)) h.__x = (unsigned short)(h.__x - 1);  // magnitude bits - 1
    return h;
}
inline __nv_bfloat16 __float2bfloat16_rz(float x) {
    __nv_bfloat16 b;
    const unsigned u = __float_as_uint(x);
    b.__x = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)0x7fff : (unsigned short)(u >> 16);
    return b;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }

// Pairs (common/dtype.cuh unpack2 / pack2): each half converts exactly as the scalar intrinsic.
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

struct EmuBlock {
    explicit EmuBlock(unsigned n) : block_bar((std::ptrdiff_t)n), slots((n + 31) / 32) {
        for (unsigned w = 0; w < (n + 31) / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
    }
    std::barrier<> block_bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    std::vector<std::array<unsigned, 32>> slots;
};
extern EmuBlock* emu_block;
extern std::atomic<long> emu_warp_calls;

inline void __syncthreads() { emu_block->block_bar.arrive_and_wait(); }
inline unsigned emu_exchange(unsigned v, int src_lane_offset, bool ballot) {
    emu_warp_calls++;
    const unsigned lin = threadIdx.y * blockDim.x + threadIdx.x, lane = lin & 31, w = lin >> 5;
    emu_block->slots[w][lane] = v;
    emu_block->warp_bars[w]->arrive_and_wait();
    unsigned r;
    if (ballot) {
        r = 0;
        for (int l = 0; l < 32; ++l) r |= (emu_block->slots[w][l] ? 1u : 0u) << l;
    } else {
        const unsigned src = lane + src_lane_offset;
        r = src < 32 ? emu_block->slots[w][src] : v;
    }
    emu_block->warp_bars[w]->arrive_and_wait();
    return r;
}
inline unsigned __shfl_down_sync(unsigned mask, unsigned v, int d) {
    if (mask != 0xffffffffu) abort();
    return emu_exchange(v, d, false);
}
// The device shuffles 32-bit registers; f32 moves as its bits, f64 as two 32-bit halves.
inline float __shfl_down_sync(unsigned mask, float v, int d) {
    return __uint_as_float(__shfl_down_sync(mask, __float_as_uint(v), d));
}
inline double __shfl_down_sync(unsigned mask, double v, int d) {
    uint64_t u;
    memcpy(&u, &v, 8);
    const uint64_t lo = __shfl_down_sync(mask, (unsigned)u, d);
    const uint64_t hi = __shfl_down_sync(mask, (unsigned)(u >> 32), d);
    u = lo | (hi << 32);
    memcpy(&v, &u, 8);
    return v;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    if (mask != 0xffffffffu) abort();
    return emu_exchange(pred ? 1u : 0u, 0, true);
}
// Butterfly: lane l reads lane l ^ m (the forward statistics' warp_tree4, dropout_add_norm/rows.cuh).
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int m) {
    if (mask != 0xffffffffu || m < 0 || m > 31) abort();
    emu_warp_calls++;
    const unsigned lin = threadIdx.y * blockDim.x + threadIdx.x, lane = lin & 31, w = lin >> 5;
    emu_block->slots[w][lane] = v;
    emu_block->warp_bars[w]->arrive_and_wait();
    const unsigned r = emu_block->slots[w][lane ^ (unsigned)m];
    emu_block->warp_bars[w]->arrive_and_wait();
    return r;
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
// f32 -> i64 to nearest even (the host's default rounding mode), as the device's __float2ll_rn
// for the values the kernels convert (|x| <= 2^32: never out of range, never NaN).
inline long long __float2ll_rn(float x) { return std::llrint(x); }

// Deterministic models of the special-function-unit approximations (kernels/common/fastmath.cuh):
// the correctly rounded f32 of the exact function, with the instruction's subnormal flushing. Not
// the hardware's bits (those are checked on a GPU within each op's stated bound); a model that
// keeps the code around the instruction under bit-for-bit emulation.
inline float emu_ftz(float x) { return std::fabs(x) < 1.17549435e-38f ? std::copysign(0.0f, x) : x; }
inline float emu_ex2_approx(float x) { return emu_canon(emu_ftz((float)std::exp2((double)emu_ftz(x)))); }
inline float emu_lg2_approx(float x) { return emu_canon((float)std::log2((double)emu_ftz(x))); }
inline float emu_tanh_approx(float x) { return emu_canon((float)std::tanh((double)x)); }
inline float emu_rcp_approx(float x) { return emu_canon(emu_ftz((float)(1.0 / (double)emu_ftz(x)))); }
