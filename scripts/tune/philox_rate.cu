// Standalone microbenchmark (built and run on the GPU machine with its nvcc): how many Philox
// blocks per second can this GPU generate with no memory traffic at all? That rate times the bytes
// an op moves per block is the op's compute ceiling, to compare with the copy bandwidth:
//   bf16 dropout: 1 block per 4 elements -> backward 16 B/block (2 + 2 B/element), forward 24 B;
//   f32: backward 32 B/block, forward 48 B.
// If the measured kernel sits near its ceiling it is bound by the generator (then only fewer
// instructions on the FMA pipe help); if well below, by memory-level parallelism (then more loads
// in flight per thread help). See benches/NOTES.md.
//   nvcc -O3 -std=c++17 -arch=sm_90 -I../../kernels philox_rate.cu -o pr && ./pr
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

#include "common/philox.cuh"

#define CK(x) do { cudaError_t err_ = (x); if (err_ != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(err_)); return 1; } } while (0)

using namespace fusedreg;

// Each thread: `blocks` Philox blocks at consecutive counters. WITH_BITS also does what the
// dropout generator loop does per 8 bf16 elements (two blocks -> 8 keep bits); otherwise the
// words are XOR-folded. One word per thread is stored so that nothing is optimized away.
template <bool WITH_BITS>
__global__ void __launch_bounds__(256) philox_k(uint64_t seed, uint64_t call, uint32_t t, int blocks,
                                                uint32_t* out) {
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint64_t ctr = tid * (uint64_t)blocks;
    uint32_t acc = 0;
    for (int b = 0; b < blocks; b += 2, ctr += 2) {
        const uint4 w0 = philox_block(seed, call, ctr), w1 = philox_block(seed, call, ctr + 1);
        if (WITH_BITS) {
            const uint32_t bits = (w0.x >= t ? 1u : 0u) | (w0.y >= t ? 2u : 0u) | (w0.z >= t ? 4u : 0u) |
                                  (w0.w >= t ? 8u : 0u) | (w1.x >= t ? 16u : 0u) | (w1.y >= t ? 32u : 0u) |
                                  (w1.z >= t ? 64u : 0u) | (w1.w >= t ? 128u : 0u);
            acc = acc * 31u + bits;
        } else {
            acc ^= w0.x ^ w0.y ^ w0.z ^ w0.w ^ w1.x ^ w1.y ^ w1.z ^ w1.w;
        }
    }
    out[tid] = acc;
}

template <bool WITH_BITS>
static int run(const char* name, int sms) {
    const int threads = 256, blocks_per_thread = 64;
    const int grid = sms * 8 * 16;  // 8 resident blocks per SM, 16 waves
    uint32_t* out;
    CK(cudaMalloc(&out, (size_t)grid * threads * 4));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    float best = 1e30f;
    for (int rep = 0; rep < 12; ++rep) {
        CK(cudaEventRecord(a));
        philox_k<WITH_BITS><<<grid, threads>>>(42, 7, 429496730u, blocks_per_thread, out);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (rep >= 2 && ms < best) best = ms;  // two warm-up launches
    }
    const double per_s = (double)grid * threads * blocks_per_thread / (best * 1e-3);
    printf("%-22s %8.1f G blocks/s | ceilings: bf16 bwd %6.0f GB/s, fwd %6.0f GB/s; f32 bwd %6.0f GB/s, fwd %6.0f GB/s\n",
           name, per_s * 1e-9, per_s * 16e-9, per_s * 24e-9, per_s * 32e-9, per_s * 48e-9);
    CK(cudaFree(out));
    return 0;
}

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    int clock_khz = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
    printf("%s, %d SMs, max clock %.2f GHz\n", prop.name, prop.multiProcessorCount, clock_khz * 1e-6);
    if (run<false>("philox only", prop.multiProcessorCount)) return 1;
    if (run<true>("philox + keep bits", prop.multiProcessorCount)) return 1;
    return 0;
}
