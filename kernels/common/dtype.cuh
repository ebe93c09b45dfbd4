// Element types and 16-byte vector access shared by every kernel.
// Conversions to the storage type round to nearest even (__float2half_rn, __float2bfloat16_rn),
// matching Dtype::from_f32_rn on the CPU.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedreg {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// A 16-byte vector of T: 4 floats or 8 halves. Loaded and stored as one uint4.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

template <typename T> __device__ __forceinline__ Vec16<T> load16(const T* p) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    Vec16<T> out;
    memcpy(&out, &raw, 16);
    return out;
}

template <typename T> __device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
    uint4 raw;
    memcpy(&raw, &v, 16);
    *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

}  // namespace fusedreg

// Instantiates X(type, suffix) for every dtype; kernel symbols end in the suffix.
#define FUSEDREG_FOR_EACH_DTYPE(X) \
    X(float, f32)                  \
    X(__half, f16)                 \
    X(__nv_bfloat16, bf16)
