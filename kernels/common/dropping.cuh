// The dropout machinery every dropping op shares: keying, keep bits, the 1-bit mask, the row
// scale / drop path, the backward with its deterministic dbias, and the unfused (PyTorch eager)
// dropout kernels. Mirrored on the host by src/dropping/ (the rate and threshold, the
// launch geometry, the slab partition, the CPU keep bits and bitmask).
//
// # The keying contract (what makes a mask a pure function of (seed, call, 64-bit index))
// Element i (the flat 64-bit index, `base + row * cols + col` in a launch) is dropped when
// philox word(seed, call, i) < threshold, threshold = round(p * 2^32) in 0 ..= 2^32 (host:
// DropRate). One Philox block keys elements 4b .. 4b+3. threshold 0 and 2^32 do no generator
// work. Kept elements are multiplied by rowm = scale * rowscale[row] (scale = 1 / (1 - p) in f32,
// 0 for p = 1); "m != 0" (kept and rowm != 0) selects the computed value.
//
// # What a new dropping op calls (namespace fusedreg::drop)
//   keep_bits<V>(seed, call, threshold, i)   V = 1, 4 or 8 keep bits of elements i .. i+V-1 (i a
//                                            multiple of V for V > 1): bit k = element i+k kept
//   keep_bits16<V>(...), keep_bits8<V>(...), keep_bits_of<V>(p, i)
//                                            the same under 16-bit keying (8 elements per Philox
//                                            block) and 8-bit keying (16 per block); the 32/16
//                                            one p.flags & FLAG_KEY16 selects
//   read_bits<V>(mask, i)                    the same bits from a 1-bit mask
//   group_keys<KB, V>(seed, call, threshold, i) -> GroupKeys: the same decisions at a
//                                            compile-time resolution KB (32, 16, 8), as Philox
//                                            words compared per element (keys.keep(k), a
//                                            predicate next to the select; keys.bits() for a mask)
//   write_bits<V>(mask, i, bits, active)     writes them; called by EVERY lane of the warp (see
//                                            its comment for the V = 4 / V = 1 rules)
//   zero_mask_padding(mask, n)               one thread: the bits past n in the last word
//   row_scale(p, row), stage_rows(p, s_rowm, r0, r1, out, write_out)
//                                            the row multiplier rowm = scale * rowscale of up to
//                                            RS_CHUNK rows into shared memory (block-uniform)
//   rows_keep_bits<V, U, K16>(p, row, c0, cnt, rowm_smem, need_all, stride)
//                                            keep bits of U rows of one column group
//   dropout_bwd<T, V, KEYED>(DropoutBwdParams<T>) the whole backward dx = m != 0 ? T(dy * m) : 0 with
//                                            optional dbias partials (slab / lane scheme), then
//   dbias_finish<T>(DbiasParams<T>)          the ordered sum of the partials
//   unfused_*                                the eager baseline: bias add, dropout writing a byte
//                                            mask, masked scale, column sum, flat_loop
//   FUSEDREG_DROPOUT_BWD_KERNELS(stem, T, S, KEYED), FUSEDREG_DROPOUT_UNFUSED_KERNELS(stem, T, S)
//                                            instantiate the backward / baseline under the op's
//                                            stem (bottom of this file);
//   FUSEDREG_DROPPING_DBIAS_KERNEL(stem, T, S) the dbias finish alone, for an op with its own
//                                            backward writing [slabs][cols] partials
// A params struct P used with row_scale / stage_rows / rows_keep_bits has the fields
//   seed, call, threshold, base, cols, scale, flags (the dropout), rowscale (const float*, or
//   null), path_call, path_threshold, path_scale, rows_per_sample (the generated drop path; used
//   when rowscale is null and the op set FLAG_DROP_PATH).
// A new op's forward: take the tile / slab / RS_CHUNK / UNROLL loop of kernels/dropout.cu (fwd and
// fwd_rows, ~100 lines) and replace the per-element math; its host side fills the params with
// dropping::gpu (segments, geometry, row_scale_fields, resolution_flag). An op whose
// backward is m * dy instantiates FUSEDREG_DROPOUT_BWD_KERNELS and calls gpu::backward.
// Launch shape (host: src/dropping/gpu.rs): grid.x column tiles of blockDim.x threads x V
// columns, grid.y row slabs of slab_rows rows; blockDim.x a multiple of 32, at most MAX_BLOCK.
#pragma once
#include "common/dtype.cuh"
#include "common/philox.cuh"

namespace fusedreg {
namespace drop {

constexpr uint64_t THRESHOLD_ALL = 1ull << 32;  // p = 1: every element is dropped
constexpr uint32_t FLAG_DROP_PATH = 1u;  // generate the row scale from Philox under path_call
constexpr uint32_t FLAG_UNROLL = 2u;     // unroll the row loop by UNROLL (launch tuning)
// 16-bit keying (MaskResolution::Bits16 on the host): threshold is in 0 ..= 2^16 and one Philox
// block keys 8 elements (see keep_bits16). Op-specific flags: 4 (dropout's in place)
// and 16 upwards.
constexpr uint32_t FLAG_KEY16 = 8u;
constexpr uint64_t THRESHOLD16_ALL = 1ull << 16;  // p = 1 under 16-bit keying
// 8-bit keying (MaskResolution::Bits8): threshold in 0 ..= 2^8, one Philox block keys 16
// elements (see keep_bits8). The host refuses it for ops whose kernels do not read this flag.
constexpr uint32_t FLAG_KEY8 = 16u;
constexpr uint64_t THRESHOLD8_ALL = 1ull << 8;  // p = 1 under 8-bit keying
constexpr int UNROLL = 4;       // rows whose loads are all issued before any of their math
constexpr int RS_CHUNK = 256;   // row multipliers staged in shared memory at a time
constexpr int MAX_BLOCK = 256;  // launch bound; the host refuses larger blocks
// Row lanes of a dbias backward block (blockDim.y): must equal DBIAS_LANES in
// src/dropping/mod.rs, and divide RS_CHUNK.
constexpr uint32_t DBIAS_LANES = 4;

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

// Keep bits of elements i .. i+V-1 under 16-bit keying: element i takes halfword i % 8 of
// Philox block i / 8 (halfword k = word k / 2, low half for even k), dropped when it is below
// threshold (0 ..= 2^16; the drop probability is quantised to 2^-16). One Philox evaluation keys
// 8 elements: a 16-bit type's 16-byte vector needs one instead of two. i is a multiple of V.
template <int V>
__device__ __forceinline__ uint32_t keep_bits16(uint64_t seed, uint64_t call, uint64_t threshold,
                                                uint64_t i) {
    if (threshold == 0) return (1u << V) - 1u;
    if (threshold >= THRESHOLD16_ALL) return 0u;
    const uint32_t t = (uint32_t)threshold;
    const uint4 w = philox_block(seed, call, i >> 3);
    if constexpr (V == 1) {
        const uint32_t word = philox_word(w, (uint32_t)(i & 7) >> 1);
        return ((i & 1) ? word >> 16 : word & 0xffffu) >= t ? 1u : 0u;
    } else {
        // Halfwords 0..7 of the block; a 4-wide group takes the half (i & 4) selects.
        uint32_t bits = 0;
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
        const int base_word = V == 8 ? 0 : (int)((i & 4) >> 1);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const uint32_t word = words[base_word + (k >> 1)];
            const uint32_t h = (k & 1) ? word >> 16 : word & 0xffffu;
            bits |= (h >= t ? 1u : 0u) << k;
        }
        return bits;
    }
}

// Keep bits of elements i .. i+V-1 under 8-bit keying: element i takes byte i % 16 of Philox
// block i / 16 (byte k = bits 8 (k % 4) .. of word k / 4, little-endian like memory), dropped
// when it is below threshold (0 ..= 2^8; p quantised to 2^-8, FlashAttention's resolution).
// One Philox evaluation keys 16 elements: a thread that owns 16 consecutive elements (V = 16)
// uses the whole block; V = 8 uses half of it (the neighbouring group computes the same block).
// i is a multiple of V.
template <int V>
__device__ __forceinline__ uint32_t keep_bits8(uint64_t seed, uint64_t call, uint64_t threshold,
                                               uint64_t i) {
    if (threshold == 0) return (1u << V) - 1u;
    if (threshold >= THRESHOLD8_ALL) return 0u;
    const uint32_t t = (uint32_t)threshold;
    const uint4 w = philox_block(seed, call, i >> 4);
    if constexpr (V == 1) {
        const uint32_t word = philox_word(w, (uint32_t)(i & 15) >> 2);
        return ((word >> (8 * (uint32_t)(i & 3))) & 0xffu) >= t ? 1u : 0u;
    } else {
        static_assert(V == 4 || V == 8 || V == 16, "8-bit keying: V = 1, 4, 8 or 16");
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
        // The group's first word: V = 16 starts at word 0; V = 8 at word (i & 8) / 4; V = 4 at
        // word (i & 12) / 4.
        const int base_word = V == 16 ? 0 : (int)((i & 15) >> 2);
        uint32_t bits = 0;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const uint32_t byte = (words[base_word + (k >> 2)] >> (8 * (k & 3))) & 0xffu;
            bits |= (byte >= t ? 1u : 0u) << k;
        }
        return bits;
    }
}

// The keep bits of a params struct P under its resolution (FLAG_KEY16 in p.flags). FLAG_KEY8 is
// not read here: an op that implements 8-bit keying dispatches to keep_bits8 itself (a third
// run-time case per row cost the dropout forward 11% of its instructions).
template <int V, typename P>
__device__ __forceinline__ uint32_t keep_bits_of(const P& p, uint64_t i) {
    if (p.flags & FLAG_KEY16) return keep_bits16<V>(p.seed, p.call, p.threshold, i);
    return keep_bits<V>(p.seed, p.call, p.threshold, i);
}

// The keys of one group of V elements (i a multiple of V) under KB-bit keying (KB = 32, 16 or 8,
// a compile-time resolution), kept as the Philox words the group reads and compared per element
// where the element is selected: keep(k) is one compare (plus a shift for a key below the top of
// its word) that the compiler turns into the predicate of the select, instead of packing keep
// bits into an integer and extracting them again. The same decisions as keep_bits / keep_bits16 /
// keep_bits8: a KB-bit key is compared in the top KB bits of a word with the threshold shifted
// there, which orders them exactly as the KB-bit compare does. threshold 0 keeps everything and
// the "all" threshold drops everything without generator work (words 0 against 0 or ~0).
template <int KB, int V> struct GroupKeys {
    static_assert(KB == 32 || KB == 16 || KB == 8, "resolution: 32, 16 or 8 bits");
    static constexpr int PER_WORD = 32 / KB;
    // V = 1 keeps its one key in the top bits of w[0].
    static constexpr int WORDS = V == 1 ? 1 : (V + PER_WORD - 1) / PER_WORD;
    uint32_t w[WORDS];
    uint32_t t;  // the threshold in the top KB bits, or ~0 (drop all)

    __device__ __forceinline__ bool keep(int k) const {
        if constexpr (V == 1 || KB == 32) return w[k] >= t;
        else return (w[k / PER_WORD] << (32 - KB * (1 + k % PER_WORD))) >= t;
    }
    // Bit k = element k kept (the 1-bit mask's layout).
    __device__ __forceinline__ uint32_t bits() const {
        uint32_t b = 0;
#pragma unroll
        for (int k = 0; k < V; ++k) b |= (keep(k) ? 1u : 0u) << k;
        return b;
    }
    // Every element dropped (a row whose multiplier is 0).
    __device__ __forceinline__ void drop_all() {
#pragma unroll
        for (int j = 0; j < WORDS; ++j) w[j] = 0u;
        t = ~0u;
    }
};

// The keying of a launch at resolution KB = 32, 16 or 8 when 0 < threshold < 2^KB (the generator
// runs): the threshold in the top KB bits, computed once per thread. KeyGen<0> stands for the
// other thresholds at any resolution: 0 keeps every element, 2^KB drops every one, without
// generator work. The kernels pick the variant once per thread (a uniform branch per row would
// cost every row its setup). seed and call are passed to group() (kernel parameters: the
// compiler reads them from the constant bank instead of holding copies in registers).
template <int KB> struct KeyGen {
    uint32_t t;

    __device__ __forceinline__ explicit KeyGen(uint64_t threshold) : t((uint32_t)threshold << (32 - KB)) {}

    // The keys of elements i .. i+V-1 (i a multiple of V).
    template <int V>
    __device__ __forceinline__ GroupKeys<KB, V> group(uint64_t seed, uint64_t call, uint64_t i) const {
        GroupKeys<KB, V> g;
        g.t = t;
        constexpr int PER_BLOCK = 128 / KB;  // elements keyed by one Philox block
        constexpr int PER_WORD = 32 / KB;
        if constexpr (V == 1) {
            const uint4 b = philox_block(seed, call, i / PER_BLOCK);
            const uint32_t k = (uint32_t)(i % PER_BLOCK);
            const uint32_t word = philox_word(b, k / PER_WORD);
            g.w[0] = word << (32 - KB * (1 + k % PER_WORD));
        } else if constexpr (V >= PER_BLOCK) {
            // Whole blocks: V / PER_BLOCK of them, word j of the group = word j % 4 of block j / 4.
#pragma unroll
            for (int b = 0; b < V / PER_BLOCK; ++b) {
                const uint4 w = philox_block(seed, call, i / PER_BLOCK + b);
                g.w[4 * b] = w.x, g.w[4 * b + 1] = w.y, g.w[4 * b + 2] = w.z, g.w[4 * b + 3] = w.w;
            }
        } else {
            // Part of a block: the group's words start at word (i % PER_BLOCK) / PER_WORD; selects,
            // not an indexed array (which may go to local memory).
            static_assert(PER_BLOCK % V == 0, "a group never straddles two blocks");
            const uint4 w = philox_block(seed, call, i / PER_BLOCK);
            const uint32_t first = (uint32_t)(i % PER_BLOCK) / PER_WORD;
#pragma unroll
            for (int j = 0; j < g.WORDS; ++j) {
                const uint32_t k = first + j;
                g.w[j] = (k & 2) ? ((k & 1) ? w.w : w.z) : ((k & 1) ? w.y : w.x);
            }
        }
        return g;
    }
};

// Every element kept (all) or dropped (!all): the GroupKeys interface without words.
template <int V> struct ConstKeys {
    bool all;
    __device__ __forceinline__ bool keep(int) const { return all; }
    __device__ __forceinline__ uint32_t bits() const { return all ? (V == 32 ? ~0u : (1u << V) - 1u) : 0u; }
};

template <> struct KeyGen<0> {
    bool all;
    __device__ __forceinline__ explicit KeyGen(uint64_t threshold) : all(threshold == 0) {}
    template <int V> __device__ __forceinline__ ConstKeys<V> group(uint64_t, uint64_t, uint64_t) const {
        return ConstKeys<V>{all};
    }
};

// Whether a launch at resolution KB (FLAG_KEY16 / FLAG_KEY8 in flags) runs the generator.
__device__ __forceinline__ bool generates(uint64_t threshold, uint32_t flags) {
    const uint64_t all = (flags & FLAG_KEY8) != 0 ? THRESHOLD8_ALL : (flags & FLAG_KEY16) != 0 ? THRESHOLD16_ALL : THRESHOLD_ALL;
    return threshold != 0 && threshold < all;
}

// The keys of elements i .. i+V-1 at resolution KB for any threshold (a convenience over KeyGen:
// threshold 0 and 2^KB give words 0 against 0 or ~0).
template <int KB, int V>
__device__ __forceinline__ GroupKeys<KB, V> group_keys(uint64_t seed, uint64_t call, uint64_t threshold,
                                                       uint64_t i) {
    if (threshold != 0 && threshold < (1ull << KB)) return KeyGen<KB>(threshold).template group<V>(seed, call, i);
    GroupKeys<KB, V> g;
#pragma unroll
    for (int j = 0; j < g.WORDS; ++j) g.w[j] = 0u;
    g.t = threshold == 0 ? 0u : ~0u;
    return g;
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


// Zeroes the mask bytes past element n - 1 up to the end of its last word (the padding of the
// last word). Called by one thread of a vector-path forward: every other byte belongs to exactly
// one element group, and the scalar path's mask was zeroed by the host.
__device__ __forceinline__ void zero_mask_padding(uint32_t* mask, uint64_t n) {
    uint8_t* bytes = reinterpret_cast<uint8_t*>(mask);
    for (uint64_t b = (n + 7) / 8; b < (n + 31) / 32 * 4; ++b) bytes[b] = 0;
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

template <typename T> struct DropoutBwdParams {
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
// Rows with rowm == 0 need no bits unless `need_all` (the mask is written). K16: the op offers
// 16-bit keying (FLAG_KEY16 decides at run time); ops without it compile no branch for it.
template <int V, int U, bool K16 = false, typename P>
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
            uint32_t b = K16 ? keep_bits_of<V>(p, i) : keep_bits<V>(p.seed, p.call, p.threshold, i);
            if (cnt < V) b &= (1u << cnt) - 1u;
            bits |= b << (u * V);
        }
    }
    return bits;
}

// Keep decisions read from the 1-bit mask: the GroupKeys interface over a thread's mask bits.
template <int V> struct MaskKeep {
    uint32_t b;
    __device__ __forceinline__ bool keep(int k) const { return (b >> k) & 1u; }
};

// One row visit of the backward: dx = keep ? T(dy * m) : +0 per element (kept: the key or mask
// bit says so and the row is live, rowm != 0), and the dbias partials (the unrounded dx, as the
// CPU adds them). 16-bit types convert a pair at once (pack2: the same bits as one at a time).
template <typename T, int V, typename K>
__device__ __forceinline__ Pack<T, V> bwd_math(const Pack<T, V>& dy, float m, bool row_live, const K& keys,
                                               float (&acc)[V], bool want_dbias) {
    Pack<T, V> out;
    if constexpr (sizeof(T) == 2 && V > 1) {
#pragma unroll
        for (int j = 0; j < V / 2; ++j) {
            const float2 d = unpack2<T>(dy.w[j]);
            const float lo = row_live & keys.keep(2 * j) ? __fmul_rn(d.x, m) : 0.f;
            const float hi = row_live & keys.keep(2 * j + 1) ? __fmul_rn(d.y, m) : 0.f;
            if (want_dbias) {
                acc[2 * j] = __fadd_rn(acc[2 * j], lo);
                acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], hi);
            }
            out.w[j] = pack2<T>(lo, hi);
        }
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float d = row_live & keys.keep(k) ? __fmul_rn(dy.get(k), m) : 0.f;
            if (want_dbias) acc[k] = __fadd_rn(acc[k], d);
            out.set_raw(k, f32_to_bits<T>(d));
        }
    }
    return out;
}

// Backward over U rows row, row + stride, ...: dx = m != 0 ? T(dy * m) : 0, and the dbias
// partial sums of this thread's lane in row order. A group whose rows are all dropped reads
// nothing and writes zeros (grouping as in fwd_rows). KB: the keying resolution (32, 16, 8), 0
// for a threshold without generator work (KeyGen<0>), or -1 to read the keep bits from p.mask. Each row's keys are generated right before its math (the
// loads of all U rows are already in flight), so one row's Philox state is live at a time.
template <typename T, int V, int U, int KB>
__device__ __forceinline__ void bwd_rows(const DropoutBwdParams<T>& p, uint64_t row, uint32_t stride,
                                         uint64_t c0, int cnt, bool active, float (&acc)[V],
                                         const float* rowm_smem, const KeyGen<KB < 0 ? 0 : KB>& kg) {
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
    // Element offsets step by stride * cols per row: one 64-bit add per row instead of a
    // multiply, and one offset live instead of a pointer per row and stream.
    const uint64_t first = row * p.cols + c0;
    const uint64_t step = (uint64_t)stride * p.cols;
    if (!live) {
        Pack<T, V> zero;
#pragma unroll
        for (int k = 0; k < V; ++k) zero.set_raw(k, f32_to_bits<T>(0.f));
        uint64_t i = first;
#pragma unroll
        for (int u = 0; u < U; ++u, i += step) {
            store_pack<T, V>(p.dx + i, zero, cnt);
#pragma unroll
            for (int k = 0; k < V; ++k)
                if (want_dbias) acc[k] = __fadd_rn(acc[k], 0.f);  // as the CPU: + 0.0 per dropped row
        }
        return;
    }
    Pack<T, V> dyv[U];
    {
        uint64_t i = first;
#pragma unroll
        for (int u = 0; u < U; ++u, i += step) dyv[u] = load_pack<T, V>(p.dy + i, cnt);
    }
    uint64_t i = first;
#pragma unroll
    for (int u = 0; u < U; ++u, i += step) {
        // As in fwd_rows: "m != 0" is "kept and rowm != 0", decided once per row (the mask may
        // hold kept bits for a row whose multiplier is 0). The keys of a row whose multiplier is
        // 0 are generated too (no branch per row).
        // rowm re-read here rather than held across the loads and the generator (registers).
        const float m = rowm_smem != nullptr ? rowm_smem[u * stride] : p.scale;
        const bool row_live = m != 0.f;
        Pack<T, V> out;
        if constexpr (KB < 0) {
            const MaskKeep<V> keys{read_bits<V>(p.mask, i)};
            out = bwd_math<T, V>(dyv[u], m, row_live, keys, acc, want_dbias);
        } else {
            const auto keys = kg.template group<V>(p.seed, p.call, p.base + i);
            out = bwd_math<T, V>(dyv[u], m, row_live, keys, acc, want_dbias);
        }
        store_pack<T, V>(p.dx + i, out, cnt);
    }
}

// The backward. blockDim.y = DBIAS_LANES when dbias partials are written (1 otherwise): the
// threads (x, y) of a block share column group x and split each slab's rows by lane
// y = (row - slab_begin) % blockDim.y, so a block covers fewer columns and the grid has more
// blocks for the same partition. Each lane sums its rows in increasing order from +0.0; the
// slab's partial is ((lane0 + lane1) + lane2) + lane3, the order backward_cpu in
// src/dropping/mod.rs reproduces. Shared by every op whose gradient is m * dy. KB as in bwd_rows;
// the shared memory belongs to the dispatcher (dropout_bwd) so the variants do not add up.
template <typename T, int V, int KB>
__device__ __forceinline__ void dropout_bwd_body(const DropoutBwdParams<T>& p, float* s_rowm,
                                                 float (*s_lane)[MAX_BLOCK / DBIAS_LANES * (16 / sizeof(T))]) {
    const bool has_rs = p.rowscale != nullptr || (p.flags & FLAG_DROP_PATH) != 0;
    const bool unroll = (p.flags & FLAG_UNROLL) != 0;
    const uint32_t lanes = blockDim.y, lane = threadIdx.y;
    const KeyGen<KB < 0 ? 0 : KB> kg(p.threshold);
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
                    bwd_rows<T, V, UNROLL, KB>(p, row, lanes, c0, cnt, active, acc, has_rs ? s_rowm + (row - r0) : nullptr, kg);
            for (; row < r1; row += lanes)
                bwd_rows<T, V, 1, KB>(p, row, lanes, c0, cnt, active, acc, has_rs ? s_rowm + (row - r0) : nullptr, kg);
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

// The backward kernel's body: the resolution (whether the mask is read, whether the generator
// runs) picked once per thread. KEYED: the op offers 16- and 8-bit keying (FLAG_KEY16 / FLAG_KEY8 in p.flags); an op
// without them compiles only the 32-bit variant and the mask reader.
template <typename T, int V, bool KEYED = false>
__device__ __forceinline__ void dropout_bwd(const DropoutBwdParams<T>& p) {
    __shared__ float s_rowm[RS_CHUNK];
    __shared__ float s_lane[DBIAS_LANES - 1][MAX_BLOCK / DBIAS_LANES * (16 / sizeof(T))];
    if (p.mask != nullptr) dropout_bwd_body<T, V, -1>(p, s_rowm, s_lane);
    else if (!generates(p.threshold, KEYED ? p.flags : 0u)) dropout_bwd_body<T, V, 0>(p, s_rowm, s_lane);
    else if (KEYED && (p.flags & FLAG_KEY8) != 0) dropout_bwd_body<T, V, 8>(p, s_rowm, s_lane);
    else if (KEYED && (p.flags & FLAG_KEY16) != 0) dropout_bwd_body<T, V, 16>(p, s_rowm, s_lane);
    else dropout_bwd_body<T, V, 32>(p, s_rowm, s_lane);
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
// The unfused baseline, the way PyTorch eager runs `dropout(x + bias)` (and an op's own extra
// kernels around it, e.g. a residual add): one kernel per
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

}  // namespace drop
}  // namespace fusedreg

// Instantiating the shared kernels under an op's stem, for one dtype (use with
// FUSEDREG_FOR_EACH_DTYPE through a two-argument wrapper). Symbols: <stem>_bwd_vec_<S>,
// <stem>_bwd_scalar_<S>, <stem>_dbias_<S> (host: gpu::BackwardKernels), and
// <stem>_unfused_{bias_add,dropout,masked_scale,col_sum}_<S> (host: unfused::UnfusedKernels).
// The backward holds UNROLL vectors and fits in 64 registers (4 blocks of 256 per SM); without
// the bound the compiler spends 90-130 registers on instruction-level parallelism we do not need.
// The struct sizes must match src/dropping/{gpu,unfused}.rs.
#define FUSEDREG_DROPOUT_CHECK_SIZES(T)                                                              \
    static_assert(sizeof(::fusedreg::drop::DropoutBwdParams<T>) == 128, "must match gpu.rs");       \
    static_assert(sizeof(::fusedreg::drop::DbiasParams<T>) == 32, "must match gpu.rs");             \
    static_assert(sizeof(::fusedreg::drop::UnfusedBiasAddParams<T>) == 56, "must match unfused.rs"); \
    static_assert(sizeof(::fusedreg::drop::UnfusedDropoutParams<T>) == 64, "must match unfused.rs"); \
    static_assert(sizeof(::fusedreg::drop::UnfusedMaskedScaleParams<T>) == 40, "must match unfused.rs"); \
    static_assert(sizeof(::fusedreg::drop::UnfusedColSumParams<T>) == 48, "must match unfused.rs");

#define FUSEDREG_DROPOUT_BWD_KERNELS(STEM, T, S, KEYED)                                                  \
    FUSEDREG_DROPOUT_CHECK_SIZES(T)                                                                  \
    extern "C" __global__ void __launch_bounds__(::fusedreg::drop::MAX_BLOCK, 4)                     \
        STEM##_bwd_vec_##S(const ::fusedreg::drop::DropoutBwdParams<T> p) {                          \
        ::fusedreg::drop::dropout_bwd<T, 16 / sizeof(T), KEYED>(p);                                \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(::fusedreg::drop::MAX_BLOCK, 4)                     \
        STEM##_bwd_scalar_##S(const ::fusedreg::drop::DropoutBwdParams<T> p) {                       \
        ::fusedreg::drop::dropout_bwd<T, 1, KEYED>(p);                                            \
    }                                                                                                \
    FUSEDREG_DROPPING_DBIAS_KERNEL(STEM, T, S)

// The dbias finishing kernel alone (<stem>_dbias_<S>, host: gpu::finish_dbias), for an op with a
// backward of its own that writes [slabs][cols] f32 partials.
#define FUSEDREG_DROPPING_DBIAS_KERNEL(STEM, T, S)                                                   \
    extern "C" __global__ void __launch_bounds__(::fusedreg::drop::MAX_BLOCK)                        \
        STEM##_dbias_##S(const ::fusedreg::drop::DbiasParams<T> p) {                                 \
        ::fusedreg::drop::dbias_finish<T>(p);                                                        \
    }

#define FUSEDREG_DROPOUT_UNFUSED_KERNELS(STEM, T, S)                                                \
    extern "C" __global__ void __launch_bounds__(::fusedreg::drop::MAX_BLOCK)                        \
        STEM##_unfused_bias_add_##S(const ::fusedreg::drop::UnfusedBiasAddParams<T> p) {             \
        if (p.vec) ::fusedreg::drop::unfused_bias_add_body<T, 16 / sizeof(T)>(p);                    \
        else ::fusedreg::drop::unfused_bias_add_body<T, 1>(p);                                       \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(::fusedreg::drop::MAX_BLOCK)                        \
        STEM##_unfused_dropout_##S(const ::fusedreg::drop::UnfusedDropoutParams<T> p) {              \
        ::fusedreg::drop::flat_loop<T, ::fusedreg::drop::UnfusedDropoutOp>(p);                       \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(::fusedreg::drop::MAX_BLOCK)                        \
        STEM##_unfused_masked_scale_##S(const ::fusedreg::drop::UnfusedMaskedScaleParams<T> p) {     \
        ::fusedreg::drop::flat_loop<T, ::fusedreg::drop::UnfusedMaskedScaleOp>(p);                   \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(::fusedreg::drop::MAX_BLOCK)                        \
        STEM##_unfused_col_sum_##S(const ::fusedreg::drop::UnfusedColSumParams<T> p) {               \
        if (p.vec) ::fusedreg::drop::unfused_col_sum_body<T, 16 / sizeof(T)>(p);                     \
        else ::fusedreg::drop::unfused_col_sum_body<T, 1>(p);                                        \
    }
