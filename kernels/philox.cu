// Philox test kernels: they exist so the GPU tests can compare the device generator and the
// mask keying with src/philox.rs bit for bit.
#include "common/philox.cuh"

using namespace fusedreg;

struct PhiloxFillParams {
    const uint32_t* counters;  // 4 words per pair
    const uint32_t* keys;      // 2 words per pair
    uint32_t* out;             // 4 words per pair
    uint64_t n;                // number of (counter, key) pairs
};
static_assert(sizeof(PhiloxFillParams) == 32, "must match src/philox_gpu.rs");

extern "C" __global__ void philox_fill(const PhiloxFillParams p) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < p.n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint4 c = make_uint4(p.counters[4 * i], p.counters[4 * i + 1], p.counters[4 * i + 2],
                                   p.counters[4 * i + 3]);
        const uint4 r = philox4x32_10(c, make_uint2(p.keys[2 * i], p.keys[2 * i + 1]));
        p.out[4 * i] = r.x;
        p.out[4 * i + 1] = r.y;
        p.out[4 * i + 2] = r.z;
        p.out[4 * i + 3] = r.w;
    }
}

struct MaskWordsParams {
    uint64_t seed;
    uint64_t call;
    uint64_t start;  // first element index (64-bit: tests use indices above 2^32)
    uint64_t n;
    uint32_t* out;   // out[j] = mask_word(seed, call, start + j)
};
static_assert(sizeof(MaskWordsParams) == 40, "must match src/philox_gpu.rs");

extern "C" __global__ void philox_mask_words(const MaskWordsParams p) {
    for (uint64_t j = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; j < p.n;
         j += (uint64_t)gridDim.x * blockDim.x) {
        p.out[j] = mask_word(p.seed, p.call, p.start + j);
    }
}
