// Philox4x32-10 on the device, and the mask keying every op uses.
// Mirrors src/philox.rs exactly; see that file for the keying contract:
//   counter = [lo32(i/4), hi32(i/4), lo32(call), hi32(call)], key = [lo32(seed), hi32(seed)],
//   word(i) = philox4x32_10(counter, key)[i % 4]; an element is dropped when word < threshold.
#pragma once
#include <cstdint>

namespace fusedreg {

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {  // the key is bumped before rounds 2..10
            k.x += PHILOX_W0;
            k.y += PHILOX_W1;
        }
        const uint32_t hi0 = __umulhi(PHILOX_M0, c.x), lo0 = PHILOX_M0 * c.x;
        const uint32_t hi1 = __umulhi(PHILOX_M1, c.z), lo1 = PHILOX_M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// The four words of elements 4*block .. 4*block+3 of (seed, call).
__device__ __forceinline__ uint4 philox_block(uint64_t seed, uint64_t call, uint64_t block) {
    return philox4x32_10(
        make_uint4((uint32_t)block, (uint32_t)(block >> 32), (uint32_t)call, (uint32_t)(call >> 32)),
        make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)));
}

__device__ __forceinline__ uint32_t philox_word(uint4 b, uint32_t lane) {
    return lane == 0 ? b.x : lane == 1 ? b.y : lane == 2 ? b.z : b.w;
}

// The random word of one element (scalar paths; vector paths use philox_block directly).
__device__ __forceinline__ uint32_t mask_word(uint64_t seed, uint64_t call, uint64_t index) {
    return philox_word(philox_block(seed, call, index >> 2), (uint32_t)(index & 3));
}

// threshold is 0 ..= 2^32 (64-bit so that p = 1 drops everything); see DropRate in philox.rs.
__device__ __forceinline__ bool keeps(uint32_t word, uint64_t threshold) {
    return (uint64_t)word >= threshold;
}

}  // namespace fusedreg
