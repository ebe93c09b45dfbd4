// The register tiers of dropout_add_norm: the vector path (cols % 8 == 0, every pointer 16-byte
// aligned) for rows of at most NG groups of 8 per partial, NG in {1, 2, 4, 8} (hidden sizes up to
// 16384; the host picks the smallest tier that holds the row: src/dropout_add_norm/gpu.rs).
// Included by kernels/dropout_add_norm.cu, which defines the parameters, the flags, the pinned
// arithmetic and the tier table (FwdTier / BwdTier). These kernels compute exactly the operations
// of the generic ones (kernels/dropout_add_norm/generic.cuh) in exactly the same order, so every
// output has the same bits; what differs is where values live and which code a launch runs:
//  * Partial q of P = row_partials(cols) owns groups q + j * P (summed in increasing j, as the
//    contract says), split over SEG threads of NGT <= 2 groups each (Layout). A thread's groups
//    stay in registers for the whole row: the forward's f32(s) for the variance and the output,
//    the backward's s and w (or d_out and gamma) for its second pass. With segments the
//    sequential sum of a partial runs through them in order (row_sums).
//  * Indices are 64-bit once per row (row * cols) and 32-bit inside the row. With NG >= 2, P is
//    256 at compile time, so a thread's groups sit at constant offsets from each other.
//  * LayerNorm / RMSNorm is a template parameter (the kernel entry picks one instantiation per
//    launch); the keying resolution (32-, 16- or 8-bit fields: group_keep<KEY>) a uniform branch
//    per group; residual, bias, beta, a dropped row and p = 0 are uniform branches taken once per
//    row or group, never per element. The keep decision is a compare and a select per element.
//  * The row sums' warp totals are double-buffered in shared memory: one barrier per sum.
//  * The backward's column partials (dgamma, dbeta, dbias: per slab, a sequential sum over the
//    slab's rows) live in each thread's own conflict-free float4 slots of dynamic shared memory
//    (Partials); only the wanted arrays are accumulated.
#pragma once

namespace dropout_add_norm {

constexpr int MAX_WARPS = MAX_THREADS / 32;

// Eight consecutive elements of T as raw words (one 16-byte access for 16-bit T, two for f32).
template <typename T>
__device__ __forceinline__ Pack<T, GROUP> ld8(const T* p) {
    Pack<T, GROUP> out;
#pragma unroll
    for (int h = 0; h < (int)(GROUP * sizeof(T) / 16); ++h) {
        const uint4 raw = reinterpret_cast<const uint4*>(p)[h];
        out.w[4 * h] = raw.x, out.w[4 * h + 1] = raw.y, out.w[4 * h + 2] = raw.z, out.w[4 * h + 3] = raw.w;
    }
    return out;
}

template <typename T>
__device__ __forceinline__ void st8(T* p, const Pack<T, GROUP>& v) {
#pragma unroll
    for (int h = 0; h < (int)(GROUP * sizeof(T) / 16); ++h)
        reinterpret_cast<uint4*>(p)[h] = make_uint4(v.w[4 * h], v.w[4 * h + 1], v.w[4 * h + 2], v.w[4 * h + 3]);
}

template <typename T>
__device__ __forceinline__ Pack<T, GROUP> zero8() {
    Pack<T, GROUP> z;
#pragma unroll
    for (int h = 0; h < Pack<T, GROUP>::WORDS; ++h) z.w[h] = 0u;
    return z;
}

// The raw word of two 16-bit elements (lo, hi), each rounded to nearest even on its own: one
// paired conversion on the device, the same bits as two single ones.
template <typename S> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
#ifdef __CUDACC__
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t w;
    memcpy(&w, &v, 4);
    return w;
#else
    return f32_to_bits<__nv_bfloat16>(lo) | (f32_to_bits<__nv_bfloat16>(hi) << 16);
#endif
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
#ifdef __CUDACC__
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t w;
    memcpy(&w, &v, 4);
    return w;
#else
    return f32_to_bits<__half>(lo) | (f32_to_bits<__half>(hi) << 16);
#endif
}

// Eight f32 values rounded to T, as raw words.
template <typename T>
__device__ __forceinline__ Pack<T, GROUP> round8(const float (&f)[GROUP]) {
    Pack<T, GROUP> out;
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int k = 0; k < GROUP; ++k) out.w[k] = __float_as_uint(f[k]);
    } else {
#pragma unroll
        for (int h = 0; h < GROUP / 2; ++h) out.w[h] = pack2<T>(f[2 * h], f[2 * h + 1]);
    }
    return out;
}

// Element k: kept ? the computed value c (rounded to S) : the residual's own bits r. Raw bits
// on both sides, so a dropped element keeps even a NaN's payload.
template <typename S>
__device__ __forceinline__ Pack<S, GROUP> select8(const float (&c)[GROUP], const Pack<S, GROUP>& r,
                                                  const bool (&kept)[GROUP]) {
    const Pack<S, GROUP> cw = round8<S>(c);
    Pack<S, GROUP> out;
    if constexpr (sizeof(S) == 4) {
#pragma unroll
        for (int k = 0; k < GROUP; ++k) out.w[k] = kept[k] ? cw.w[k] : r.w[k];
    } else {
#pragma unroll
        for (int h = 0; h < GROUP / 2; ++h) {
            const uint32_t lo = kept[2 * h] ? cw.w[h] : r.w[h];
            const uint32_t hi = kept[2 * h + 1] ? cw.w[h] : r.w[h];
            out.w[h] = (lo & 0xffffu) | (hi & 0xffff0000u);
        }
    }
    return out;
}

// The keep decisions of the 8 elements at flat index i (a multiple of 8) under KEY-bit keying
// (32, 16 or 8: MaskResolution, common/dropping.cuh): the element's word, halfword or byte of
// Philox block i / 4, i / 8 or i / 16 >= t. 32-bit keys take two blocks per group, 16-bit keys one
// (halfword k = word k / 2, low half for even k), 8-bit keys half of one (the group's bytes are
// words 2 (i / 8 % 2) .. +1, low byte first; the neighbouring group evaluates the same block).
// Without generator work (gen false) every field reads 0: t = 0 keeps all (p = 0), t = 2^32 - 1
// drops all (p = 1, a dropped row, the norm-only pass). Same fields as keep_bits8 / drop::keep_bits
// (keep_bits16, keep_bits8 of common/dropping.cuh).
template <int KEY>
__device__ __forceinline__ void group_keep(uint64_t seed, uint64_t call, uint64_t i, bool gen, uint32_t t,
                                           bool (&kept)[GROUP]) {
    static_assert(KEY == 32 || KEY == 16 || KEY == 8, "KEY: 32-, 16- or 8-bit keying");
    uint32_t w[GROUP];
    if (gen) {
        if constexpr (KEY == 32) {
            const uint4 a = philox_block(seed, call, i >> 2), b = philox_block(seed, call, (i >> 2) + 1);
            w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
        } else if constexpr (KEY == 16) {
            const uint4 a = philox_block(seed, call, i >> 3);
            const uint32_t words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int k = 0; k < GROUP; ++k) w[k] = (k & 1) ? words[k >> 1] >> 16 : words[k >> 1] & 0xffffu;
        } else {
            const uint4 a = philox_block(seed, call, i >> 4);
            const uint32_t lo = (i & 8) ? a.z : a.x, hi = (i & 8) ? a.w : a.y;
#pragma unroll
            for (int k = 0; k < GROUP; ++k) w[k] = ((k < 4 ? lo : hi) >> (8 * (k & 3))) & 0xffu;
        }
    } else {
#pragma unroll
        for (int k = 0; k < GROUP; ++k) w[k] = 0u;
    }
#pragma unroll
    for (int k = 0; k < GROUP; ++k) kept[k] = w[k] >= t;
}

// The row's keying: whether the generator runs and the threshold the fields are compared with.
struct RowKeying {
    bool none;  // every element keeps the residual (p = 1, rowm == 0, or no dropout at all)
    bool gen;
    uint32_t t;
};
// p = 1 at KEY-bit keying: the threshold that drops every element.
__device__ __forceinline__ RowKeying row_keying(uint32_t flags, uint64_t threshold, float rowm, bool no_dropout) {
    const uint64_t all = flags & drop::FLAG_KEY8    ? drop::THRESHOLD8_ALL
                         : flags & drop::FLAG_KEY16 ? drop::THRESHOLD16_ALL
                                                    : THRESHOLD_ALL;
    RowKeying k;
    k.none = no_dropout || threshold >= all || rowm == 0.f;
    k.gen = !k.none && threshold != 0;
    k.t = k.none ? 0xffffffffu : (uint32_t)threshold;  // threshold 0 < 2^32 here
    return k;
}

// group_keep at the resolution of flags (FLAG_KEY16 / FLAG_KEY8): a uniform branch per group, so
// that a tier kernel holds one copy of the row code. (One instantiation of the whole row loop per
// resolution, picked at the entry, made ptxas spill in the backward tiers and the t4 / t8
// forwards: the three copies share one register allocation.)
__device__ __forceinline__ void group_keep(uint32_t flags, uint64_t seed, uint64_t call, uint64_t i, bool gen,
                                           uint32_t t, bool (&kept)[GROUP]) {
    if (flags & drop::FLAG_KEY8) group_keep<8>(seed, call, i, gen, t, kept);
    else if (flags & drop::FLAG_KEY16) group_keep<16>(seed, call, i, gen, t, kept);
    else group_keep<32>(seed, call, i, gen, t, kept);
}

// The shared buffers of K row sums at once over SEG segments (row_sums: the double-buffered warp
// totals, the chain between segments), one set per (SEG, K, USE): the instantiations of one
// kernel entry (norm, keying resolution) take the same set, as they never run in one launch, so
// a kernel's static shared memory does not grow with them. USE separates the sums that must not
// share (0 the forward's, 1 its statistics', 2 the backward's).
template <int SEG, int K> struct SumBufs {
    float sum[2][K][MAX_WARPS];
    float chain[SEG > 1 ? SEG - 1 : 1][K][MAX_THREADS];
};
template <int SEG, int K, int USE>
__device__ __forceinline__ SumBufs<SEG, K>& sum_bufs() {
    __shared__ SumBufs<SEG, K> b;
    return b;
}

// Where a thread's groups are. A tier holds NG = NGT * SEG groups of 8 per partial: thread
// (q, s), q < P the partial and s < SEG its segment (threadIdx.x = s * P + q), holds groups
// q + (s * NGT + j) * P for j < NGT. One segment (SEG = 1) is the simple case; more segments
// split a long row's partials over more threads so each keeps NGT <= 2 groups in registers
// (a row of 16384 f32 values per 256 threads would not fit the register file). P is 256 at
// compile time when NG >= 2, blockDim.x (32 ..= 256) for NG = 1.
template <int NGT, int SEG> struct Layout {
    static constexpr int NG = NGT * SEG, NGT_ = NGT;
    static constexpr int NW = NG > 1 ? MAX_WARPS : 0;  // warps per segment, 0: at run time
    uint32_t P, q, s, c0;                                // c0: the first column of local group 0
    bool valid[NGT];
    __device__ __forceinline__ explicit Layout(uint64_t cols) {
        P = NG > 1 ? (uint32_t)MAX_THREADS : blockDim.x;
        q = SEG > 1 ? threadIdx.x % P : threadIdx.x;
        s = SEG > 1 ? threadIdx.x / P : 0u;
        c0 = (q + s * NGT * P) * GROUP;
        const uint32_t groups = (uint32_t)(cols / GROUP);
#pragma unroll
        for (int j = 0; j < NGT; ++j) valid[j] = q + (s * NGT + j) * P < groups;
    }
    __device__ __forceinline__ uint32_t col(int j) const { return c0 + j * P * GROUP; }
};

// The warp sums of one row sum (row_sums' buf[k], after its barrier) added left to right.
template <int NGT, int SEG>
__device__ __forceinline__ float warp_total(const Layout<NGT, SEG>& L, const float (&b)[MAX_WARPS]) {
    constexpr int NW = Layout<NGT, SEG>::NW;
    const uint32_t nw = NW > 0 ? (uint32_t)NW : L.P >> 5;
    float t = b[0];
#pragma unroll
    for (uint32_t w = 1; w < (uint32_t)MAX_WARPS; ++w)
        if (w < nw) t = __fadd_rn(t, b[w]);
    return t;
}

// K row sums at once, in the contract's order: partial q is the sequential sum of its groups'
// terms from +0.0 (add_terms(v) adds this thread's terms to v in order); with segments, segment
// s continues from segment s - 1's running sum, handed over through shared memory (`chain`,
// SEG - 1 barriers). Then the tree a[l] += a[l + o], o = 16 .. 1 within each warp of the last
// segment, and the warp sums added left to right (as block_sums in generic.cuh). The warp
// totals go to `buf`, which the caller alternates between two buffers: the next sum writes the
// other one, and the one after that is ordered behind this sum's readers by the next sum's
// barrier, so one barrier per sum suffices (the chain slots likewise: a segment writes its slot
// again only after the reader has passed this sum's last barrier). Every thread returns the
// totals. Called by every thread of the block.
//
// KALL < K: only the first KALL totals are read back into v. The forward's statistics (K = 2,
// KALL = 0: sums that only thread 0 reads) take the tree through warp_tree2 instead, and every
// lane stores its result to lanes (no predicate): lanes[32 w + 16 k] is sum k's total of warp w
// (read with lane_total); buf is then unused.
template <int K, int KALL = K, int NGT, int SEG, typename F>
__device__ __forceinline__ void row_sums(const Layout<NGT, SEG>& L, const F& add_terms, float (&v)[K],
                                         float (&chain)[SEG > 1 ? SEG - 1 : 1][K][MAX_THREADS],
                                         float (&buf)[K][MAX_WARPS], float* lanes = nullptr) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = 0.f;
    if constexpr (SEG == 1) {
        add_terms(v);
    } else {
#pragma unroll
        for (int r = 0; r < SEG; ++r) {
            if (L.s == (uint32_t)r) {
                if (r > 0) {
#pragma unroll
                    for (int k = 0; k < K; ++k) v[k] = chain[r - 1][k][L.q];
                }
                add_terms(v);
                if (r < SEG - 1) {
#pragma unroll
                    for (int k = 0; k < K; ++k) chain[r][k][L.q] = v[k];
                }
            }
            if (r < SEG - 1) __syncthreads();
        }
    }
    const uint32_t lane = threadIdx.x & 31u, warp = (threadIdx.x >> 5) % (L.P >> 5);
    if (L.s == SEG - 1) {  // whole warps
        if constexpr (K == 2 && KALL == 0) {
            lanes[warp * 32 + lane] = warp_tree2(v);
        } else {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                for (int k = 0; k < K; ++k)
                    v[k] = __fadd_rn(v[k], __uint_as_float(__shfl_down_sync(0xffffffffu, __float_as_uint(v[k]), o)));
            }
            if (lane == 0) {
#pragma unroll
                for (int k = 0; k < K; ++k) buf[k][warp] = v[k];
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < KALL; ++k) v[k] = warp_total(L, buf[k]);
}

// sum / n, n = cols: a multiply by the exact 1/n when n is a power of two (the same correctly
// rounded quotient), a division otherwise.
struct RowScale {
    float n, inv_n;
    bool pow2;
    __device__ __forceinline__ explicit RowScale(uint64_t cols)
        : n((float)cols), inv_n(__fdiv_rn(1.f, (float)cols)), pow2((cols & (cols - 1)) == 0) {}
    __device__ __forceinline__ float of(float sum) const {
        if (pow2) return __fmul_rn(sum, inv_n);
        return __fdiv_rn(sum, n);
    }
};

__device__ __forceinline__ float rstd_of(float var, float eps) {
    return __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(var, eps)));
}

// s of one group from the residual (or norm-only input) r, x and bias: s = kept ? S(fma(t, rowm,
// r)) : r with t = x (+ bias).
template <typename T, typename S, bool BIAS>
__device__ __forceinline__ Pack<S, GROUP> combine8(const Pack<S, GROUP>& r, const Pack<T, GROUP>& x,
                                                   const Pack<T, GROUP>& b, float rowm,
                                                   const bool (&kept)[GROUP]) {
    float c[GROUP];
#pragma unroll
    for (int k = 0; k < GROUP; ++k) {
        float t = x.get(k);
        if constexpr (BIAS) t = __fadd_rn(t, b.get(k));
        c[k] = __fmaf_rn(t, rowm, r.get(k));
    }
    return select8<S>(c, r, kept);
}

// f32(s) of this thread's groups in the forward, for passes 2 and 3: f32 values, or (RAW) the
// stream's own 16-bit words, converted at each use (one instruction per element and use, four
// registers fewer per group).
template <typename S, int NGT, bool RAW> struct VStore {
    float v[NGT][GROUP];
    __device__ __forceinline__ void set(int j, const Pack<S, GROUP>& s) {
#pragma unroll
        for (int k = 0; k < GROUP; ++k) v[j][k] = s.get(k);
    }
    __device__ __forceinline__ float operator()(int j, int k) const { return v[j][k]; }
};
template <typename S, int NGT> struct VStore<S, NGT, true> {
    Pack<S, GROUP> v[NGT];
    __device__ __forceinline__ void set(int j, const Pack<S, GROUP>& s) { v[j] = s; }
    __device__ __forceinline__ float operator()(int j, int k) const { return v[j].get(k); }
};

// Pass 3 of the forward over this thread's groups: out = T((xhat * gamma (+ beta)) * layer_scale).
template <typename T, bool RMS, bool BETA, typename P, typename L_, typename V>
__device__ __forceinline__ void out8(const P& p, const L_& L, const V& v, uint64_t base,
                                     float mean, float rstd) {
#pragma unroll
    for (int j = 0; j < L_::NGT_; ++j) {
        if (!L.valid[j]) continue;
        const Pack<T, GROUP> gv = ld8(p.gamma + L.col(j));
        const Pack<T, GROUP> be = BETA ? ld8(p.beta + L.col(j)) : zero8<T>();
        float o[GROUP];
#pragma unroll
        for (int k = 0; k < GROUP; ++k) {
            const float xh = RMS ? __fmul_rn(v(j, k), rstd) : __fmul_rn(__fsub_rn(v(j, k), mean), rstd);
            const float y = BETA ? __fmaf_rn(xh, gv.get(k), be.get(k)) : __fmul_rn(xh, gv.get(k));
            o[k] = __fmul_rn(y, p.layer_scale);
        }
        st8(p.out + base + L.col(j), round8<T>(o));
        // f32 gamma and beta: one group's at a time (as pass 1's loads of an f32 stream).
        if constexpr (sizeof(T) == 4) asm volatile("" ::: "memory");
    }
}

// The statistics' warp totals (row_sums with lanes: sum k of warp w at lanes[32 w + 8 k]). One
// buffer: the norm's own sum comes between two statistics sums, and thread 0 reads this one
// before it reaches that sum's barrier, which every writer passes first.
__device__ __forceinline__ float* stat_lanes() {
    __shared__ float lanes[MAX_THREADS];
    return lanes;
}
// Sum k's block total (block_sums.cuh: lanes_total, after warp_tree2) over this layout's warps.
template <int NGT, int SEG>
__device__ __forceinline__ float lane_total(const Layout<NGT, SEG>& L, const float* lanes, int k) {
    constexpr int NW = Layout<NGT, SEG>::NW;
    return lanes_total<16>(lanes, NW > 0 ? (uint32_t)NW : L.P >> 5, k);
}

// Forward over the block's rows (grid-stride), blockDim.x = P * SEG threads. STATS: the Block
// Influence statistics too (stats.cuh; the *_stats_* entries only).
template <typename T, typename S, int NGT, int SEG, bool RMS, bool STATS = false>
__device__ __forceinline__ void fwd_rows(const FwdParams<T, S>& p) {
    auto& s_sum = sum_bufs<SEG, 1, 0>().sum;
    auto& s_chain = sum_bufs<SEG, 1, 0>().chain;
    if constexpr (STATS) {
        if (threadIdx.x == 0) stat_rows().reset();  // read and written by thread 0 only
    }
    const Layout<NGT, SEG> L(p.cols);
    const RowScale scale(p.cols);
    const bool norm_only = (p.flags & FLAG_NORM_ONLY) != 0;
    const S* src = norm_only ? p.s : p.residual;  // null: s = dropout(x + bias) alone
    int buf = 0;
    for (uint64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const uint64_t base = row * p.cols;
        const float rowm = row_multiplier(p, row);
        const RowKeying key = row_keying(p.flags, p.threshold, rowm, norm_only);

        // Pass 1: s of each group from the residual, x and bias, stored; f32(s), the rounded s
        // the backward will read, kept in registers for passes 2 and 3. A 16-bit stream issues
        // every load of the row before any arithmetic; an f32 one takes a group at a time (the
        // fence keeps the next group's loads below it: all at once would not fit 64 registers).
        constexpr bool PRELOAD = sizeof(S) == 2;
        auto load = [&](int j, Pack<S, GROUP>& sv, Pack<T, GROUP>& xv, Pack<T, GROUP>& bv) {
            const uint32_t c = L.col(j);
            if (src != nullptr) sv = ld8(src + base + c);
            else sv = zero8<S>();
            if (!key.none) {
                xv = ld8(p.x + base + c);
                if (p.bias != nullptr) bv = ld8(p.bias + c);
            }
        };
        // Segmented tiers of a 16-bit stream keep the raw words (64 registers per thread of 512
        // or 1024; t2 has 80 and keeps f32).
        VStore<S, NGT, (sizeof(S) == 2 && SEG > 1)> v;
        // STATS: each group's r·s and |r|² terms (SEG > 1: the sequential sum of a partial runs on
        // from the previous segment's, so they are kept apart), or with one segment their running
        // sums from +0.0 (the same sequential sum; two registers fewer). |s|² comes from the
        // norm's own sums (norm_ss).
        [[maybe_unused]] float st[SEG > 1 ? NGT : 1][2];
        if constexpr (STATS && SEG == 1) st[0][0] = 0.f, st[0][1] = 0.f;
        auto finish = [&](int j, Pack<S, GROUP>& sv, const Pack<T, GROUP>& xv, const Pack<T, GROUP>& bv) {
            const uint32_t c = L.col(j);
            [[maybe_unused]] Pack<S, GROUP> rin;  // STATS: the stream before the add
            if constexpr (STATS) rin = sv;
            if (!key.none) {
                bool kept[GROUP];
                group_keep(p.flags, p.seed, p.call, base + c, key.gen, key.t, kept);
                sv = p.bias != nullptr ? combine8<T, S, true>(sv, xv, bv, rowm, kept)
                                       : combine8<T, S, false>(sv, xv, xv, rowm, kept);
            }
            if (!norm_only) st8(p.s + base + c, sv);
            v.set(j, sv);
            if constexpr (STATS) {
                float gt[2];
                stat_terms([&](int k) { return rin.get(k); }, [&](int k) { return v(j, k); }, GROUP, gt);
#pragma unroll
                for (int k = 0; k < 2; ++k) {
                    // The first group's terms are the running sum itself: +0.0 + gt differs from
                    // gt only when gt is -0.0, and a zero's sign never reaches the row's integer
                    // (StatRows::add: a zero sum is a zero cosine or an uncounted row).
                    if constexpr (SEG > 1) st[j][k] = gt[k];
                    else st[0][k] = j == 0 ? gt[k] : __fadd_rn(st[0][k], gt[k]);
                }
            }
        };
        if constexpr (PRELOAD) {
            Pack<S, GROUP> sv[NGT];
            Pack<T, GROUP> xv[NGT], bv[NGT];
#pragma unroll
            for (int j = 0; j < NGT; ++j)
                if (L.valid[j]) load(j, sv[j], xv[j], bv[j]);
#pragma unroll
            for (int j = 0; j < NGT; ++j)
                if (L.valid[j]) finish(j, sv[j], xv[j], bv[j]);
        } else {
#pragma unroll
            for (int j = 0; j < NGT; ++j) {
                if (!L.valid[j]) continue;
                Pack<S, GROUP> sv;
                Pack<T, GROUP> xv, bv;
                load(j, sv, xv, bv);
                finish(j, sv, xv, bv);
                asm volatile("" ::: "memory");
            }
        }
        float acc[1];
        row_sums<1>(L, [&](float (&a)[1]) {
#pragma unroll
            for (int j = 0; j < NGT; ++j) {
                if (!L.valid[j]) continue;
#pragma unroll
                for (int k = 0; k < GROUP; ++k) a[0] = __fadd_rn(a[0], RMS ? __fmul_rn(v(j, k), v(j, k)) : v(j, k));
            }
        }, acc, s_chain, s_sum[buf]);
        buf ^= 1;

        float mean = 0.f, rstd;
        [[maybe_unused]] float sq = 0.f;  // LayerNorm: the sum of (s - mean)²
        if constexpr (RMS) {
            rstd = rstd_of(scale.of(acc[0]), p.eps);
        } else {
            // Pass 2: the variance around the mean, from the registers.
            mean = scale.of(acc[0]);
            float acc2[1];
            row_sums<1>(L, [&](float (&a)[1]) {
#pragma unroll
                for (int j = 0; j < NGT; ++j) {
                    if (!L.valid[j]) continue;
#pragma unroll
                    for (int k = 0; k < GROUP; ++k) {
                        const float d = __fsub_rn(v(j, k), mean);
                        a[0] = __fadd_rn(a[0], __fmul_rn(d, d));
                    }
                }
            }, acc2, s_chain, s_sum[buf]);
            buf ^= 1;
            sq = acc2[0];
            rstd = rstd_of(scale.of(sq), p.eps);
        }
        if constexpr (STATS) {
            // The groups' r·s and |r|² terms summed as any row sum (the sequential sum through the
            // segments, then the tree), after the norm's sums so that |s|² is at hand. The
            // buffers are this sum's own: the next row's first sum, whose barrier every thread
            // passes only after thread 0 has read them, comes before they are written again.
            float* s_lanes = stat_lanes();
            auto& s_stat = sum_bufs<SEG, 2, 1>().sum[0];
            auto& s_stat_chain = sum_bufs<SEG, 2, 1>().chain;
            float tot[2];
            row_sums<2, 0>(L, [&](float (&a)[2]) {
                if constexpr (SEG == 1) {
                    a[0] = st[0][0], a[1] = st[0][1];  // summed from +0.0 like a
                } else {
#pragma unroll
                    for (int j = 0; j < NGT; ++j) {
                        if (!L.valid[j]) continue;
#pragma unroll
                        for (int k = 0; k < 2; ++k) a[k] = __fadd_rn(a[k], st[j][k]);
                    }
                }
            }, tot, s_stat_chain, s_stat, s_lanes);
            if (threadIdx.x == 0)
                stat_rows().add(lane_total(L, s_lanes, 0), lane_total(L, s_lanes, 1), norm_ss(RMS, acc[0], mean, sq));
        }
        if (threadIdx.x == 0) {
            p.mean[row] = mean;
            p.rstd[row] = rstd;
        }

        // Pass 3: out = T((xhat * gamma + beta) * layer_scale).
        if (p.beta != nullptr) out8<T, RMS, true>(p, L, v, base, mean, rstd);
        else out8<T, RMS, false>(p, L, v, base, mean, rstd);
    }
    if constexpr (STATS) {
        if (threadIdx.x == 0) stat_rows().flush(p.stats);
    }
}

// The backward's column partials (per slab: the sequential sum over the slab's rows) of this
// thread's NGT groups, array A = 0 (dgamma), 1 (dbeta), 2 (dbias), in this thread's own float4
// slots of dynamic shared memory: slot (a, h, j) at ((a * 2 + h) * NGT + j) * blockDim.x +
// threadIdx.x for half h of group j, where the wanted arrays are numbered a = 0, 1, 2 in order
// (dgamma always; dbeta, dbias when wanted), so a warp's 16-byte accesses are conflict-free. (In
// registers they would take 48 of them per two groups and halve the blocks per SM; here they
// cost two 16-byte loads and stores per group and array.)
template <int NGT> struct Partials {
    float4* slots;  // this thread's slot (0, 0, 0)
    uint32_t stride, slot_t;
    __device__ __forceinline__ Partials(bool want_b, bool want_t) {
        stride = blockDim.x;
        slot_t = want_b ? 2u : 1u;
        slots = reinterpret_cast<float4*>(dyn_smem) + threadIdx.x;
        const uint32_t n = (1u + (want_b ? 1u : 0u) + (want_t ? 1u : 0u)) * 2u * NGT;
        for (uint32_t i = 0; i < n; ++i) slots[i * stride] = float4{0.f, 0.f, 0.f, 0.f};
    }
    template <int A> __device__ __forceinline__ float4& at(int h, int j) const {
        const uint32_t a = A == 0 ? 0u : A == 1 ? 1u : slot_t;
        return slots[((a * 2 + h) * NGT + j) * stride];
    }
    // partial[A][j][k] += d[k], k in order
    template <int A> __device__ __forceinline__ void add(int j, const float (&d)[GROUP]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float4 s = at<A>(h, j);
            s.x = __fadd_rn(s.x, d[4 * h]), s.y = __fadd_rn(s.y, d[4 * h + 1]);
            s.z = __fadd_rn(s.z, d[4 * h + 2]), s.w = __fadd_rn(s.w, d[4 * h + 3]);
            at<A>(h, j) = s;
        }
    }
    // Writes array A of group j (first column c) to partials + (A * slabs + slab) * cols.
    template <int A>
    __device__ __forceinline__ void put(int j, float* partials, uint64_t slabs, uint64_t slab, uint64_t cols,
                                        uint32_t c) const {
        float4* dst = reinterpret_cast<float4*>(partials + ((uint64_t)A * slabs + slab) * cols + c);
        dst[0] = at<A>(0, j);
        dst[1] = at<A>(1, j);
    }
};

// w = g * gamma of this thread's groups from pass A to pass B: kept as f32 (KEEP) or recomputed.
template <int NGT, bool KEEP> struct WStore {
    __device__ __forceinline__ void set(int, int, float) {}
    template <typename F> __device__ __forceinline__ float get(int j, int k, const F& recompute) const {
        return recompute(j, k);
    }
};
template <int NGT> struct WStore<NGT, true> {
    float v[NGT][GROUP];
    __device__ __forceinline__ void set(int j, int k, float w) { v[j][k] = w; }
    template <typename F> __device__ __forceinline__ float get(int j, int k, const F&) const { return v[j][k]; }
};

// Backward over one slab of rows (blockIdx.x), blockDim.x = P * SEG threads. From pass A to pass B
// a thread keeps s as loaded (xhat is recomputed from it) and, for w = d_out * layer_scale *
// gamma, either d_out and gamma as loaded (16-bit T: two elements per register) or w itself as
// f32 (f32 T: as many registers as the raw words, fewer instructions); xhat and w both as f32
// would not fit 64 registers. d_s is loaded with the rest (16-bit T) or in pass B (f32 T). With
// segments (SEG > 1) the row sums' terms are computed when the segment's turn comes (the
// sequential order runs through the segments).
template <typename T, typename S, int NGT, int SEG, bool RMS>
__device__ __forceinline__ void bwd_rows(const BwdParams<T, S>& p) {
    // KEEP_W: w kept as f32, d_out and gamma loaded per group in pass A (w replaces them), d_s
    // in pass B. An f32 T, and the f32 stream's t8 whatever T: its two groups of 16-bit d_out
    // and gamma take as many registers as their w, which saves recomputing w twice.
    constexpr bool KEEP_W = sizeof(T) == 4 || (sizeof(S) == 4 && NGT == 2);
    constexpr bool LATE_DS = KEEP_W;
    auto& s_sum = sum_bufs<SEG, 2, 2>().sum;
    auto& s_chain = sum_bufs<SEG, 2, 2>().chain;
    const Layout<NGT, SEG> L(p.cols);
    const bool want_b = (p.flags & FLAG_DBETA) != 0, want_t = (p.flags & FLAG_DBIAS) != 0;
    const uint64_t slab = blockIdx.x;
    const uint64_t row0 = slab * p.slab_rows, row1 = min(row0 + p.slab_rows, p.rows);
    const RowScale scale(p.cols);
    Partials<NGT> part(want_b, want_t);
    int buf = 0;
    for (uint64_t row = row0; row < row1; ++row) {
        const uint64_t base = row * p.cols;
        const float rowm = row_multiplier(p, row);
        const RowKeying key = row_keying(p.flags, p.threshold, rowm, false);
        const float mean = p.mean[row], rstd = p.rstd[row];

        Pack<S, GROUP> sv[NGT], dsv[NGT];
        Pack<T, GROUP> dv[NGT], gv[NGT];
#pragma unroll
        for (int j = 0; j < NGT; ++j) {
            if (!L.valid[j]) continue;
            sv[j] = ld8(p.s + base + L.col(j));
            if constexpr (!KEEP_W) {
                dv[j] = ld8(p.d_out + base + L.col(j));
                gv[j] = ld8(p.gamma + L.col(j));
            }
            if (!LATE_DS && p.d_s != nullptr) dsv[j] = ld8(p.d_s + base + L.col(j));
        }
        // xhat, g = d_out * layer_scale and w = g * gamma of element k of group j.
        auto xhat = [&](int j, int k) {
            return RMS ? __fmul_rn(sv[j].get(k), rstd) : __fmul_rn(__fsub_rn(sv[j].get(k), mean), rstd);
        };
        auto grad = [&](int j, int k) { return __fmul_rn(dv[j].get(k), p.layer_scale); };
        WStore<NGT, KEEP_W> wk;
        auto w_of = [&](int j, int k) {
            return wk.get(j, k, [&](int jj, int kk) { return __fmul_rn(grad(jj, kk), gv[jj].get(kk)); });
        };

        // Pass A: the dgamma (g * xhat) and dbeta (g) partials; the row sums of xhat * w and w
        // (one segment: in the same loop).
        float acc[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < NGT; ++j) {
            if (!L.valid[j]) continue;
            if constexpr (KEEP_W) {
                // Ordered behind the previous group's use (its w kept, its loads dead).
                if (j > 0) asm volatile("" ::: "memory");
                dv[j] = ld8(p.d_out + base + L.col(j));
                gv[j] = ld8(p.gamma + L.col(j));
            }
            float dg[GROUP], db[GROUP];
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                const float x = xhat(j, k), g = grad(j, k), w = __fmul_rn(g, gv[j].get(k));
                wk.set(j, k, w);
                if constexpr (SEG == 1) {
                    acc[0] = __fadd_rn(acc[0], __fmul_rn(x, w));
                    acc[1] = __fadd_rn(acc[1], w);
                }
                dg[k] = __fmul_rn(g, x);
                db[k] = g;
            }
            part.template add<0>(j, dg);
            if (want_b) part.template add<1>(j, db);
        }
        float sums[2];
        row_sums<2>(L, [&](float (&a)[2]) {
            if constexpr (SEG == 1) {
                a[0] = acc[0], a[1] = acc[1];  // added in pass A, from +0.0 like a
            } else {
#pragma unroll
                for (int j = 0; j < NGT; ++j) {
                    if (!L.valid[j]) continue;
#pragma unroll
                    for (int k = 0; k < GROUP; ++k) {
                        const float w = w_of(j, k);
                        a[0] = __fadd_rn(a[0], __fmul_rn(xhat(j, k), w));
                        a[1] = __fadd_rn(a[1], w);
                    }
                }
            }
        }, sums, s_chain, s_sum[buf]);
        buf ^= 1;
        const float c1 = scale.of(sums[0]);
        const float c2 = RMS ? 0.f : scale.of(sums[1]);

        // Pass B: ds = (w - u) * rstd (+ d_s), d_residual = S(ds), dx = T(m != 0 ? ds * m : 0),
        // the dbias partials (of the unrounded dx).
#pragma unroll
        for (int j = 0; j < NGT; ++j) {
            if (!L.valid[j]) continue;
            const uint32_t c = L.col(j);
            if (LATE_DS && p.d_s != nullptr) dsv[j] = ld8(p.d_s + base + c);
            bool kept[GROUP];
            group_keep(p.flags, p.seed, p.call, base + c, key.gen, key.t, kept);
            float ds[GROUP], dt[GROUP];
#pragma unroll
            for (int k = 0; k < GROUP; ++k) {
                const float x = xhat(j, k);
                const float u = RMS ? __fmul_rn(x, c1) : __fmaf_rn(x, c1, c2);
                float d = __fmul_rn(__fsub_rn(w_of(j, k), u), rstd);
                if (p.d_s != nullptr) d = __fadd_rn(d, dsv[j].get(k));
                ds[k] = d;
                dt[k] = kept[k] ? __fmul_rn(d, rowm) : 0.f;
            }
            if (p.d_residual != nullptr) st8(p.d_residual + base + c, round8<S>(ds));
            st8(p.dx + base + c, round8<T>(dt));
            if (want_t) part.template add<2>(j, dt);
        }
    }
    // The slab's partials out (this thread's columns).
#pragma unroll
    for (int j = 0; j < NGT; ++j) {
        if (!L.valid[j]) continue;
        part.template put<0>(j, p.partials, p.slabs, slab, p.cols, L.col(j));
        if (want_b) part.template put<1>(j, p.partials, p.slabs, slab, p.cols, L.col(j));
        if (want_t) part.template put<2>(j, p.partials, p.slabs, slab, p.cols, L.col(j));
    }
}

}  // namespace dropout_add_norm
