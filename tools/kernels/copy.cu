// A plain 16-byte-vector copy: the bandwidth a simple streaming kernel reaches on this device,
// reported beside the driver's device-to-device memcpy as the ceiling for our kernels.
#include <cstdint>

struct CopyParams {
    const uint4* src;
    uint4* dst;
    uint64_t n;  // number of 16-byte vectors
};
static_assert(sizeof(CopyParams) == 24, "must match src/timing.rs");

extern "C" __global__ void copy_u128(const CopyParams p) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < p.n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        p.dst[i] = p.src[i];
    }
}
