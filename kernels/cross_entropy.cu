// Fused cross-entropy with label smoothing and z-loss (loss + logits gradient in one kernel), its
// reductions, and the unfused baseline.
//
//   loss = (1-a)(lse - x[t]) + a(lse - mean(x)) + lam lse^2
//   grad = scale * (softmax(x)(1 + 2 lam lse) - (1-a) onehot(t) - a/V)
//
// The arithmetic is pinned so that src/cross_entropy/cpu.rs reproduces it bit for bit (see the
// module docs of src/cross_entropy/mod.rs). The one rule that makes that possible: the order of
// every row reduction is a function of V only. A row is cut into groups of GROUP consecutive
// elements; group g belongs to slot g % SLOTS, every slot folds its groups in increasing g, and
// the SLOTS slot states are combined by a halving tree in shared memory. A block has exactly SLOTS
// threads and thread i is slot i, so neither the vector width, the alignment, the unrolling nor
// the grid changes a bit. exp and log are the shared bit-exact implementations (fr_exp, fr_log).
//
// Launch shape: one block of SLOTS threads per row, blocks looping over rows (grid-stride), so a
// row of any length (V up to 2^24) is a loop over the row. Pass 1 (online softmax: running max,
// sum of exp, sum of x) reads the row; the epilogue (thread 0) forms lse and the row's loss;
// pass 2 reads the row again and writes the gradient (in place or into a separate buffer): 3 s
// bytes per element. Every index and size is 64-bit. Every thread of a block runs the same row
// loop and the same barriers; whether a row is ignored is decided per block (one target).
//
// Determinism: the per-row losses go to a buffer; the sum over rows is a separate kernel
// (cross_entropy_sum) with a fixed chunking and tree, no float atomics. The count of valid rows
// for the mean is an integer (integer atomics are exact).
#include <type_traits>

#include "common/dtype.cuh"
#include "common/fastmath.cuh"
#include "common/fmath.cuh"

using namespace fusedreg;

namespace cross_entropy {

constexpr int SLOTS = 256;          // threads per block = partial states per row (pinned)
constexpr int GROUP = 8;            // consecutive elements per group (pinned)
constexpr int UNROLL = 4;           // groups whose loads are issued before their math
constexpr uint64_t CHUNK = SLOTS * 16;  // rows per block of the loss sum (pinned)

constexpr uint32_t FLAG_GRAD = 1u;      // write the gradient
constexpr uint32_t FLAG_VEC = 2u;       // rows start 16-byte aligned (logits and grad)
constexpr uint32_t FLAG_MEAN = 4u;      // scale = 1 / n_valid (sum kernel: divide by n_valid)
constexpr uint32_t FLAG_UPSTREAM = 8u;  // scale = upstream[row]

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

// Must match FusedParams in src/cross_entropy/gpu.rs (size asserted on both sides).
struct FusedParams {
    uint64_t logits;     // const T*: rows * vocab
    uint64_t grad;       // T*: rows * vocab (== logits in place); unused without FLAG_GRAD
    uint64_t targets;    // const TI*: rows
    uint64_t loss_rows;  // float*: rows (0 for ignored rows)
    uint64_t upstream;   // const float*: rows (FLAG_UPSTREAM)
    uint64_t n_valid;    // const unsigned long long* (FLAG_MEAN)
    uint64_t flag;       // unsigned*: OR'ed with 1 for a target outside [0, V); may be 0
    uint64_t rows, vocab;
    int64_t ignore_index;
    float conf, alpha, eps, vocab_f, lambda, lam2;
    uint32_t flags, pad;
};
static_assert(sizeof(FusedParams) == 112, "FusedParams layout");

struct CountParams {
    uint64_t targets, n_valid, rows, vocab;
    int64_t ignore_index;
};
static_assert(sizeof(CountParams) == 40, "CountParams layout");

struct SumParams {
    uint64_t in, out, n_valid, n;
    uint32_t flags, pad;
};
static_assert(sizeof(SumParams) == 40, "SumParams layout");

struct State {
    float m, s, sx;
};

// ---- Math::Exact: fmath's exp and log, bit for bit with cpu.rs (Exact) ----

// Folds one group of cnt consecutive logits into a slot state (cpu.rs: Exact::absorb).
__device__ __forceinline__ void absorb_exact(State& st, const float* x, int cnt) {
    // NaN-sticky group maximum, and a NaN maximum replaces the running one: a NaN anywhere in
    // the row reaches s (s * exp(m - NaN)) even while m is -inf and the sum below is skipped.
    float gm = x[0];
    for (int k = 1; k < cnt; ++k) gm = (x[k] > gm || x[k] != x[k]) ? x[k] : gm;
    if (gm > st.m || gm != gm) {
        st.s = st.s * fr_exp(st.m - gm);  // exp(-inf) = 0 for the first finite group
        st.m = gm;
    }
    if (st.m != neg_inf())  // all -inf so far: nothing to add, and -inf - -inf would be NaN
        for (int k = 0; k < cnt; ++k) st.s = st.s + fr_exp(x[k] - st.m);
    for (int k = 0; k < cnt; ++k) st.sx = st.sx + x[k];
}

// cpu.rs: Exact::combine.
__device__ __forceinline__ State combine_exact(State a, State b) {
    const float m = b.m > a.m ? b.m : a.m;
    const float sa = a.m == m ? a.s : a.s * fr_exp(a.m - m);
    const float sb = b.m == m ? b.s : b.s * fr_exp(b.m - m);
    return State{m, sa + sb, a.sx + b.sx};
}

// ---- Math::Fast: the same groups, slots and tree; exp and log on the special-function unit ----
//
// The state's m is the running maximum times log2(e) (the product rounded to f32), floored at
// -FLT_MAX: m - m' and fma(x, L2E, -m) then never meet -inf - (-inf). s is the sum of
// 2^(x log2(e) - m): one FFMA and one MUFU.EX2 per element. Branch-free: every element's term is
// added (a NaN logit makes its own term NaN, a +inf logit inf - inf), and the rescale 2^(m - m')
// is exactly 1 when the maximum did not move. A group's 8 terms are summed pairwise, then added
// to s. cpu.rs: fast::Fast is the same arithmetic.
constexpr float L2E = 1.44269502162933349609375f;  // log2(e) rounded to f32
constexpr float LN2 = 0.693147182464599609375f;    // ln(2) rounded to f32
constexpr float BIG = 3.40282346638528859812e38f;  // FLT_MAX

// x holds GROUP values; a partial group's missing ones are -inf (a term of 0, no maximum).
__device__ __forceinline__ void absorb_fast(State& st, const float* x, int cnt) {
    float gm = x[0];
#pragma unroll
    for (int k = 1; k < GROUP; ++k) gm = fmaxf(gm, x[k]);
    const float mn = fmaxf(st.m, fmaxf(gm * L2E, -BIG));
    float e[GROUP];
#pragma unroll
    for (int k = 0; k < GROUP; ++k) e[k] = fast::ex2(__fmaf_rn(x[k], L2E, -mn));
    const float t = ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
    st.s = st.s * fast::ex2(st.m - mn) + t;
#pragma unroll
    for (int k = 0; k < GROUP; ++k)
        if (k < cnt) st.sx = st.sx + x[k];
    st.m = mn;
}

__device__ __forceinline__ State combine_fast(State a, State b) {
    const float m = fmaxf(a.m, b.m);
    return State{m, a.s * fast::ex2(a.m - m) + b.s * fast::ex2(b.m - m), a.sx + b.sx};
}

template <bool FAST> __device__ __forceinline__ State init_state() {
    return State{FAST ? -BIG : neg_inf(), 0.f, 0.f};
}
template <bool FAST> __device__ __forceinline__ void absorb(State& st, const float* x, int cnt) {
    if constexpr (FAST) absorb_fast(st, x, cnt);
    else absorb_exact(st, x, cnt);
}
template <bool FAST> __device__ __forceinline__ State combine(State a, State b) {
    if constexpr (FAST) return combine_fast(a, b);
    else return combine_exact(a, b);
}

// GROUP consecutive elements (cnt of them in a partial group) widened to f32. VEC: p is 16-byte
// aligned and the group is whole.
template <bool VEC, typename T>
__device__ __forceinline__ void load_group(const T* p, float* x, int cnt) {
    if constexpr (VEC) {
        // 16-byte loads kept as 32-bit words; a bf16 pair widens by one shift and one mask
        // (through a bf16 array the compiler spent a PRMT and a shift on the upper one).
        constexpr int N = 16 / sizeof(T);
#pragma unroll
        for (int q = 0; q < GROUP / N; ++q) {
            const uint4 v = *reinterpret_cast<const uint4*>(p + q * N);
            const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if constexpr (sizeof(T) == 4) {
                    x[q * N + k] = __uint_as_float(w[k]);
                } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
                    x[q * N + 2 * k] = __uint_as_float(w[k] << 16);
                    x[q * N + 2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
                } else {
                    x[q * N + 2 * k] = bits_to_f32<T>(w[k] & 0xffffu);
                    x[q * N + 2 * k + 1] = bits_to_f32<T>(w[k] >> 16);
                }
            }
        }
    } else {  // unrolled and predicated: x stays in registers
#pragma unroll
        for (int k = 0; k < GROUP; ++k)
            if (k < cnt) x[k] = to_f32(p[k]);
    }
}

// Four 32-bit words to a 16-byte aligned address as one st.global.v4: a uint4 assignment came
// out of NVVM as four 32-bit stores (STG.E) in these kernels.
__device__ __forceinline__ void store_words4(void* p, const uint32_t* w) {
#if defined(__CUDA_ARCH__)
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
#else
    memcpy(p, w, 16);
#endif
}

template <bool VEC, typename T>
__device__ __forceinline__ void store_group(T* p, const float* g, int cnt) {
    if constexpr (VEC) {
        // 32-bit words (F2FP pair conversions for 16-bit T), one 16-byte store each.
        constexpr int N = 16 / sizeof(T);
#pragma unroll
        for (int q = 0; q < GROUP / N; ++q) {
            uint32_t w[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if constexpr (sizeof(T) == 4) w[k] = f32_to_bits<T>(g[q * N + k]);
                else w[k] = f32_to_bits<T>(g[q * N + 2 * k]) | (f32_to_bits<T>(g[q * N + 2 * k + 1]) << 16);
            }
            store_words4(p + q * N, w);
        }
    } else {
#pragma unroll
        for (int k = 0; k < GROUP; ++k)
            if (k < cnt) p[k] = from_f32<T>(g[k]);
    }
}

// Pass 1 of one thread over its slot's groups of a row: full groups (vector or scalar loads,
// UNROLL groups' loads in flight), then the partial last group if it is this slot's. V < 2^24:
// 32-bit offsets inside the row.
template <bool FAST, bool VEC, typename T>
__device__ __forceinline__ State pass1(const T* row, uint32_t V) {
    const uint32_t full = V / GROUP;
    State st = init_state<FAST>();
    uint32_t g = threadIdx.x;
    // A moving pointer: the UNROLL loads are at immediate offsets from it.
    const T* q = row + g * GROUP;
    for (; g + (UNROLL - 1) * SLOTS < full; g += UNROLL * SLOTS, q += UNROLL * SLOTS * GROUP) {
        float x[UNROLL][GROUP];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) load_group<VEC>(q + u * SLOTS * GROUP, x[u], GROUP);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) absorb<FAST>(st, x[u], GROUP);
    }
#pragma unroll 1  // at most UNROLL - 1 groups: unrolling them buys nothing
    for (; g < full; g += SLOTS) {
        float x[GROUP];
        load_group<VEC>(row + g * GROUP, x, GROUP);
        absorb<FAST>(st, x, GROUP);
    }
    if (g == full && full * GROUP < V) {  // the partial last group is slot full % SLOTS's last
        float x[GROUP];
        const int cnt = (int)(V - full * GROUP);
#pragma unroll
        for (int k = 0; k < GROUP; ++k) x[k] = neg_inf();
        load_group<false>(row + g * GROUP, x, cnt);
        absorb<FAST>(st, x, cnt);
    }
    return st;
}

// The halving tree over the SLOTS slot states (state i takes state i + h, h = 128, ..., 1; cpu.rs:
// tree): the levels h >= 32 through shared memory, the last five in warp 0 by shuffles (lane i
// receives lane i + h: the same pairs; lanes >= h compute values nobody reads). The row state
// is returned to thread 0.
template <bool FAST>
__device__ __forceinline__ State block_tree(State st, float* sm, float* ss, float* sx) {
    const unsigned tid = threadIdx.x;
    sm[tid] = st.m;
    ss[tid] = st.s;
    sx[tid] = st.sx;
    __syncthreads();
    for (unsigned h = SLOTS / 2; h >= 32; h >>= 1) {
        if (tid < h) {
            const State c = combine<FAST>(State{sm[tid], ss[tid], sx[tid]}, State{sm[tid + h], ss[tid + h], sx[tid + h]});
            sm[tid] = c.m;
            ss[tid] = c.s;
            sx[tid] = c.sx;
        }
        __syncthreads();
    }
    State c = st;
    if (tid < 32) {
        c = State{sm[tid], ss[tid], sx[tid]};
#pragma unroll
        for (int h = 16; h >= 1; h >>= 1) {
            const State o{__shfl_down_sync(0xffffffffu, c.m, h), __shfl_down_sync(0xffffffffu, c.s, h),
                          __shfl_down_sync(0xffffffffu, c.sx, h)};
            c = combine<FAST>(c, o);
        }
    }
    return c;
}

// The gradient of one group (cpu.rs: Exact's grad_elem).
__device__ __forceinline__ void grad_group(const FusedParams& p, float* x, int cnt, uint32_t j0,
                                           uint32_t t, float lse, float zf, float scale) {
    for (int k = 0; k < cnt; ++k) {
        float d = fr_exp(x[k] - lse) * zf - p.eps;
        if (j0 + (uint32_t)k == t) d = d - p.conf;
        x[k] = d * scale;
    }
}

// Fast: g = fma(2^(x log2(e) - lse log2(e)), a, nb) with a = zf scale, nb = -(eps scale); the
// target's value is stored after the loop by the thread that owns it (cpu.rs: FastRow::elem).
__device__ __forceinline__ float grad_fast(float x, float nl, float a, float nb) {
    return __fmaf_rn(fast::ex2(__fmaf_rn(x, L2E, nl)), a, nb);
}
__device__ __forceinline__ void grad_group_fast(float* x, float nl, float a, float nb) {
#pragma unroll
    for (int k = 0; k < GROUP; ++k) x[k] = grad_fast(x[k], nl, a, nb);
}

// Pass 2: the gradient of the row. sh: Exact {lse, zf, scale}; Fast {-lse log2(e), a, nb, g_t}.
// The thread walks its groups backwards (the partial last group first, then its full groups from
// the last down): the end of the row, which pass 1 read last, is the part most likely still in L2
// when pass 2 starts. Every element's gradient depends on its own logit only, so the order
// changes no bit.
template <bool FAST, bool VEC, typename T>
__device__ __forceinline__ void pass2(const FusedParams& p, const T* row, T* out, uint32_t V, uint32_t t,
                                      const float* sh) {
    const uint32_t full = V / GROUP, tid = threadIdx.x;
    const float c0 = sh[0], c1 = sh[1], c2 = sh[2];
    auto grad = [&](float* x, int cnt, uint32_t j0) {
        if constexpr (FAST) grad_group_fast(x, c0, c1, c2);
        else grad_group(p, x, cnt, j0, t, c0, c1, c2);
    };
    if (full * GROUP < V && full % SLOTS == tid) {  // the partial last group is slot full % SLOTS's
        float x[GROUP];
        const int cnt = (int)(V - full * GROUP);
#pragma unroll
        for (int k = 0; k < GROUP; ++k) x[k] = 0.f;
        load_group<false>(row + full * GROUP, x, cnt);
        grad(x, cnt, full * GROUP);
        store_group<false>(out + full * GROUP, x, cnt);
    }
    // This thread's full groups are g = tid + SLOTS k, k < n; from k = n - 1 down.
    uint32_t n = full > tid ? (full - 1 - tid) / SLOTS + 1 : 0;
    uint32_t g = n > 0 ? tid + SLOTS * (n - 1) : tid;
    const T* q = row + g * GROUP;
    T* o = out + g * GROUP;
    for (; n >= UNROLL; n -= UNROLL, g -= UNROLL * SLOTS, q -= UNROLL * SLOTS * GROUP, o -= UNROLL * SLOTS * GROUP) {
        float x[UNROLL][GROUP];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) load_group<VEC>(q - u * SLOTS * GROUP, x[u], GROUP);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            grad(x[u], GROUP, (g - u * SLOTS) * GROUP);
            store_group<VEC>(o - u * SLOTS * GROUP, x[u], GROUP);
        }
    }
#pragma unroll 1  // at most UNROLL - 1 groups
    for (; n > 0; --n, g -= SLOTS, q -= SLOTS * GROUP, o -= SLOTS * GROUP) {
        float x[GROUP];
        load_group<VEC>(q, x, GROUP);
        grad(x, GROUP, g * GROUP);
        store_group<VEC>(o, x, GROUP);
    }
    // Fast: the target's gradient over the value just stored (the same thread stored it, so this
    // store lands last).
    if constexpr (FAST)
        if (tid == (t / GROUP) % SLOTS) out[t] = from_f32<T>(sh[3]);
}

// An ignored (or out-of-range) row's gradient: zeros, nothing read.
template <bool VEC, typename T>
__device__ __forceinline__ void zero_row(T* out, uint32_t V) {
    const uint32_t full = V / GROUP;
    float z[GROUP];
    for (int k = 0; k < GROUP; ++k) z[k] = 0.f;
    uint32_t g = threadIdx.x;
    for (; g < full; g += SLOTS) store_group<VEC>(out + g * GROUP, z, GROUP);
    if (g == full && full * GROUP < V) store_group<false>(out + g * GROUP, z, (int)(V - full * GROUP));
}

template <bool FAST, bool VEC, typename T, typename TI>
__device__ void fused(const FusedParams& p) {
    __shared__ float sh_m[SLOTS], sh_s[SLOTS], sh_x[SLOTS];
    __shared__ float sh_row[4];
    const T* logits = reinterpret_cast<const T*>(p.logits);
    T* grad = reinterpret_cast<T*>(p.grad);
    const TI* targets = reinterpret_cast<const TI*>(p.targets);
    float* loss_rows = reinterpret_cast<float*>(p.loss_rows);
    const uint32_t V = (uint32_t)p.vocab;  // <= 2^24 (Config::new)
    const unsigned tid = threadIdx.x;
    const bool want_grad = (p.flags & FLAG_GRAD) != 0;

    for (uint64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* row = logits + r * p.vocab;
        T* out = grad + r * p.vocab;
        const int64_t t = (int64_t)targets[r];  // every thread reads the same target: uniform
        const bool ignored = t == p.ignore_index;
        const bool valid = !ignored && t >= 0 && (uint64_t)t < p.vocab;
        if (!valid) {
            if (want_grad) zero_row<VEC>(out, V);
            if (tid == 0) {
                loss_rows[r] = 0.f;
                if (!ignored && p.flag) atomicOr(reinterpret_cast<unsigned*>(p.flag), 1u);
            }
            continue;  // no barrier in this branch, and it is taken by the whole block
        }

        const State st = block_tree<FAST>(pass1<FAST, VEC>(row, V), sh_m, sh_s, sh_x);
        if (tid == 0) {
            // Read x[t] before the barrier below: in place, pass 2 overwrites it.
            const float xt = to_f32(row[t]);
            float lse, nl = 0.f;
            if constexpr (FAST) {
                const float lse2 = st.m + fast::lg2(st.s);  // log2 of the sum of 2^(x log2 e)
                lse = lse2 * LN2;
                nl = -lse2;
            } else {
                lse = st.m + fr_log(st.s);
            }
            float loss = 0.f;
            if (p.conf != 0.f) loss = p.conf * (lse - xt);
            if (p.alpha != 0.f) loss = loss + p.alpha * (lse - st.sx / p.vocab_f);
            if (p.lambda != 0.f) loss = loss + p.lambda * (lse * lse);
            loss_rows[r] = loss;
            float scale = 1.f;
            if (p.flags & FLAG_MEAN)
                scale = 1.f / (float)*reinterpret_cast<const unsigned long long*>(p.n_valid);
            else if (p.flags & FLAG_UPSTREAM)
                scale = reinterpret_cast<const float*>(p.upstream)[r];
            const float zf = p.lambda != 0.f ? 1.f + p.lam2 * lse : 1.f;
            if constexpr (FAST) {
                const float a = zf * scale, nb = -(p.eps * scale);
                sh_row[0] = nl;
                sh_row[1] = a;
                sh_row[2] = nb;
                sh_row[3] = grad_fast(xt, nl, a, nb) - p.conf * scale;
            } else {
                sh_row[0] = lse;
                sh_row[1] = zf;
                sh_row[2] = scale;
            }
        }
        __syncthreads();
        if (want_grad) pass2<FAST, VEC>(p, row, out, V, (uint32_t)t, sh_row);
        // No barrier needed here: the next row's first shared write (sh_m) is followed by a
        // barrier before anyone reads it, and sh_row is rewritten only after that barrier.
    }
}

template <typename TI>
__device__ void count(const CountParams& p) {
    __shared__ unsigned long long part[SLOTS];
    const TI* targets = reinterpret_cast<const TI*>(p.targets);
    unsigned long long c = 0;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.rows; i += stride) {
        const int64_t t = (int64_t)targets[i];
        c += (t != p.ignore_index && t >= 0 && (uint64_t)t < p.vocab) ? 1 : 0;
    }
    part[threadIdx.x] = c;
    __syncthreads();
    for (unsigned h = SLOTS / 2; h >= 1; h >>= 1) {
        if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
        __syncthreads();
    }
    // Integer addition: exact in any order, so this atomic keeps the result deterministic.
    if (threadIdx.x == 0 && part[0]) atomicAdd(reinterpret_cast<unsigned long long*>(p.n_valid), part[0]);
}

// Block b sums in[b*CHUNK, min(n, (b+1)*CHUNK)): SLOTS strided sequential partial sums, then the
// halving tree (cpu.rs: ordered_sum). With FLAG_MEAN (the last pass, one block) it divides by
// n_valid, giving 0 when no row is valid.
__device__ void sum(const SumParams& p) {
    __shared__ float part[SLOTS];
    const float* in = reinterpret_cast<const float*>(p.in);
    const uint64_t base = (uint64_t)blockIdx.x * CHUNK;
    const uint64_t end = base + CHUNK < p.n ? base + CHUNK : p.n;
    float acc = 0.f;
    for (uint64_t i = base + threadIdx.x; i < end; i += SLOTS) acc = acc + in[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned h = SLOTS / 2; h >= 1; h >>= 1) {
        if (threadIdx.x < h) part[threadIdx.x] = part[threadIdx.x] + part[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float v = part[0];
        if (p.flags & FLAG_MEAN) {
            const unsigned long long nv = *reinterpret_cast<const unsigned long long*>(p.n_valid);
            v = nv == 0 ? 0.f : v / (float)nv;
        }
        reinterpret_cast<float*>(p.out)[blockIdx.x] = v;
    }
}

// ---- The unfused baseline: the eager way, each step through device memory in T. ----

// Must match UnfusedParams in src/cross_entropy/unfused.rs.
struct UnfusedParams {
    uint64_t x;          // const T*: logits (log-softmax) / log-probabilities (nll, backward)
    uint64_t y;          // T*: log-probabilities (log-softmax) / gradient (backward)
    uint64_t targets;    // const TI*
    uint64_t lse;        // float*: rows (written by log-softmax, read by nll and backward)
    uint64_t loss_rows;  // float*: rows (nll)
    uint64_t upstream;   // const float* (FLAG_UPSTREAM)
    uint64_t n_valid;    // const unsigned long long* (FLAG_MEAN)
    uint64_t rows, vocab;
    int64_t ignore_index;
    float conf, alpha, eps, vocab_f, lambda, lam2;
    uint32_t flags, pad;
};
static_assert(sizeof(UnfusedParams) == 112, "UnfusedParams layout");

// The slot tree over shared memory for a (m, s, sx) state; returns the row state to every thread.
__device__ __forceinline__ State block_state(State st, float* sm, float* ss, float* sx) {
    const unsigned tid = threadIdx.x;
    sm[tid] = st.m;
    ss[tid] = st.s;
    sx[tid] = st.sx;
    __syncthreads();
    for (unsigned h = SLOTS / 2; h >= 1; h >>= 1) {
        if (tid < h) {
            const State c = combine_exact(State{sm[tid], ss[tid], sx[tid]}, State{sm[tid + h], ss[tid + h], sx[tid + h]});
            sm[tid] = c.m;
            ss[tid] = c.s;
            sx[tid] = c.sx;
        }
        __syncthreads();
    }
    const State r{sm[0], ss[0], sx[0]};
    __syncthreads();  // everyone has read slot 0 before the next row writes it
    return r;
}

// y = T(x - lse) per row, lse[row] = m + log(s) (the pinned row state; sx unused).
template <typename T>
__device__ void unfused_log_softmax(const UnfusedParams& p) {
    __shared__ float sm[SLOTS], ss[SLOTS], sx[SLOTS];
    const T* x = reinterpret_cast<const T*>(p.x);
    T* y = reinterpret_cast<T*>(p.y);
    const uint64_t V = p.vocab;
    for (uint64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* row = x + r * V;
        const State st = block_state(pass1<false, false>(row, (uint32_t)V), sm, ss, sx);
        const float lse = st.m + fr_log(st.s);
        for (uint64_t j = threadIdx.x; j < V; j += SLOTS) y[r * V + j] = from_f32<T>(to_f32(row[j]) - lse);
        if (threadIdx.x == 0) reinterpret_cast<float*>(p.lse)[r] = lse;
    }
}

// Gather and smoothing sum over the log-probabilities: loss = conf * -lp[t] + alpha * -(sum lp)/V
// + lam lse^2; the sum of lp in the pinned slot order (the sx of the row state).
template <typename T, typename TI>
__device__ void unfused_nll(const UnfusedParams& p) {
    __shared__ float sm[SLOTS], ss[SLOTS], sx[SLOTS];
    const T* lp = reinterpret_cast<const T*>(p.x);
    const TI* targets = reinterpret_cast<const TI*>(p.targets);
    const uint64_t V = p.vocab;
    for (uint64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const int64_t t = (int64_t)targets[r];
        const bool valid = t != p.ignore_index && t >= 0 && (uint64_t)t < V;
        if (!valid) {
            if (threadIdx.x == 0) reinterpret_cast<float*>(p.loss_rows)[r] = 0.f;
            continue;
        }
        // Only the sum of x is used; pass1 also forms the softmax state, as an eager sum would not.
        State st{neg_inf(), 0.f, 0.f};
        {
            const T* row = lp + r * V;
            const uint64_t full = V / GROUP;
            uint64_t g = threadIdx.x;
            for (; g < full; g += SLOTS) {
                float v[GROUP];
                load_group<false>(row + g * GROUP, v, GROUP);
                for (int k = 0; k < GROUP; ++k) st.sx = st.sx + v[k];
            }
            if (g == full && full * GROUP < V) {
                float v[GROUP];
                const int cnt = (int)(V - full * GROUP);
                load_group<false>(row + g * GROUP, v, cnt);
                for (int k = 0; k < cnt; ++k) st.sx = st.sx + v[k];
            }
        }
        const State rs = block_state(st, sm, ss, sx);
        if (threadIdx.x == 0) {
            const float lse = reinterpret_cast<const float*>(p.lse)[r];
            const float lpt = to_f32(lp[r * V + (uint64_t)t]);
            float loss = 0.f;
            if (p.conf != 0.f) loss = p.conf * (0.f - lpt);
            if (p.alpha != 0.f) loss = loss + p.alpha * (0.f - rs.sx / p.vocab_f);
            if (p.lambda != 0.f) loss = loss + p.lambda * (lse * lse);
            reinterpret_cast<float*>(p.loss_rows)[r] = loss;
        }
    }
}

// The separate backward: grad = T((exp(lp) * zf - eps - conf [j == t]) * scale), zeros for
// ignored rows.
template <typename T, typename TI>
__device__ void unfused_backward(const UnfusedParams& p) {
    const T* lp = reinterpret_cast<const T*>(p.x);
    T* g = reinterpret_cast<T*>(p.y);
    const TI* targets = reinterpret_cast<const TI*>(p.targets);
    const uint64_t V = p.vocab;
    for (uint64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const int64_t t = (int64_t)targets[r];
        const bool valid = t != p.ignore_index && t >= 0 && (uint64_t)t < V;
        if (!valid) {
            for (uint64_t j = threadIdx.x; j < V; j += SLOTS) g[r * V + j] = from_f32<T>(0.f);
            continue;
        }
        const float lse = reinterpret_cast<const float*>(p.lse)[r];
        const float zf = p.lambda != 0.f ? 1.f + p.lam2 * lse : 1.f;
        float scale = 1.f;
        if (p.flags & FLAG_MEAN)
            scale = 1.f / (float)*reinterpret_cast<const unsigned long long*>(p.n_valid);
        else if (p.flags & FLAG_UPSTREAM)
            scale = reinterpret_cast<const float*>(p.upstream)[r];
        for (uint64_t j = threadIdx.x; j < V; j += SLOTS) {
            float d = fr_exp(to_f32(lp[r * V + j])) * zf - p.eps;
            if (j == (uint64_t)t) d = d - p.conf;
            g[r * V + j] = from_f32<T>(d * scale);
        }
    }
}

}  // namespace cross_entropy

using namespace cross_entropy;

#define XE_BOUNDS __launch_bounds__(SLOTS)

// Math::Fast: small enough for 3 blocks of SLOTS threads per SM (80 registers).
#define XE_FAST_BOUNDS __launch_bounds__(SLOTS, 4)

#define XE_KERNELS_TI(T, S, TI, TS)                                                                \
    extern "C" __global__ void XE_BOUNDS cross_entropy_fused_##S##_##TS(FusedParams p) {           \
        if (p.flags & FLAG_VEC) fused<false, true, T, TI>(p);                                       \
        else fused<false, false, T, TI>(p);                                                         \
    }                                                                                               \
    extern "C" __global__ void XE_FAST_BOUNDS cross_entropy_fused_fast_##S##_##TS(FusedParams p) { \
        if (p.flags & FLAG_VEC) fused<true, true, T, TI>(p);                                        \
        else fused<true, false, T, TI>(p);                                                          \
    }                                                                                               \
    extern "C" __global__ void XE_BOUNDS cross_entropy_unfused_nll_##S##_##TS(UnfusedParams p) {   \
        unfused_nll<T, TI>(p);                                                                      \
    }                                                                                               \
    extern "C" __global__ void XE_BOUNDS cross_entropy_unfused_backward_##S##_##TS(UnfusedParams p) { \
        unfused_backward<T, TI>(p);                                                                 \
    }

#define XE_KERNELS(T, S)                                                                           \
    XE_KERNELS_TI(T, S, int32_t, ti32)                                                             \
    XE_KERNELS_TI(T, S, int64_t, ti64)                                                             \
    extern "C" __global__ void XE_BOUNDS cross_entropy_unfused_log_softmax_##S(UnfusedParams p) {  \
        unfused_log_softmax<T>(p);                                                                  \
    }

FUSEDREG_FOR_EACH_DTYPE(XE_KERNELS)

extern "C" __global__ void XE_BOUNDS cross_entropy_count_ti32(CountParams p) { count<int32_t>(p); }
extern "C" __global__ void XE_BOUNDS cross_entropy_count_ti64(CountParams p) { count<int64_t>(p); }
extern "C" __global__ void XE_BOUNDS cross_entropy_sum(SumParams p) { sum(p); }
