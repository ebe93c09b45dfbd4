// The row reductions shared by dropout_add_norm's kernels (generic.cuh, rows.cuh) and the Block
// Influence statistics of dropout's residual forward (kernels/dropout.cu, through stats.cuh): one
// copy of each, all in the order of the CPU's combine_partials (src/dropout_add_norm/cpu.rs).
#pragma once

namespace dropout_add_norm {

// K row sums at once: each thread holds partial q = threadIdx.x of each (blockDim.x threads, a
// multiple of 32, at most 256). Within a warp the tree a[l] += a[l + o], o = 16 .. 1 (lane 0
// ends with the warp's sum), then the warp sums left to right. Every thread returns the totals.
// Called by every thread of the block; s_warp: K x 8 floats of shared memory per call site.
template <int K>
__device__ __forceinline__ void block_sums(float (&v)[K], float (*s_warp)[8]) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int k = 0; k < K; ++k)
            v[k] = __fadd_rn(v[k], __uint_as_float(__shfl_down_sync(0xffffffffu, __float_as_uint(v[k]), o)));
    }
    const uint32_t lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) s_warp[k][warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float t = s_warp[k][0];
        for (uint32_t w = 1; w < blockDim.x / 32; ++w) t = __fadd_rn(t, s_warp[k][w]);
        v[k] = t;
    }
    __syncthreads();  // s_warp is written again by the next call
}

// The warp tree a[l] += a[l + o], o = 16 .. 1, of four sums at once with the work spread over the
// lanes: 18 instructions instead of 40. Every add is one the plain tree does (its operands may
// be swapped: the same bits, f32 addition being commutative and the device's NaN canonical), so
// each total has the plain tree's bits. After it lane 8k holds sum k's warp total.
__device__ __forceinline__ float warp_tree4(const float (&v)[4]) {
    const uint32_t lane = threadIdx.x & 31u;
    auto xchg = [](float x, int o) { return __uint_as_float(__shfl_xor_sync(0xffffffffu, __float_as_uint(x), o)); };
    // o = 16: the lower half keeps sums 0 and 1 and receives them from the upper, which keeps 2, 3.
    const bool hi = (lane & 16u) != 0;
    const float b0 = __fadd_rn(hi ? v[2] : v[0], xchg(hi ? v[0] : v[2], 16));
    const float b1 = __fadd_rn(hi ? v[3] : v[1], xchg(hi ? v[1] : v[3], 16));
    // o = 8: a lane with bit 3 clear keeps the first of its two, the others the second.
    const bool b3 = (lane & 8u) != 0;
    float t = __fadd_rn(b3 ? b1 : b0, xchg(b3 ? b0 : b1, 8));
    // o = 4, 2, 1 within each group of 8 lanes.
#pragma unroll
    for (int o = 4; o > 0; o >>= 1)
        t = __fadd_rn(t, __uint_as_float(__shfl_down_sync(0xffffffffu, __float_as_uint(t), o)));
    return t;
}

// warp_tree4's tree for two sums: the lower half of the warp takes sum 0, the upper sum 1 (10
// instructions instead of 20; every add one the plain tree does). After it lane 16k holds sum k's
// warp total.
__device__ __forceinline__ float warp_tree2(const float (&v)[2]) {
    const uint32_t lane = threadIdx.x & 31u;
    const bool hi = (lane & 16u) != 0;
    float t = __fadd_rn(hi ? v[1] : v[0],
                        __uint_as_float(__shfl_xor_sync(0xffffffffu, __float_as_uint(hi ? v[0] : v[1]), 16)));
#pragma unroll
    for (int o = 8; o > 0; o >>= 1)
        t = __fadd_rn(t, __uint_as_float(__shfl_down_sync(0xffffffffu, __float_as_uint(t), o)));
    return t;
}

// One block's totals of sums whose warp totals warp_tree4 (STRIDE 8) or warp_tree2 (STRIDE 16)
// left at lanes[32 w + STRIDE k] (every lane's result stored: lanes[threadIdx.x]), after a
// barrier: sum k's warp totals added left to right (the order of block_sums), for the one thread
// that reads them.
template <int STRIDE = 8>
__device__ __forceinline__ float lanes_total(const float* lanes, uint32_t warps, int k) {
    float t = lanes[STRIDE * k];
    for (uint32_t w = 1; w < warps; ++w) t = __fadd_rn(t, lanes[32 * w + STRIDE * k]);
    return t;
}

}  // namespace dropout_add_norm
