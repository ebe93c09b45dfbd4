// Global gradient norm over a multi-tensor set, the clip coefficient, and the scale pass.
//
//   A  global_norm_partials_<g>: one block per chunk writes the chunk's f32 sum of squares.
//   B  global_norm_reduce:       one block sums all partials in f64 into NormResult::sumsq
//                                (optionally finishing with C in the same launch).
//   C  global_norm_finalize:     sumsq (possibly all-reduced across ranks in between) ->
//                                norm, clip coefficient, grad scale and the non-finite flag.
//   global_norm_per_tensor:      per-tensor sums of squares and norms from the partials.
//   global_norm_scale_<g>:       grads *= coef, coef read from device memory.
//
// Determinism: every order below is fixed by the chunk layout and the two block-size constants,
// never by the grid, the SM count or pointer alignment; src/global_norm/cpu.rs reproduces it bit
// for bit. No atomics.
//
// Order within a chunk of `len` elements (W = 16 / sizeof(G): 4 for f32, 8 for 16-bit grads):
//   thread t (of NORM_THREADS) lane j (of W) sums, in f32 with one fma per element,
//     acc[j] = fma(x, x, acc[j])   for x = grad[(k * NORM_THREADS + t) * W + j], k = 0, 1, ...
//   (elements past len skipped); then lanes fold pairwise (acc[j] += acc[j + s], s = W/2 .. 1);
//   then each warp folds by shuffle-down (offsets 16, 8, 4, 2, 1), and warp 0 folds the 16 warp
//   sums the same way (offsets 8, 4, 2, 1). Aligned gradients load 16-byte vectors, misaligned
//   ones load the same elements one by one: the arithmetic is identical.
#include "common/multi_tensor.cuh"

using namespace fusedreg;

constexpr uint32_t NORM_THREADS = 512;   // fixed: the reduction tree depends on it (cpu.rs)
constexpr uint32_t NORM_UNROLL = 4;      // 16-byte loads in flight per thread
constexpr uint32_t REDUCE_THREADS = 1024;  // fixed: the f64 reduction order depends on it
constexpr uint32_t SCALE_THREADS = 512;
constexpr int SCALE_ILP = 4;
constexpr uint32_t FULL_MASK = 0xffffffffu;

// Written by B and C; read by AdamW (grad_scale, nonfinite) and by the host.
struct NormResult {
    double sumsq;        // global sum of squares of the (loss-scaled) gradients
    float norm;          // sqrt(sumsq) / loss_scale, rounded to f32
    float coef;          // min(1, max_norm / (norm + 1e-6)), or 1 without clipping
    float grad_scale;    // coef / loss_scale: what AdamW multiplies the gradients by
    uint32_t nonfinite;  // 1 when norm is NaN or infinite
};
static_assert(sizeof(NormResult) == 24, "must match src/global_norm/mod.rs");

struct PartialsParams {
    const mt::TensorEntry* tensors;
    const mt::BlockEntry* blocks;
    float* partials;      // one per global chunk
    const uint8_t* skip;  // the set's per-tensor skip flags (null: none): skipped tensors add 0
    uint32_t block_offset;
    uint32_t pad;
};
static_assert(sizeof(PartialsParams) == 40, "must match src/global_norm/gpu.rs");

template <typename G> __device__ __forceinline__ void partials(const PartialsParams& p) {
    constexpr uint32_t W = 16 / sizeof(G);
    const mt::Chunk c = mt::locate(p.tensors, p.blocks, p.block_offset);
    // A tensor skipped this step (e.g. its block was dropped by stochastic depth) has no
    // gradient this step: its chunks contribute exactly 0, and its stale buffer is not read.
    if (p.skip != nullptr && p.skip[c.tensor] != 0) {
        if (threadIdx.x == 0) p.partials[c.block] = 0.0f;
        return;
    }
    const G* g = reinterpret_cast<const G*>(c.t.grad) + c.start;
    const uint32_t t = threadIdx.x;
    const uint32_t nvec = c.len / W;  // full W-groups of the chunk

    float acc[W];
#pragma unroll
    for (uint32_t j = 0; j < W; ++j) acc[j] = 0.0f;

    uint32_t vi = t;
    if (c.t.flags & mt::FLAG_GRAD16) {
        for (; vi + (NORM_UNROLL - 1) * NORM_THREADS < nvec; vi += NORM_UNROLL * NORM_THREADS) {
            Vec16<G> x[NORM_UNROLL];
#pragma unroll
            for (uint32_t k = 0; k < NORM_UNROLL; ++k)
                x[k] = load16(g + (uint64_t)(vi + k * NORM_THREADS) * W);
#pragma unroll
            for (uint32_t k = 0; k < NORM_UNROLL; ++k) {
#pragma unroll
                for (uint32_t j = 0; j < W; ++j) {
                    const float f = to_f32(x[k].v[j]);
                    acc[j] = __fmaf_rn(f, f, acc[j]);
                }
            }
        }
        for (; vi < nvec; vi += NORM_THREADS) {
            const Vec16<G> x = load16(g + (uint64_t)vi * W);
#pragma unroll
            for (uint32_t j = 0; j < W; ++j) {
                const float f = to_f32(x.v[j]);
                acc[j] = __fmaf_rn(f, f, acc[j]);
            }
        }
    } else {
        for (; vi < nvec; vi += NORM_THREADS) {
#pragma unroll
            for (uint32_t j = 0; j < W; ++j) {
                const float f = to_f32(g[(uint64_t)vi * W + j]);
                acc[j] = __fmaf_rn(f, f, acc[j]);
            }
        }
    }
    // The partial group after the last full one belongs to the thread whose sequence it
    // continues (group index nvec = k * NORM_THREADS + t), after all its full groups.
    if (t == nvec % NORM_THREADS) {
#pragma unroll
        for (uint32_t j = 0; j < W; ++j) {  // unrolled so acc stays in registers
            if (nvec * W + j < c.len) {
                const float f = to_f32(g[(uint64_t)nvec * W + j]);
                acc[j] = __fmaf_rn(f, f, acc[j]);
            }
        }
    }
#pragma unroll
    for (uint32_t s = W / 2; s > 0; s /= 2) {
#pragma unroll
        for (uint32_t j = 0; j < s; ++j) acc[j] = __fadd_rn(acc[j], acc[j + s]);
    }

    float sum = acc[0];
#pragma unroll
    for (uint32_t off = 16; off > 0; off /= 2)
        sum = __fadd_rn(sum, __shfl_down_sync(FULL_MASK, sum, off));
    __shared__ float warp_sums[NORM_THREADS / 32];
    const uint32_t lane = t % 32, warp = t / 32;
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();
    if (warp == 0) {
        float w = lane < NORM_THREADS / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
        for (uint32_t off = NORM_THREADS / 64; off > 0; off /= 2)
            w = __fadd_rn(w, __shfl_down_sync(FULL_MASK, w, off));
        if (lane == 0) p.partials[c.block] = w;
    }
}

#define PARTIALS_KERNEL(T, SUFFIX)                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                \
        global_norm_partials_##SUFFIX(const PartialsParams p) {                               \
        partials<T>(p);                                                                       \
    }
FUSEDREG_FOR_EACH_DTYPE(PARTIALS_KERNEL)

// Stage C, shared by global_norm_reduce (fused) and global_norm_finalize (after an all-reduce).
// Mirrored by cpu::finalize.
__device__ __forceinline__ void finalize_into(NormResult* r, double sumsq, const float* loss_scale,
                                              float max_norm, bool clip) {
    const float scale = loss_scale ? *loss_scale : 1.0f;
    const double norm64 = __ddiv_rn(__dsqrt_rn(sumsq), (double)scale);
    const float norm = __double2float_rn(norm64);
    float coef = 1.0f;
    if (clip) coef = fminf(1.0f, __fdiv_rn(max_norm, __fadd_rn(norm, 1e-6f)));
    r->norm = norm;
    r->coef = coef;
    r->grad_scale = __fdiv_rn(coef, scale);
    r->nonfinite = isfinite(norm) ? 0u : 1u;
}

struct ReduceParams {
    const float* partials;
    uint64_t count;           // number of partials (global chunks)
    NormResult* result;
    const float* loss_scale;  // device scalar, or 0 for 1
    float max_norm;
    uint32_t flags;           // REDUCE_FINALIZE | REDUCE_CLIP
};
static_assert(sizeof(ReduceParams) == 40, "must match src/global_norm/gpu.rs");
constexpr uint32_t REDUCE_FINALIZE = 1u;
constexpr uint32_t REDUCE_CLIP = 2u;

// One block of REDUCE_THREADS: thread i sums partials i, i + REDUCE_THREADS, ... in f64 in that
// order, then a shared-memory tree (s = 512, 256, ..., 1: sh[i] += sh[i + s]).
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS) global_norm_reduce(const ReduceParams p) {
    const uint32_t t = threadIdx.x;
    double acc = 0.0;
    // Unrolling lets the loads run ahead; the additions stay in index order.
#pragma unroll 4
    for (uint64_t i = t; i < p.count; i += REDUCE_THREADS)
        acc = __dadd_rn(acc, (double)p.partials[i]);
    __shared__ double sh[REDUCE_THREADS];
    sh[t] = acc;
    __syncthreads();
#pragma unroll
    for (uint32_t s = REDUCE_THREADS / 2; s > 0; s /= 2) {
        if (t < s) sh[t] = __dadd_rn(sh[t], sh[t + s]);
        __syncthreads();
    }
    if (t == 0) {
        p.result->sumsq = sh[0];
        if (p.flags & REDUCE_FINALIZE)
            finalize_into(p.result, sh[0], p.loss_scale, p.max_norm, p.flags & REDUCE_CLIP);
    }
}

struct FinalizeParams {
    NormResult* result;       // reads sumsq, writes the rest
    const float* loss_scale;  // device scalar, or 0 for 1
    float max_norm;
    uint32_t clip;
};
static_assert(sizeof(FinalizeParams) == 24, "must match src/global_norm/gpu.rs");

extern "C" __global__ void global_norm_finalize(const FinalizeParams p) {
    if (threadIdx.x == 0 && blockIdx.x == 0)
        finalize_into(p.result, p.result->sumsq, p.loss_scale, p.max_norm, p.clip != 0);
}

struct PerTensorParams {
    const mt::TensorEntry* tensors;
    const float* partials;
    double* sumsq;  // per tensor
    float* norms;   // per tensor: sqrt(sumsq) rounded to f32
    uint32_t count;  // tensors
    uint32_t pad;
};
static_assert(sizeof(PerTensorParams) == 40, "must match src/global_norm/gpu.rs");
constexpr uint32_t PER_TENSOR_THREADS = 256;

// One warp per tensor: lane l sums the tensor's partials l, l + 32, ... in f64, then the lanes
// fold by shuffle-down (16, 8, 4, 2, 1). Zero-size tensors get 0.
extern "C" __global__ void __launch_bounds__(PER_TENSOR_THREADS)
    global_norm_per_tensor(const PerTensorParams p) {
    const uint32_t lane = threadIdx.x % 32;
    const uint64_t tensor = ((uint64_t)blockIdx.x * PER_TENSOR_THREADS + threadIdx.x) / 32;
    if (tensor >= p.count) return;  // whole warps leave together
    const mt::TensorEntry e = p.tensors[tensor];
    double acc = 0.0;
    for (uint32_t i = lane; i < e.num_chunks; i += 32)
        acc = __dadd_rn(acc, (double)p.partials[(uint64_t)e.first_chunk + i]);
#pragma unroll
    for (uint32_t off = 16; off > 0; off /= 2)
        acc = __dadd_rn(acc, __shfl_down_sync(FULL_MASK, acc, off));
    if (lane == 0) {
        p.sumsq[tensor] = acc;
        p.norms[tensor] = __double2float_rn(__dsqrt_rn(acc));
    }
}

struct ScaleParams {
    const mt::TensorEntry* tensors;
    const mt::BlockEntry* blocks;
    const float* coef_ptr;      // device coefficient, or 0 to use `coef`
    const uint32_t* nonfinite;  // device flag, or 0: when set, nothing is written
    float coef;
    uint32_t block_offset;
};
static_assert(sizeof(ScaleParams) == 40, "must match src/global_norm/gpu.rs");

template <typename G> struct ScaleOp {
    static constexpr int W = 16 / sizeof(G);
    G* g;
    float coef;
    struct Group {
        Vec16<G> x;
    };
    __device__ __forceinline__ void load(uint64_t i, Group& r) const { r.x = load16(g + i); }
    __device__ __forceinline__ void store(uint64_t i, Group& r) const {
#pragma unroll
        for (int j = 0; j < W; ++j) r.x.v[j] = from_f32<G>(__fmul_rn(to_f32(r.x.v[j]), coef));
        store16(g + i, r.x);
    }
    __device__ __forceinline__ void one(uint64_t i) const {
        g[i] = from_f32<G>(__fmul_rn(to_f32(g[i]), coef));
    }
};

template <typename G> __device__ __forceinline__ void scale(const ScaleParams& p) {
    if (p.nonfinite && *p.nonfinite) return;
    const float coef = p.coef_ptr ? *p.coef_ptr : p.coef;
    // x * 1 == x for every x: no clipping needed, so no gradient is rewritten.
    if (coef == 1.0f) return;
    const mt::Chunk c = mt::locate(p.tensors, p.blocks, p.block_offset);
    ScaleOp<G> op{reinterpret_cast<G*>(c.t.grad), coef};
    mt::for_each_group<ScaleOp<G>::W, SCALE_ILP>(op, c, (c.t.flags & mt::FLAG_GRAD16) != 0);
}

#define SCALE_KERNEL(T, SUFFIX)                                                               \
    extern "C" __global__ void __launch_bounds__(SCALE_THREADS)                               \
        global_norm_scale_##SUFFIX(const ScaleParams p) {                                     \
        scale<T>(p);                                                                          \
    }
FUSEDREG_FOR_EACH_DTYPE(SCALE_KERNEL)
