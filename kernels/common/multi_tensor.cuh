// The multi-tensor engine shared by AdamW, the global norm and the scale pass.
//
// A set of tensors is registered once on the host (src/multi_tensor/mod.rs), which builds two
// tables and uploads them once:
//   * TensorEntry per tensor: its parameter and gradient addresses, 64-bit length, alignment
//     flags and the range of global chunk indices it owns;
//   * BlockEntry per chunk: (tensor, chunk within the tensor).
// Block b of a launch works on global chunk `block_offset + b`: CHUNK consecutive elements of one
// tensor (fewer for the tensor's last chunk). Zero-size tensors own no chunk, so no block ever
// sees them. Every launch over a set passes two pointers, whatever the number of tensors.
//
// The engine knows tensors only: whatever per-tensor state an optimizer keeps (moments, master
// weights, weight decay, step counts) lives in the optimizer's own table, indexed by
// Chunk::tensor and Chunk::block (see adamw.cu).
//
// The per-op math lives in a small functor (see adamw.cu, global_norm.cu); the engine only maps
// blocks to chunks and walks a chunk either in aligned vector groups (every buffer the op touches
// is aligned for them) or element by element (misaligned views): both visit every element of the
// chunk exactly once.
#pragma once
#include <cstdint>

#include "common/dtype.cuh"

namespace fusedreg {
namespace mt {

// Elements per chunk (one block each). A power of two, so a chunk of an aligned tensor starts
// aligned; must equal multi_tensor::CHUNK in Rust.
constexpr uint64_t CHUNK = 65536;

// TensorEntry::flags
// The parameter and the gradient are aligned for a group of 4 elements: 4 * sizeof(element)
// bytes (16 B for f32, 8 B for 16-bit types). (An optimizer's own state buffers are always
// allocated aligned; a gradients-only set checks the gradient alone.)
constexpr uint32_t FLAG_VEC4 = 1u;
// The gradient is 16-byte aligned: the norm and the scale pass read it 16 bytes at a time.
constexpr uint32_t FLAG_GRAD16 = 2u;

struct TensorEntry {
    uint64_t param;  // P*: parameters (0 in a gradients-only set)
    uint64_t grad;   // G*: gradients
    uint64_t n;      // elements
    uint32_t flags;
    uint32_t first_chunk;  // global index of its first chunk
    uint32_t num_chunks;   // ceil(n / CHUNK)
    uint32_t pad;
};
static_assert(sizeof(TensorEntry) == 40, "must match src/multi_tensor/mod.rs");

struct BlockEntry {
    uint32_t tensor;
    uint32_t chunk;  // chunk index within the tensor: elements chunk * CHUNK ...
};
static_assert(sizeof(BlockEntry) == 8, "must match src/multi_tensor/mod.rs");

// What one block works on.
struct Chunk {
    TensorEntry t;
    uint32_t tensor;  // index of the tensor in the set
    uint64_t block;   // global chunk index: indexes per-chunk arrays (norm partials, step counts)
    uint64_t start;   // first element of the chunk within the tensor (64-bit)
    uint32_t len;     // elements in the chunk, 1 ..= CHUNK
};

__device__ __forceinline__ Chunk locate(const TensorEntry* tensors, const BlockEntry* blocks,
                                        uint32_t block_offset) {
    Chunk c;
    c.block = (uint64_t)block_offset + blockIdx.x;
    const BlockEntry b = blocks[c.block];
    c.tensor = b.tensor;
    c.t = tensors[b.tensor];
    c.start = (uint64_t)b.chunk * CHUNK;
    const uint64_t left = c.t.n - c.start;
    c.len = (uint32_t)(left < CHUNK ? left : CHUNK);
    return c;
}

// Walks the chunk: when `vec`, groups of WIDTH consecutive elements starting at multiples of
// WIDTH (op.load fills a register group, op.store updates and writes it), ILP groups loaded before
// any is stored so several wide loads per thread are in flight; the elements after the last full
// group, and every element when !vec, go through op.one. Indices are 64-bit element indices
// within the tensor. Each element is visited exactly once.
template <int WIDTH, int ILP, typename Op>
__device__ __forceinline__ void for_each_group(Op& op, const Chunk& c, bool vec) {
    const uint32_t T = blockDim.x;
    uint32_t done = 0;
    if (vec) {
        const uint32_t groups = c.len / WIDTH;
        for (uint32_t g0 = threadIdx.x; g0 < groups; g0 += ILP * T) {
            typename Op::Group r[ILP];
#pragma unroll
            for (int k = 0; k < ILP; ++k) {
                const uint32_t g = g0 + k * T;
                if (g < groups) op.load(c.start + (uint64_t)g * WIDTH, r[k]);
            }
#pragma unroll
            for (int k = 0; k < ILP; ++k) {
                const uint32_t g = g0 + k * T;
                if (g < groups) op.store(c.start + (uint64_t)g * WIDTH, r[k]);
            }
        }
        done = groups * WIDTH;
    }
    for (uint32_t j = done + threadIdx.x; j < c.len; j += T) op.one(c.start + j);
}

// 4 consecutive elements of T as f32 (one 16-byte load for f32, one 8-byte load for 16-bit).
// `p` must be aligned to 4 * sizeof(T).
template <typename T> __device__ __forceinline__ void load4(const T* p, float out[4]) {
    if constexpr (sizeof(T) == 4) {
        const float4 x = *reinterpret_cast<const float4*>(p);
        out[0] = x.x;
        out[1] = x.y;
        out[2] = x.z;
        out[3] = x.w;
    } else {
        const uint2 raw = *reinterpret_cast<const uint2*>(p);
        T h[4];
        memcpy(h, &raw, 8);
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = to_f32(h[k]);
    }
}

// Stores 4 values already in T's representation.
template <typename T> __device__ __forceinline__ void store4_raw(T* p, const T in[4]) {
    if constexpr (sizeof(T) == 4) {
        float4 x;
        memcpy(&x, in, 16);
        *reinterpret_cast<float4*>(p) = x;
    } else {
        uint2 raw;
        memcpy(&raw, in, 8);
        *reinterpret_cast<uint2*>(p) = raw;
    }
}

// Stores 4 f32 values rounded to T (nearest even).
template <typename T> __device__ __forceinline__ void store4(T* p, const float in[4]) {
    T h[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = from_f32<T>(in[k]);
    store4_raw(p, h);
}

}  // namespace mt
}  // namespace fusedreg
