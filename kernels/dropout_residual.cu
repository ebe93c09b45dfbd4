// Fused bias + dropout + residual add, forward and backward, and the unfused baseline.
//
//   y  = residual + m(row, i) * (x + bias[col])      m = keep(seed, call, i) ? scale * rowscale[row] : 0
//   dx = m(row, i) * dy                              dbias[col] = sum over rows of dx (f32)
//
// The arithmetic is pinned so that src/dropout_residual/cpu.rs reproduces it bit for bit (see
// that file and the module docs of src/dropout_residual/mod.rs):
//   t = x + b (one f32 add; t = x without bias), m = keep ? rowm : 0 with rowm = scale * rs (one
//   f32 multiply per row; rowm = scale without a row scale), y = m != 0 ? T(fma(t, m, r)) : r
//   (the residual's own bits: a dropped element contributes exactly nothing), dx = m != 0 ?
//   T(dy * m) : 0.
//
// Launch shape: grid.x walks column tiles (blockDim.x threads, VEC consecutive columns each),
// grid.y walks row slabs of `slab_rows` rows; every thread loops over the rows of its slab. There
// is no 64-bit division per element: the flat index of a thread's first element in a row is
// row * cols + c0. The slab size is a function of (rows, cols, dtype) only (computed on the host,
// `slab_rows` in src/dropout_residual/mod.rs), because the dbias partials are per slab: that is
// what makes dbias identical across GPUs and launch configurations, and reproducible on the CPU.
//
// Every index and size is 64-bit. Every thread of a block runs the same tile, chunk and row
// loops (threads past the last column only skip memory accesses), which the shared-memory
// staging (__syncthreads) and the warp-level mask writes (__shfl_down_sync, __ballot_sync) rely
// on; whether a group of rows is dropped is decided per block, so those branches are uniform
// too. blockDim.x is a multiple of 32 (checked on the host).
#include "common/dtype.cuh"
#include "common/philox.cuh"

using namespace fusedreg;

namespace dropout_residual {

constexpr uint64_t THRESHOLD_ALL = 1ull << 32;  // p = 1: every element is dropped
constexpr uint32_t FLAG_DROP_PATH = 1u;  // generate the row scale from Philox under path_call
constexpr uint32_t FLAG_UNROLL = 2u;     // unroll the row loop by UNROLL (launch tuning)
constexpr uint32_t FLAG_IN_PLACE = 4u;   // y == residual: dropped rows are not touched at all
constexpr int UNROLL = 4;       // rows whose loads are all issued before any of their math
constexpr int RS_CHUNK = 256;   // row multipliers staged in shared memory at a time
constexpr int MAX_BLOCK = 256;  // launch bound; the host refuses larger blocks
// Row lanes of a dbias backward block (blockDim.y): must equal DBIAS_LANES in
// src/dropout_residual/mod.rs, and divide RS_CHUNK.
constexpr uint32_t DBIAS_LANES = 4;

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

// V consecutive elements of T held as 32-bit words (two 16-bit elements per word, little-endian
// like memory). Keeping them packed matters: an array of 16-bit elements gets one register per
// element once the compiler splits it, which doubled the forward's registers and made it spill.
// One 16-byte access when V * sizeof(T) == 16; element accesses for V == 1 and for the partial
// last group of a flat tensor (cnt < V).
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

template <typename T> __device__ __forceinline__ uint32_t load_raw(const T* p) {
    if constexpr (sizeof(T) == 4) return *reinterpret_cast<const uint32_t*>(p);
    else return *reinterpret_cast<const unsigned short*>(p);
}
template <typename T> __device__ __forceinline__ void store_raw(T* p, uint32_t b) {
    if constexpr (sizeof(T) == 4) *reinterpret_cast<uint32_t*>(p) = b;
    else *reinterpret_cast<unsigned short*>(p) = (unsigned short)b;
}

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

// Keep bits of elements i .. i+V-1 (bit k = element i+k kept). For V = 4 and 8, i is a multiple
// of V, so the words come from whole Philox blocks i/4 (and i/4 + 1). p = 0 and p = 1 do no
// generator work.
template <int V>
__device__ __forceinline__ uint32_t keep_bits(uint64_t seed, uint64_t call, uint64_t threshold,
                                              uint64_t i) {
    if (threshold == 0) return (1u << V) - 1u;
    if (threshold >= THRESHOLD_ALL) return 0u;
    if constexpr (V == 1) {
        return mask_word(seed, call, i) >= (uint32_t)threshold ? 1u : 0u;
    } else {
        // 0 < threshold < 2^32 here, so one 32-bit compare per word decides (a 64-bit compare
        // is two instructions per element, and bf16 spends ~2 x 40 on the generator per 8).
        const uint32_t t = (uint32_t)threshold;
        uint32_t bits = 0;
#pragma unroll
        for (int b = 0; b < V / 4; ++b) {
            const uint4 w = philox_block(seed, call, (i >> 2) + b);
            const uint32_t nib = (w.x >= t ? 1u : 0u) | (w.y >= t ? 2u : 0u) | (w.z >= t ? 4u : 0u) |
                                 (w.w >= t ? 8u : 0u);
            bits |= nib << (4 * b);
        }
        return bits;
    }
}

// Keep bits of elements i .. i+V-1 read from the 1-bit mask (bit b of word w = element 32w + b;
// as bytes of the little-endian word array, byte i/8 holds elements 8*(i/8) ..).
template <int V>
__device__ __forceinline__ uint32_t read_bits(const uint32_t* mask, uint64_t i) {
    if constexpr (V == 1) {
        return (mask[i >> 5] >> (uint32_t)(i & 31)) & 1u;
    } else {
        const uint32_t byte = reinterpret_cast<const uint8_t*>(mask)[i >> 3];
        return V == 8 ? byte : (byte >> (uint32_t)(i & 4)) & 0xFu;
    }
}

// Writes the keep bits of one row visit to the 1-bit mask. Called by every lane of the warp
// (inactive lanes pass bits = 0), so the warp intrinsics see full warps.
//  V = 8: the 8 bits are exactly byte i/8 (i is a multiple of 8): one plain byte store per thread.
//  V = 4: lanes 2k and 2k+1 hold the low and high nibble of one byte (the host picks this path
//         only when i % 8 == 0 exactly for even lanes: cols % 8 == 0 or a single row); the even
//         lane stores the byte. No byte is stored by two threads.
//  V = 1: a warp holds 32 consecutive elements at any alignment; lane 0 ORs its ballot into the
//         (at most two) words it touches. The host zeroes the mask before this path runs.
template <int V>
__device__ __forceinline__ void write_bits(uint32_t* mask, uint64_t i, uint32_t bits, bool active) {
    if constexpr (V == 8) {
        if (active) reinterpret_cast<uint8_t*>(mask)[i >> 3] = (uint8_t)bits;
    } else if constexpr (V == 4) {
        const uint32_t hi = __shfl_down_sync(0xffffffffu, bits, 1);
        if (active && (threadIdx.x & 1) == 0)
            reinterpret_cast<uint8_t*>(mask)[i >> 3] = (uint8_t)(bits | (hi << 4));
    } else {
        // Active lanes are a prefix of the warp (consecutive columns), so when any bit is set
        // lane 0 is active and `i` is the warp's first element.
        const uint32_t ballot = __ballot_sync(0xffffffffu, bits != 0u);
        if ((threadIdx.x & 31) == 0 && ballot != 0u) {
            const uint32_t sh = (uint32_t)(i & 31);
            atomicOr(&mask[i >> 5], ballot << sh);
            if (sh != 0u && (ballot >> (32 - sh)) != 0u) atomicOr(&mask[(i >> 5) + 1], ballot >> (32 - sh));
        }
    }
}

// rowscale[row]: the caller's value, or the drop-path draw keyed by (seed, path_call, sample)
// with sample = row / rows_per_sample (1 by default: one draw per row).
template <typename P>
__device__ __forceinline__ float row_scale(const P& p, uint64_t row) {
    if (p.rowscale != nullptr) return p.rowscale[row];
    bool keep;
    if (p.path_threshold == 0) keep = true;
    else if (p.path_threshold >= THRESHOLD_ALL) keep = false;
    // Per-sample mode (rows_per_sample > 1) is refused on the host unless rows < 2^32, so a
    // 32-bit division suffices there (a 64-bit one costs registers in every kernel using this).
    else keep = keeps(mask_word(p.seed, p.path_call,
                                p.rows_per_sample == 1 ? row : (uint64_t)((uint32_t)row / p.rows_per_sample)),
                      p.path_threshold);
    return keep ? p.path_scale : 0.f;
}

// Stages rowm = scale * rs for rows r0 .. r1 (r1 - r0 <= RS_CHUNK) in shared memory; also writes
// the row scale out when asked (tile 0 only, so each row is written once). Block-uniform.
template <typename P>
__device__ __forceinline__ void stage_rows(const P& p, float* s_rowm, uint64_t r0, uint64_t r1,
                                           float* rowscale_out, bool write_out) {
    __syncthreads();  // the previous chunk's readers are done
    const uint32_t nthreads = blockDim.x * blockDim.y;
    for (uint64_t k = threadIdx.y * blockDim.x + threadIdx.x; k < r1 - r0; k += nthreads) {
        const float rs = row_scale(p, r0 + k);
        if (write_out) rowscale_out[r0 + k] = rs;
        s_rowm[k] = __fmul_rn(p.scale, rs);
    }
    __syncthreads();
}

template <typename T> struct FwdParams {
    const T* x;
    const T* bias;           // [cols]; null when absent
    const T* residual;
    T* y;                    // may equal residual (FLAG_IN_PLACE)
    const float* rowscale;   // [rows] from the caller; null when absent or generated
    float* rowscale_out;     // [rows]: the generated row scale, when non-null
    uint32_t* mask;          // [ceil(rows*cols/32)] 1-bit keep mask, when non-null
    uint64_t rows, cols, slab_rows;
    uint64_t seed, call, threshold;
    uint64_t path_call, path_threshold;
    uint64_t base;            // flat index of element 0 of this launch (RNG keying only)
    float scale, path_scale;  // DropRate::scale() of p and of p_path
    uint32_t flags;
    uint32_t rows_per_sample;  // drop path: rows sharing one draw (>= 1)
};

template <typename T> struct BwdParams {
    const T* dy;
    T* dx;
    const float* rowscale;   // [rows] from the caller; null when absent or generated
    const uint32_t* mask;    // read instead of regenerating when non-null
    float* partials;         // [slabs][cols] dbias partials, when non-null
    uint64_t rows, cols, slab_rows;
    uint64_t seed, call, threshold;
    uint64_t path_call, path_threshold;
    uint64_t base;            // flat index of element 0 of this launch (RNG keying only)
    float scale, path_scale;
    uint32_t flags;
    uint32_t rows_per_sample;
};

template <typename T> struct DbiasParams {
    const float* partials;  // [slabs][cols]
    T* dbias;               // [cols]
    uint64_t cols, slabs;
};

// Keep bits of rows row .. row+U-1 of one thread's column group, V bits per row packed into one
// word (U * V <= 32). The rows are done one at a time (not unrolled) so that only one row's
// Philox state is live: the generator runs while the row loads issued before it are in flight,
// and the compiler does not interleave U * V / 4 generator chains at the cost of registers.
// Rows with rowm == 0 need no bits unless `need_all` (the mask is written).
template <int V, int U, typename P>
__device__ __forceinline__ uint32_t rows_keep_bits(const P& p, uint64_t row, uint64_t c0, int cnt,
                                                   const float* rowm_smem, bool need_all,
                                                   uint32_t stride = 1) {
    uint32_t bits = 0;
    // The flat index steps by stride * cols per row: one 64-bit add instead of a multiply.
    uint64_t i = p.base + row * p.cols + c0;
    const uint64_t step = (uint64_t)stride * p.cols;
#pragma unroll 1
    for (int u = 0; u < U; ++u, i += step) {
        const float rowm = rowm_smem != nullptr ? rowm_smem[u * stride] : p.scale;
        if (rowm != 0.f || need_all) {
            uint32_t b = keep_bits<V>(p.seed, p.call, p.threshold, i);
            if (cnt < V) b &= (1u << cnt) - 1u;
            bits |= b << (u * V);
        }
    }
    return bits;
}

// U consecutive rows of one thread's column group: all loads first, then the keep bits, then
// the math and the stores. rowm_smem points at the staged multipliers of these rows (null: every
// row's multiplier is p.scale). Called by every thread of the block (inactive ones too, for the
// warp-level mask writes).
//
// A group whose rows are all dropped (rowm == 0: drop path, p = 1) reads no x and generates no
// bits unless the mask is written; in place it touches nothing at all. The test is per group and
// block-uniform; inside a live group every row is loaded unconditionally (conditional loads per
// row cost the compiler dozens of registers).
template <typename T, int V, int U>
__device__ __forceinline__ void fwd_rows(const FwdParams<T>& p, uint64_t row, uint64_t c0, int cnt,
                                         bool active, const Pack<T, V>& bv, const float* rowm_smem) {
    // Several rows in a slab mean rows > 1, and the host takes the vector path for rows > 1 only
    // when cols % V == 0: every active group is whole. Folding that in drops the tail code.
    if constexpr (U > 1) cnt = V;
    const bool has_bias = p.bias != nullptr;
    const bool in_place = (p.flags & FLAG_IN_PLACE) != 0;
    float rowm[U];
    bool live = false;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        rowm[u] = rowm_smem != nullptr ? rowm_smem[u] : p.scale;
        live |= rowm[u] != 0.f;
    }
    if (!live) {
        // y = r: a copy, or nothing in place.
        if (active && !in_place) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const uint64_t i = (row + u) * p.cols + c0;
                store_pack<T, V>(p.y + i, load_pack<T, V>(p.residual + i, cnt), cnt);
            }
        }
        if (p.mask != nullptr) {
            const uint32_t bits = active ? rows_keep_bits<V, U>(p, row, c0, cnt, nullptr, true) : 0u;
#pragma unroll
            for (int u = 0; u < U; ++u)
                write_bits<V>(p.mask, (row + u) * p.cols + c0, (bits >> (u * V)) & ((1u << V) - 1u), active);
        }
        return;
    }
    Pack<T, V> xv[U], rv[U];
    if (active) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint64_t i = (row + u) * p.cols + c0;
            xv[u] = load_pack<T, V>(p.x + i, cnt);
            rv[u] = load_pack<T, V>(p.residual + i, cnt);
        }
    }
    const uint32_t bits = active ? rows_keep_bits<V, U>(p, row, c0, cnt, rowm_smem, p.mask != nullptr) : 0u;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const uint64_t i = (row + u) * p.cols + c0;
        const uint32_t b = (bits >> (u * V)) & ((1u << V) - 1u);
        if (active) {
            // m = keep ? rowm : 0 and "m != 0" per element is "kept and rowm != 0": one test per
            // row instead of a select and a compare per element (a NaN rowm counts as live).
            const uint32_t live = rowm[u] != 0.f ? b : 0u;
            // Every element is computed and the kept ones selected: a branch per element compiles
            // to a divergence region each (BSSY/BRA/BSYNC). A dropped element takes exactly the
            // residual's bits, even if x is inf or NaN.
            Pack<T, V> out;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float t = xv[u].get(k);
                if (has_bias) t = __fadd_rn(t, bv.get(k));
                const uint32_t fused = f32_to_bits<T>(__fmaf_rn(t, rowm[u], rv[u].get(k)));
                out.set_raw(k, ((live >> k) & 1u) ? fused : rv[u].raw(k));
            }
            store_pack<T, V>(p.y + i, out, cnt);
        }
        if (p.mask != nullptr) write_bits<V>(p.mask, i, b, active);
    }
}

template <typename T, int V>
__device__ __forceinline__ void fwd(const FwdParams<T>& p) {
    __shared__ float s_rowm[RS_CHUNK];
    const bool has_rs = p.rowscale != nullptr || (p.flags & FLAG_DROP_PATH) != 0;
    const bool unroll = (p.flags & FLAG_UNROLL) != 0;
    const uint64_t groups = (p.cols + V - 1) / V;
    const uint64_t tiles = (groups + blockDim.x - 1) / blockDim.x;
    const uint64_t slab_begin = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t slab_end = min(slab_begin + p.slab_rows, p.rows);

    if constexpr (V > 1) {
        // Mask bytes past the last element (padding of the last word) are written by one thread;
        // every other byte belongs to exactly one element group.
        if (p.mask != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
            const uint64_t n = p.rows * p.cols;
            uint8_t* bytes = reinterpret_cast<uint8_t*>(p.mask);
            for (uint64_t b = (n + 7) / 8; b < (n + 31) / 32 * 4; ++b) bytes[b] = 0;
        }
    }

    for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint64_t c0 = (tile * blockDim.x + threadIdx.x) * V;
        const bool active = c0 < p.cols;
        const int cnt = active ? (int)min((uint64_t)V, p.cols - c0) : 0;
        Pack<T, V> bv;
        if (p.bias != nullptr && active) bv = load_pack<T, V>(p.bias + c0, cnt);
        for (uint64_t r0 = slab_begin; r0 < slab_end; r0 += RS_CHUNK) {
            const uint64_t r1 = min(r0 + (uint64_t)RS_CHUNK, slab_end);
            if (has_rs) stage_rows(p, s_rowm, r0, r1, p.rowscale_out, p.rowscale_out != nullptr && tile == 0);
            uint64_t row = r0;
            if (unroll)
                for (; row + UNROLL <= r1; row += UNROLL)
                    fwd_rows<T, V, UNROLL>(p, row, c0, cnt, active, bv, has_rs ? s_rowm + (row - r0) : nullptr);
            for (; row < r1; ++row)
                fwd_rows<T, V, 1>(p, row, c0, cnt, active, bv, has_rs ? s_rowm + (row - r0) : nullptr);
        }
    }
}

// Backward over U rows row, row + stride, ...: dx = m != 0 ? T(dy * m) : 0, and the dbias
// partial sums of this thread's lane in row order. A group whose rows are all dropped reads
// nothing and writes zeros (grouping as in fwd_rows).
template <typename T, int V, int U>
__device__ __forceinline__ void bwd_rows(const BwdParams<T>& p, uint64_t row, uint32_t stride,
                                         uint64_t c0, int cnt, bool active, float (&acc)[V],
                                         const float* rowm_smem) {
    if (!active) return;  // no warp-level operations in the backward
    if constexpr (U > 1) cnt = V;  // as in fwd_rows
    const bool want_dbias = p.partials != nullptr;
    float rowm[U];
    bool live = false;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        rowm[u] = rowm_smem != nullptr ? rowm_smem[u * stride] : p.scale;
        live |= rowm[u] != 0.f;
    }
    if (!live) {
        Pack<T, V> zero;
#pragma unroll
        for (int k = 0; k < V; ++k) zero.set_raw(k, f32_to_bits<T>(0.f));
#pragma unroll
        for (int u = 0; u < U; ++u) {
            store_pack<T, V>(p.dx + (row + u * stride) * p.cols + c0, zero, cnt);
#pragma unroll
            for (int k = 0; k < V; ++k)
                if (want_dbias) acc[k] = __fadd_rn(acc[k], 0.f);  // as the CPU: + 0.0 per dropped row
        }
        return;
    }
    Pack<T, V> dyv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) dyv[u] = load_pack<T, V>(p.dy + (row + u * stride) * p.cols + c0, cnt);
    uint32_t bits = 0;
    if (p.mask != nullptr) {
#pragma unroll
        for (int u = 0; u < U; ++u)
            bits |= read_bits<V>(p.mask, (row + u * stride) * p.cols + c0) << (u * V);
    } else {
        bits = rows_keep_bits<V, U>(p, row, c0, cnt, rowm_smem, false, stride);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        // As in fwd_rows: "m != 0" is "kept and rowm != 0", tested once per row (the mask may hold
        // kept bits for a row whose multiplier is 0).
        const uint32_t b = rowm[u] != 0.f ? (bits >> (u * V)) & ((1u << V) - 1u) : 0u;
        Pack<T, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float d = ((b >> k) & 1u) ? __fmul_rn(dyv[u].get(k), rowm[u]) : 0.f;
            if (want_dbias) acc[k] = __fadd_rn(acc[k], d);
            out.set_raw(k, f32_to_bits<T>(d));
        }
        store_pack<T, V>(p.dx + (row + u * stride) * p.cols + c0, out, cnt);
    }
}

// The backward. blockDim.y = DBIAS_LANES when dbias partials are written (1 otherwise): the
// threads (x, y) of a block share column group x and split each slab's rows by lane
// y = (row - slab_begin) % blockDim.y, so a block covers fewer columns and the grid has more
// blocks for the same partition. Each lane sums its rows in increasing order from +0.0; the
// slab's partial is ((lane0 + lane1) + lane2) + lane3, the order src/dropout_residual/cpu.rs
// reproduces.
template <typename T, int V>
__device__ __forceinline__ void bwd(const BwdParams<T>& p) {
    __shared__ float s_rowm[RS_CHUNK];
    __shared__ float s_lane[DBIAS_LANES - 1][MAX_BLOCK / DBIAS_LANES * (16 / sizeof(T))];
    const bool has_rs = p.rowscale != nullptr || (p.flags & FLAG_DROP_PATH) != 0;
    const bool unroll = (p.flags & FLAG_UNROLL) != 0;
    const uint32_t lanes = blockDim.y, lane = threadIdx.y;
    const uint64_t groups = (p.cols + V - 1) / V;
    const uint64_t tiles = (groups + blockDim.x - 1) / blockDim.x;
    const uint64_t slab_begin = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t slab_end = min(slab_begin + p.slab_rows, p.rows);

    for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint64_t c0 = (tile * blockDim.x + threadIdx.x) * V;
        const bool active = c0 < p.cols;
        const int cnt = active ? (int)min((uint64_t)V, p.cols - c0) : 0;
        // This lane's dbias partial: the f32 sum of the unrounded dx over its rows of the slab
        // in increasing row order, dropped elements adding +0.0f like any other (as the CPU).
        float acc[V];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = 0.f;
        for (uint64_t r0 = slab_begin; r0 < slab_end; r0 += RS_CHUNK) {
            // RS_CHUNK is a multiple of the lane count, so lanes keep their rows across chunks.
            const uint64_t r1 = min(r0 + (uint64_t)RS_CHUNK, slab_end);
            if (has_rs) stage_rows(p, s_rowm, r0, r1, (float*)nullptr, false);
            uint64_t row = r0 + lane;
            if (unroll)
                for (; row + (UNROLL - 1) * lanes < r1; row += UNROLL * lanes)
                    bwd_rows<T, V, UNROLL>(p, row, lanes, c0, cnt, active, acc, has_rs ? s_rowm + (row - r0) : nullptr);
            for (; row < r1; row += lanes)
                bwd_rows<T, V, 1>(p, row, lanes, c0, cnt, active, acc, has_rs ? s_rowm + (row - r0) : nullptr);
        }
        if (p.partials != nullptr) {
            // Fold the lanes in order through shared memory (block-uniform branch).
            if (lanes > 1) {
                __syncthreads();  // the previous tile's readers are done
                if (lane > 0) {
#pragma unroll
                    for (int k = 0; k < V; ++k) s_lane[lane - 1][threadIdx.x * V + k] = acc[k];
                }
                __syncthreads();
                if (lane == 0) {
                    for (uint32_t l = 1; l < lanes; ++l) {
#pragma unroll
                        for (int k = 0; k < V; ++k) acc[k] = __fadd_rn(acc[k], s_lane[l - 1][threadIdx.x * V + k]);
                    }
                }
            }
            if (lane == 0 && active) {
                float* out = p.partials + (uint64_t)blockIdx.y * p.cols + c0;
#pragma unroll
                for (int k = 0; k < V; ++k)
                    if (k < cnt) out[k] = acc[k];
            }
        }
    }
}

// dbias[col] = T(sum over slabs, in increasing slab order, of partials[slab][col]).
// A block owns 32 columns. Its 8 warps load the partials of up to DBIAS_STAGE slabs into shared
// memory together (many loads in flight: one thread per column walking the slabs alone is a
// chain of DRAM round trips, and 4096 columns would occupy a quarter of the SMs); then warp 0
// adds them in slab order. The order of the adds is exactly the sequential one.
constexpr int DBIAS_COLS = 32;
constexpr int DBIAS_WARPS = 8;
constexpr int DBIAS_STAGE = 256;
template <typename T>
__device__ __forceinline__ void dbias_finish(const DbiasParams<T>& p) {
    __shared__ float s_part[DBIAS_STAGE][DBIAS_COLS];
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (uint64_t col0 = blockIdx.x * (uint64_t)DBIAS_COLS; col0 < p.cols;
         col0 += (uint64_t)gridDim.x * DBIAS_COLS) {
        const uint64_t col = col0 + lane;
        float acc = 0.f;
        for (uint64_t s0 = 0; s0 < p.slabs; s0 += DBIAS_STAGE) {
            const uint32_t n = (uint32_t)min((uint64_t)DBIAS_STAGE, p.slabs - s0);
            __syncthreads();  // warp 0 is done with the previous stage
#pragma unroll 8
            for (uint32_t k = warp; k < n; k += DBIAS_WARPS)
                s_part[k][lane] = col < p.cols ? p.partials[(s0 + k) * p.cols + col] : 0.f;
            __syncthreads();
            if (warp == 0)
                for (uint32_t k = 0; k < n; ++k) acc = __fadd_rn(acc, s_part[k][lane]);
        }
        if (warp == 0 && col < p.cols) p.dbias[col] = from_f32<T>(acc);
    }
}

// ---------------------------------------------------------------------------------------------
// The unfused baseline, the way PyTorch eager runs `residual + dropout(x + bias)`: one kernel per
// op, each reading its inputs from and writing its output to device memory in T, a 1-byte mask
// (1 = kept) between forward and backward, and a separate bias-gradient column sum. Same Philox
// keying, so its byte mask equals the fused bitmask element for element. Flat kernels use 16-byte
// vectors when every pointer allows it (`vec`), with a scalar tail.

template <typename T> struct UnfusedBiasAddParams {
    const T* x;
    const T* bias;
    T* t;  // t = T(x + bias[col])
    uint64_t rows, cols, slab_rows;
    uint32_t vec, pad;
};

template <typename T> struct UnfusedDropoutParams {
    const T* t;
    T* d;            // d = keep ? T(t * scale) : 0
    uint8_t* mask;   // 1 = kept
    uint64_t n, seed, call, threshold;
    float scale;
    uint32_t vec;
};

template <typename T> struct UnfusedAddParams {
    const T* a;
    const T* b;
    T* out;  // out = T(a + b)
    uint64_t n;
    uint32_t vec, pad;
};

template <typename T> struct UnfusedMaskedScaleParams {
    const T* dy;
    const uint8_t* mask;
    T* dx;  // dx = mask ? T(dy * scale) : 0
    uint64_t n;
    float scale;
    uint32_t vec;
};

template <typename T> struct UnfusedColSumParams {
    const T* dx;
    float* partials;  // [slabs][cols], the same partition as the fused backward
    uint64_t rows, cols, slab_rows;
    uint32_t vec, pad;
};

template <typename T, int V>
__device__ __forceinline__ void unfused_bias_add_body(const UnfusedBiasAddParams<T>& p) {
    const uint64_t groups = (p.cols + V - 1) / V;
    const uint64_t tiles = (groups + blockDim.x - 1) / blockDim.x;
    const uint64_t slab_begin = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t slab_end = min(slab_begin + p.slab_rows, p.rows);
    for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint64_t c0 = (tile * blockDim.x + threadIdx.x) * V;
        if (c0 >= p.cols) continue;
        const int cnt = (int)min((uint64_t)V, p.cols - c0);
        const Pack<T, V> bv = load_pack<T, V>(p.bias + c0, cnt);
        for (uint64_t row = slab_begin; row < slab_end; ++row) {
            const uint64_t i = row * p.cols + c0;
            const Pack<T, V> xv = load_pack<T, V>(p.x + i, cnt);
            Pack<T, V> out;
#pragma unroll
            for (int k = 0; k < V; ++k) out.set_raw(k, f32_to_bits<T>(__fadd_rn(xv.get(k), bv.get(k))));
            store_pack<T, V>(p.t + i, out, cnt);
        }
    }
}

// One group of W elements at flat index i (W = 16 / sizeof(T) in the vector loop, 1 in the tail).
template <typename T, int W> struct UnfusedDropoutOp {
    static __device__ __forceinline__ void run(const UnfusedDropoutParams<T>& p, uint64_t i) {
        const Pack<T, W> tv = load_pack<T, W>(p.t + i, W);
        const uint32_t bits = keep_bits<W>(p.seed, p.call, p.threshold, i);
        Pack<T, W> out;
        uint8_t m[W];
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const bool keep = (bits >> k) & 1u;
            out.set_raw(k, f32_to_bits<T>(keep ? __fmul_rn(tv.get(k), p.scale) : 0.f));
            m[k] = keep ? 1 : 0;
        }
        store_pack<T, W>(p.d + i, out, W);
        if constexpr (W == 8) {
            uint2 raw;
            memcpy(&raw, m, 8);
            *reinterpret_cast<uint2*>(p.mask + i) = raw;
        } else if constexpr (W == 4) {
            uint32_t raw;
            memcpy(&raw, m, 4);
            *reinterpret_cast<uint32_t*>(p.mask + i) = raw;
        } else {
            p.mask[i] = m[0];
        }
    }
};

template <typename T, int W> struct UnfusedAddOp {
    static __device__ __forceinline__ void run(const UnfusedAddParams<T>& p, uint64_t i) {
        const Pack<T, W> a = load_pack<T, W>(p.a + i, W);
        const Pack<T, W> b = load_pack<T, W>(p.b + i, W);
        Pack<T, W> out;
#pragma unroll
        for (int k = 0; k < W; ++k) out.set_raw(k, f32_to_bits<T>(__fadd_rn(a.get(k), b.get(k))));
        store_pack<T, W>(p.out + i, out, W);
    }
};

template <typename T, int W> struct UnfusedMaskedScaleOp {
    static __device__ __forceinline__ void run(const UnfusedMaskedScaleParams<T>& p, uint64_t i) {
        const Pack<T, W> dyv = load_pack<T, W>(p.dy + i, W);
        uint8_t m[W];
        if constexpr (W == 8) {
            const uint2 raw = *reinterpret_cast<const uint2*>(p.mask + i);
            memcpy(m, &raw, 8);
        } else if constexpr (W == 4) {
            const uint32_t raw = *reinterpret_cast<const uint32_t*>(p.mask + i);
            memcpy(m, &raw, 4);
        } else {
            m[0] = p.mask[i];
        }
        Pack<T, W> out;
#pragma unroll
        for (int k = 0; k < W; ++k)
            out.set_raw(k, f32_to_bits<T>(m[k] ? __fmul_rn(dyv.get(k), p.scale) : 0.f));
        store_pack<T, W>(p.dx + i, out, W);
    }
};

// Grid-stride loop over a flat tensor: whole 16-byte groups when p.vec (every pointer aligned,
// checked on the host), then the remaining elements one at a time.
template <typename T, template <typename, int> class Op, typename P>
__device__ __forceinline__ void flat_loop(const P& p) {
    constexpr int V = 16 / sizeof(T);
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t nvec = p.vec ? p.n / V : 0;
    for (uint64_t v = tid; v < nvec; v += stride) Op<T, V>::run(p, v * V);
    for (uint64_t i = nvec * V + tid; i < p.n; i += stride) Op<T, 1>::run(p, i);
}

template <typename T, int V>
__device__ __forceinline__ void unfused_col_sum_body(const UnfusedColSumParams<T>& p) {
    const uint64_t groups = (p.cols + V - 1) / V;
    const uint64_t tiles = (groups + blockDim.x - 1) / blockDim.x;
    const uint64_t slab_begin = (uint64_t)blockIdx.y * p.slab_rows;
    const uint64_t slab_end = min(slab_begin + p.slab_rows, p.rows);
    for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint64_t c0 = (tile * blockDim.x + threadIdx.x) * V;
        if (c0 >= p.cols) continue;
        const int cnt = (int)min((uint64_t)V, p.cols - c0);
        float acc[V];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = 0.f;
        for (uint64_t row = slab_begin; row < slab_end; ++row) {
            const Pack<T, V> dv = load_pack<T, V>(p.dx + row * p.cols + c0, cnt);
#pragma unroll
            for (int k = 0; k < V; ++k) acc[k] = __fadd_rn(acc[k], dv.get(k));
        }
        float* out = p.partials + (uint64_t)blockIdx.y * p.cols + c0;
#pragma unroll
        for (int k = 0; k < V; ++k)
            if (k < cnt) out[k] = acc[k];
    }
}

}  // namespace dropout_residual

using namespace dropout_residual;

#define DR_CHECK_SIZES(T)                                                                   \
    static_assert(sizeof(FwdParams<T>) == 144, "must match src/dropout_residual/gpu.rs");   \
    static_assert(sizeof(BwdParams<T>) == 128, "must match src/dropout_residual/gpu.rs");   \
    static_assert(sizeof(DbiasParams<T>) == 32, "must match src/dropout_residual/gpu.rs");  \
    static_assert(sizeof(UnfusedBiasAddParams<T>) == 56, "must match unfused.rs");          \
    static_assert(sizeof(UnfusedDropoutParams<T>) == 64, "must match unfused.rs");          \
    static_assert(sizeof(UnfusedAddParams<T>) == 40, "must match unfused.rs");              \
    static_assert(sizeof(UnfusedMaskedScaleParams<T>) == 40, "must match unfused.rs");      \
    static_assert(sizeof(UnfusedColSumParams<T>) == 48, "must match unfused.rs");

DR_CHECK_SIZES(float)
DR_CHECK_SIZES(__half)
DR_CHECK_SIZES(__nv_bfloat16)

// Register budgets (see the .resources.txt report): the forward holds 2 x UNROLL 16-byte
// vectors per thread, so it gets up to 85 registers (3 blocks of 256 per SM: 768 threads with 8
// loads of 16 bytes in flight each, far more than the bandwidth-latency product needs); the
// backward holds UNROLL vectors and fits in 64 (4 blocks per SM). Without these bounds the
// compiler spends 90-130 registers on instruction-level parallelism we do not need.
#define FWD_BOUNDS __launch_bounds__(MAX_BLOCK, 3)
#define BWD_BOUNDS __launch_bounds__(MAX_BLOCK, 4)

#define DR_KERNELS(T, S)                                                                               \
    extern "C" __global__ void FWD_BOUNDS dropout_residual_fwd_vec_##S(              \
        const FwdParams<T> p) {                                                                        \
        fwd<T, 16 / sizeof(T)>(p);                                                                     \
    }                                                                                                  \
    extern "C" __global__ void FWD_BOUNDS dropout_residual_fwd_scalar_##S(           \
        const FwdParams<T> p) {                                                                        \
        fwd<T, 1>(p);                                                                                  \
    }                                                                                                  \
    extern "C" __global__ void BWD_BOUNDS dropout_residual_bwd_vec_##S(              \
        const BwdParams<T> p) {                                                                        \
        bwd<T, 16 / sizeof(T)>(p);                                                                     \
    }                                                                                                  \
    extern "C" __global__ void BWD_BOUNDS dropout_residual_bwd_scalar_##S(           \
        const BwdParams<T> p) {                                                                        \
        bwd<T, 1>(p);                                                                                  \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK) dropout_residual_dbias_##S(                \
        const DbiasParams<T> p) {                                                                      \
        dbias_finish<T>(p);                                                                            \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK) dropout_residual_unfused_bias_add_##S(     \
        const UnfusedBiasAddParams<T> p) {                                                             \
        if (p.vec) unfused_bias_add_body<T, 16 / sizeof(T)>(p);                                        \
        else unfused_bias_add_body<T, 1>(p);                                                           \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK) dropout_residual_unfused_dropout_##S(      \
        const UnfusedDropoutParams<T> p) {                                                             \
        flat_loop<T, UnfusedDropoutOp>(p);                                                             \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK) dropout_residual_unfused_add_##S(          \
        const UnfusedAddParams<T> p) {                                                                 \
        flat_loop<T, UnfusedAddOp>(p);                                                                 \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK) dropout_residual_unfused_masked_scale_##S( \
        const UnfusedMaskedScaleParams<T> p) {                                                         \
        flat_loop<T, UnfusedMaskedScaleOp>(p);                                                         \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_BLOCK) dropout_residual_unfused_col_sum_##S(      \
        const UnfusedColSumParams<T> p) {                                                              \
        if (p.vec) unfused_col_sum_body<T, 16 / sizeof(T)>(p);                                         \
        else unfused_col_sum_body<T, 1>(p);                                                            \
    }

FUSEDREG_FOR_EACH_DTYPE(DR_KERNELS)
