// Element types and 16-byte vector access shared by every kernel: the one dtype vocabulary.
// Conversions to the storage type round to nearest even (__float2half_rn, __float2bfloat16_rn),
// matching Dtype::from_f32_rn on the CPU, unless the name says _rz.
//
//   typed values:  to_f32(T), from_f32<T>(float), Vec16<T> / load16 / store16 (whole vectors)
//   raw bits:      bits_to_f32<T>(bits), f32_to_bits<T>(x), f32_to_bits_rz<T>(x) (16-bit T),
//                  load_raw / store_raw (one element)
//   packs:         Pack<T, V> (V elements as 32-bit words; get(k), raw(k), set_raw(k, bits)),
//                  load_pack<T, V>(p, cnt) / store_pack<T, V>(p, pack, cnt): one 16-byte access
//                  when V * sizeof(T) == 16 and cnt == V, element accesses otherwise
//   pairs:         unpack2<T>(word) -> float2, pack2<T>(lo, hi) -> word (16-bit T, RNE)
//   launch:        aligned16(ptr), FUSEDREG_FOR_EACH_DTYPE(X) (X(type, suffix) per dtype)
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

// ---------------------------------------------------------------------------------------------
// Raw element bits. Kernels that must match the CPU bit for bit keep 16-bit elements as raw bits
// in 32-bit words (Pack below) and convert one element at a time through these.

// Raw bits of one T (in the low bits of a word) <-> f32. Conversions to T round to nearest even.
template <typename T> __device__ __forceinline__ float bits_to_f32(uint32_t b);
template <> __device__ __forceinline__ float bits_to_f32<float>(uint32_t b) { return __uint_as_float(b); }
template <> __device__ __forceinline__ float bits_to_f32<__half>(uint32_t b) {
    return __half2float(__ushort_as_half((unsigned short)b));
}
template <> __device__ __forceinline__ float bits_to_f32<__nv_bfloat16>(uint32_t b) { return __uint_as_float(b << 16); }

template <typename T> __device__ __forceinline__ uint32_t f32_to_bits(float x);
template <> __device__ __forceinline__ uint32_t f32_to_bits<float>(float x) { return __float_as_uint(x); }
template <> __device__ __forceinline__ uint32_t f32_to_bits<__half>(float x) {
    return __half_as_ushort(from_f32<__half>(x));
}
template <> __device__ __forceinline__ uint32_t f32_to_bits<__nv_bfloat16>(float x) {
    return __bfloat16_as_ushort(from_f32<__nv_bfloat16>(x));
}

// Rounded toward zero instead (16-bit types): the lower neighbour of stochastic rounding. The
// upper one is `f32_to_bits_rz<T>(x) + 1` (same sign, one ulp further from zero).
template <typename T> __device__ __forceinline__ uint32_t f32_to_bits_rz(float x);
template <> __device__ __forceinline__ uint32_t f32_to_bits_rz<__half>(float x) {
    return __half_as_ushort(__float2half_rz(x));
}
template <> __device__ __forceinline__ uint32_t f32_to_bits_rz<__nv_bfloat16>(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rz(x));
}

// V consecutive elements of T held as 32-bit words (two 16-bit elements per word, little-endian
// like memory). Keeping them packed matters: an array of 16-bit elements gets one register per
// element once the compiler splits it, which doubled the dropout forward's registers and made it
// spill. One 16-byte access when V * sizeof(T) == 16; element accesses for V == 1 and for a
// partial last group (cnt < V).
template <typename T, int V> struct Pack {
    static constexpr int WORDS = V * (int)sizeof(T) >= 4 ? V * (int)sizeof(T) / 4 : 1;
    uint32_t w[WORDS];

    __device__ __forceinline__ uint32_t raw(int k) const {
        if constexpr (sizeof(T) == 4) return w[k];
        else return (w[k >> 1] >> (16 * (k & 1))) & 0xffffu;
    }
    // Sets element k's bits; elements must be set in increasing k (an even k starts its word).
    __device__ __forceinline__ void set_raw(int k, uint32_t b) {
        if constexpr (sizeof(T) == 4) w[k] = b;
        else if (k & 1) w[k >> 1] |= b << 16;
        else w[k >> 1] = b;
    }
    __device__ __forceinline__ float get(int k) const { return bits_to_f32<T>(raw(k)); }
};

// Two 16-bit elements of one packed word (element 2j in the low half) <-> two f32. The pack is
// one F2FP.PACK_AB per pair on sm_90 and rounds to nearest even like two f32_to_bits<T> (the
// same bits), so the kernels that keep CPU bits may convert a pair at once.
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
    __half2 h;
    memcpy(&h, &w, 4);
    return __half22float2(h);
}
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t w;
    memcpy(&w, &h, 4);
    return w;
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t w;
    memcpy(&w, &h, 4);
    return w;
}

template <typename T> __device__ __forceinline__ uint32_t load_raw(const T* p) {
    if constexpr (sizeof(T) == 4) return *reinterpret_cast<const uint32_t*>(p);
    else return *reinterpret_cast<const unsigned short*>(p);
}
template <typename T> __device__ __forceinline__ void store_raw(T* p, uint32_t b) {
    if constexpr (sizeof(T) == 4) *reinterpret_cast<uint32_t*>(p) = b;
    else *reinterpret_cast<unsigned short*>(p) = (unsigned short)b;
}

// Loads cnt <= V elements (the rest read as bits 0). p must be 16-byte aligned when
// V * sizeof(T) == 16 and cnt == V.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, int cnt) {
    Pack<T, V> out;
    if constexpr (V * sizeof(T) == 16) {
        if (cnt == V) {
            const uint4 raw = *reinterpret_cast<const uint4*>(p);
            out.w[0] = raw.x, out.w[1] = raw.y, out.w[2] = raw.z, out.w[3] = raw.w;
            return out;
        }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) out.set_raw(k, k < cnt ? load_raw(p + k) : 0u);
    return out;
}

// Stores the first cnt <= V elements.
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v, int cnt) {
    if constexpr (V * sizeof(T) == 16) {
        if (cnt == V) {
            *reinterpret_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < V; ++k)
        if (k < cnt) store_raw(p + k, v.raw(k));
}

}  // namespace fusedreg

// Instantiates X(type, suffix) for every dtype; kernel symbols end in the suffix.
#define FUSEDREG_FOR_EACH_DTYPE(X) \
    X(float, f32)                  \
    X(__half, f16)                 \
    X(__nv_bfloat16, bf16)
