// The few kernels the end-to-end residual-MLP example needs beyond cuBLAS and fusedreg's own
// ops: bias + GELU (tanh form) forward and backward, column sums (bias gradients) and the MSE
// loss gradient. f32 only. Determinism: column sums and loss partials use a fixed partition that
// depends only on the shape, and no atomics.
#include <cstdint>

namespace mlp {

constexpr float K0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float K1 = 0.044715f;

__device__ __forceinline__ float gelu(float u) {
    const float z = K0 * __fmaf_rn(K1 * u, u * u, u);
    return 0.5f * u * (1.0f + tanhf(z));
}

__device__ __forceinline__ float gelu_grad(float u) {
    const float z = K0 * __fmaf_rn(K1 * u, u * u, u);
    const float t = tanhf(z);
    return __fmaf_rn(0.5f * u * K0 * __fmaf_rn(3.0f * K1, u * u, 1.0f), 1.0f - t * t, 0.5f * (1.0f + t));
}

}  // namespace mlp

struct BiasGeluParams {
    const float* h;     // [rows, cols] pre-activation without bias
    const float* bias;  // [cols]
    float* out;         // forward: gelu(h + b); backward: da * gelu'(h + b)
    const float* da;    // backward only: gradient of the activation
    uint64_t rows, cols;
};
static_assert(sizeof(BiasGeluParams) == 48, "must match src/mlp/gpu.rs");

extern "C" __global__ void mlp_bias_gelu_fwd_f32(const BiasGeluParams p) {
    const uint64_t n = p.rows * p.cols;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        p.out[i] = mlp::gelu(p.h[i] + p.bias[i % p.cols]);
    }
}

extern "C" __global__ void mlp_bias_gelu_bwd_f32(const BiasGeluParams p) {
    const uint64_t n = p.rows * p.cols;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        p.out[i] = p.da[i] * mlp::gelu_grad(p.h[i] + p.bias[i % p.cols]);
    }
}

// Column sums in two fixed stages: partials[slab][col] = sum of the slab's rows in order, then
// out[col] = sum of the partials in slab order. The slab size is a host-side function of the shape.
struct ColsumParams {
    const float* x;   // [rows, cols]
    float* partials;  // [slabs, cols]
    float* out;       // [cols]
    uint64_t rows, cols, slab_rows;
};
static_assert(sizeof(ColsumParams) == 48, "must match src/mlp/gpu.rs");

extern "C" __global__ void mlp_colsum_partial_f32(const ColsumParams p) {
    const uint64_t col = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t r0 = blockIdx.y * p.slab_rows;
    const uint64_t r1 = min(r0 + p.slab_rows, p.rows);
    if (col >= p.cols) return;
    float s = 0.0f;
    for (uint64_t r = r0; r < r1; ++r) s += p.x[r * p.cols + col];
    p.partials[blockIdx.y * p.cols + col] = s;
}

extern "C" __global__ void mlp_colsum_final_f32(const ColsumParams p) {
    const uint64_t col = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    if (col >= p.cols) return;
    const uint64_t slabs = (p.rows + p.slab_rows - 1) / p.slab_rows;
    float s = 0.0f;
    for (uint64_t k = 0; k < slabs; ++k) s += p.partials[k * p.cols + col];
    p.out[col] = s;
}

// MSE: dy = scale * (y - t) with scale = 2 / n, and per-block partial sums of (y - t)^2 in a
// fixed tree (MSE_BLOCK threads, MSE_PER_BLOCK elements per block), summed on the host in order.
constexpr int MSE_BLOCK = 256;
constexpr uint64_t MSE_PER_BLOCK = 4096;
struct MseParams {
    const float* y;
    const float* target;
    float* dy;
    float* partials;  // [ceil(n / MSE_PER_BLOCK)]
    uint64_t n;
    float scale, pad;
};
static_assert(sizeof(MseParams) == 48, "must match src/mlp/gpu.rs");

extern "C" __global__ void __launch_bounds__(MSE_BLOCK) mlp_mse_grad_f32(const MseParams p) {
    __shared__ float s[MSE_BLOCK];
    const uint64_t base = blockIdx.x * MSE_PER_BLOCK;
    float acc = 0.0f;
    for (uint64_t k = threadIdx.x; k < MSE_PER_BLOCK; k += MSE_BLOCK) {
        const uint64_t i = base + k;
        if (i < p.n) {
            const float d = p.y[i] - p.target[i];
            p.dy[i] = p.scale * d;
            acc = __fmaf_rn(d, d, acc);
        }
    }
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int w = MSE_BLOCK / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) p.partials[blockIdx.x] = s[0];
}
