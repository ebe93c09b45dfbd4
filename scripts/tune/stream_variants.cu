// Standalone microbenchmark (built and run on the GPU machine with its nvcc): which access
// pattern reaches the copy bandwidth on this device? Informs the launch shapes of our kernels.
//   nvcc -O3 -std=c++17 -arch=sm_90 stream_variants.cu -o sv && ./sv
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t err_ = (x); if (err_ != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(err_)); exit(1);} } while (0)

// copy, U vectors per thread per iteration, grid-stride, loads before stores.
template <int U, bool STREAMING>
__global__ void copy_k(const uint4* __restrict__ s, uint4* __restrict__ d, uint64_t n) {
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x * U;
    for (uint64_t base = (uint64_t)blockIdx.x * blockDim.x * U + threadIdx.x; base < n; base += stride) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            uint64_t i = base + (uint64_t)u * blockDim.x;
            if (i < n) v[u] = STREAMING ? __ldcs(s + i) : s[i];
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            uint64_t i = base + (uint64_t)u * blockDim.x;
            if (i < n) { if (STREAMING) __stcs(d + i, v[u]); else d[i] = v[u]; }
        }
    }
}

// y = a + b (2 reads, 1 write), the dropout-forward pattern.
template <int U>
__global__ void add_k(const uint4* __restrict__ a, const uint4* __restrict__ b, uint4* __restrict__ y, uint64_t n) {
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x * U;
    for (uint64_t base = (uint64_t)blockIdx.x * blockDim.x * U + threadIdx.x; base < n; base += stride) {
        uint4 va[U], vb[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            uint64_t i = base + (uint64_t)u * blockDim.x;
            if (i < n) { va[u] = a[i]; vb[u] = b[i]; }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            uint64_t i = base + (uint64_t)u * blockDim.x;
            if (i < n) { uint4 r; r.x = va[u].x + vb[u].x; r.y = va[u].y + vb[u].y; r.z = va[u].z + vb[u].z; r.w = va[u].w + vb[u].w; y[i] = r; }
        }
    }
}

template <typename F>
float time_ms(F f) {
    cudaEvent_t s, e; CK(cudaEventCreate(&s)); CK(cudaEventCreate(&e));
    for (int i = 0; i < 3; ++i) f();
    std::vector<float> ts;
    for (int r = 0; r < 15; ++r) {
        CK(cudaEventRecord(s)); for (int i = 0; i < 5; ++i) f(); CK(cudaEventRecord(e)); CK(cudaEventSynchronize(e));
        float ms; CK(cudaEventElapsedTime(&ms, s, e)); ts.push_back(ms / 5);
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
}

int main() {
    int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const uint64_t bytes = 1ull << 30, n = bytes / 16;
    uint4 *a, *b, *c; CK(cudaMalloc(&a, bytes)); CK(cudaMalloc(&b, bytes)); CK(cudaMalloc(&c, bytes));
    CK(cudaMemset(a, 0x5a, bytes)); CK(cudaMemset(b, 0x33, bytes)); CK(cudaMemset(c, 0x11, bytes));
    float ms = time_ms([&] { CK(cudaMemcpyAsync(c, a, bytes, cudaMemcpyDeviceToDevice)); });
    printf("memcpy                         %7.0f GB/s\n", 2 * bytes / ms / 1e6);
    auto run = [&](const char* name, auto kern, int blocks, int threads, int U, int nin) {
        float ms = time_ms(kern);
        CK(cudaGetLastError());
        printf("%-22s U=%d grid=%7d x %4d %7.0f GB/s\n", name, U, blocks, threads, (nin + 1) * bytes / ms / 1e6);
    };
    for (int threads : {256, 512}) {
        for (int per_sm : {4, 8, 16, 0}) {
            auto grid = [&](int U) { return per_sm ? sms * per_sm * (1024 / threads) / 2 : (int)std::min<uint64_t>((n + threads * U - 1) / (threads * U), 1u << 30); };
            run("copy", [&] { copy_k<1, false><<<grid(1), threads>>>(a, c, n); }, grid(1), threads, 1, 1);
            run("copy", [&] { copy_k<2, false><<<grid(2), threads>>>(a, c, n); }, grid(2), threads, 2, 1);
            run("copy", [&] { copy_k<4, false><<<grid(4), threads>>>(a, c, n); }, grid(4), threads, 4, 1);
            run("copy streaming", [&] { copy_k<4, true><<<grid(4), threads>>>(a, c, n); }, grid(4), threads, 4, 1);
            run("add (2 in, 1 out)", [&] { add_k<1><<<grid(1), threads>>>(a, b, c, n); }, grid(1), threads, 1, 2);
            run("add (2 in, 1 out)", [&] { add_k<2><<<grid(2), threads>>>(a, b, c, n); }, grid(2), threads, 2, 2);
            run("add (2 in, 1 out)", [&] { add_k<4><<<grid(4), threads>>>(a, b, c, n); }, grid(4), threads, 4, 2);
        }
    }
    return 0;
}
