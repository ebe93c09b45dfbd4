// Differential host emulation of the cross-entropy kernels (see compare.sh): the same cases are
// built against a GPU-verified kernel revision and against a candidate, and every output hash
// must agree. Cases: every dtype and target type; vector and scalar paths (the scalar one also at
// a view offset of one element); vocabularies crossing the group (8) and slot (2048 elements)
// boundaries, and 1; gradient none / separate / in place; reductions none (with and without a
// per-row upstream), sum and mean (count kernel, multi-level sums); label smoothing 0, 0.1, 1;
// z-loss; ignored and out-of-range targets; -inf (masked) and +-1e4 logits; NaN and +inf at every
// position class ("nan" lines). Then the Math::Fast kernel ("fast" lines: the special-function
// instructions are shim.h's models) and the unfused baseline's kernels on the same inputs.
#include <cstdint>
// The count kernel's integer atomic (exact in any order) is shim.h's.
#include "harness.h"

template <class T, class TI> struct K;
#define KS(T, S, TI, TS)                                                          \
    template <> struct K<T, TI> {                                                 \
        static constexpr auto fused = cross_entropy_fused_##S##_##TS;             \
        static constexpr auto fast = cross_entropy_fused_fast_##S##_##TS;         \
        static constexpr auto nll = cross_entropy_unfused_nll_##S##_##TS;         \
        static constexpr auto bwd = cross_entropy_unfused_backward_##S##_##TS;    \
        static constexpr auto lsm = cross_entropy_unfused_log_softmax_##S;        \
        static constexpr auto count = cross_entropy_count_##TS;                   \
        static constexpr const char* name = #S "_" #TS;                          \
    };
KS(float, f32, int32_t, ti32) KS(__half, f16, int32_t, ti32) KS(__nv_bfloat16, bf16, int32_t, ti32)
KS(float, f32, int64_t, ti64) KS(__half, f16, int64_t, ti64) KS(__nv_bfloat16, bf16, int64_t, ti64)

struct Case {
    uint64_t rows, vocab, offset;
    bool vec;
    int grad;  // 0 none, 1 separate, 2 in place
    int red;   // 0 none, 1 sum, 2 mean
    bool upstream, specials;
    float alpha, lambda;
    unsigned grid;
    bool nan = false;  // rows with a NaN or +inf at the position classes (nan_positions)
};

// 16-byte aligned storage of n elements of T starting at element `offset`.
template <class T> struct Buf {
    std::vector<uint4> raw;
    uint64_t offset;
    Buf(uint64_t n, uint64_t off) : raw((n + off) * sizeof(T) / 16 + 2), offset(off) {}
    T* p() { return reinterpret_cast<T*>(raw.data()) + offset; }
};

template <class T> static float rnd_logit(std::mt19937_64& g, bool specials) {
    float f = 0.f;
    for (int k = 0; k < 4; ++k) f += uniform(g, -1.7f, 1.7f);
    if (g() % 50 == 0) f += 6.f;
    if (specials) {
        const unsigned r = g() % 61;
        if (r == 0) f = -INFINITY;
        else if (r == 1) f = 1e4f;
        else if (r == 2) f = -1e4f;
    }
    return f;
}

// The element positions of a row that the kernel treats differently: first and last of the row,
// of a 16-byte vector, of a group, of a slot's first and last group, of a warp's share of a round,
// of the unrolled block (tests/common/mod.rs: xent_positions, the same list).
static std::vector<uint64_t> nan_positions(uint64_t vocab) {
    const uint64_t groups = (vocab + GROUP - 1) / GROUP;
    std::vector<uint64_t> p{0, vocab - 1};
    auto group = [&](uint64_t g) {
        if (g < groups)
            for (uint64_t k : {0, 7, 3, 4, 1}) p.push_back(g * GROUP + k);
    };
    for (uint64_t g : {0, 1, 2, 31, 32, 33, 63, 255, 256, 257, 511, 512, 767, 1023, 1024, 1025}) group(g);
    group(groups - 1);
    for (uint64_t s : {0, 1, 31, 32, 63, 224, 254, 255})
        if (s < groups) {
            group(s);
            group(s + SLOTS * ((groups - 1 - s) / SLOTS));
        }
    for (uint64_t r : {0, 1, 3, 4, 5})
        for (uint64_t w : {0, 1, 7}) {
            group(SLOTS * r + 32 * w);
            group(SLOTS * r + 32 * w + 31);
        }
    std::vector<uint64_t> out;
    for (uint64_t i : p)
        if (i < vocab) out.push_back(i);
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
}

// The logits of a case (the same for the fused and the unfused run). NaN cases: row r holds a NaN
// (random sign and payload) or a +inf at position class r (cycling), on a background of random
// logits, all -inf, or -inf in the special element's group and in its slot's groups before it.
template <class T> static void fill_logits(const Case& c, uint64_t seed, T* x) {
    std::mt19937_64 g(seed);
    const uint64_t n = c.rows * c.vocab;
    for (uint64_t i = 0; i < n; ++i) x[i] = from_f32<T>(rnd_logit<T>(g, c.specials));
    if (!c.nan) return;
    std::mt19937_64 h(seed ^ 0x4e614eull);
    const std::vector<uint64_t> pos = nan_positions(c.vocab);
    for (uint64_t r = 0; r < c.rows; ++r) {
        const uint64_t p = pos[r % pos.size()], background = (r / pos.size() + r) % 3;
        T* row = x + r * c.vocab;
        auto slot = [](uint64_t j) { return (j / GROUP) % SLOTS; };
        for (uint64_t j = 0; j < c.vocab; ++j)
            if (background == 1 || (background == 2 && slot(j) == slot(p) && j / GROUP <= p / GROUP))
                row[j] = from_f32<T>(-INFINITY);
        uint32_t b = fusedreg::f32_to_bits<T>(INFINITY);
        if (h() % 4 != 0) {  // 3 of 4: a NaN with a random sign and payload
            const uint32_t r32 = (uint32_t)h();
            if constexpr (sizeof(T) == 4) b = 0x7f800000u | (r32 & 0x807fffffu) | 1u;
            else if constexpr (std::is_same_v<T, __half>) b = 0x7c00u | (r32 & 0x83ffu) | 1u;
            else b = 0x7f80u | (r32 & 0x807fu) | 1u;
        }
        memcpy(row + p, &b, sizeof(T));
    }
}

// Output hashes see every NaN as the device writes it (canonical): host arithmetic keeps an
// operand's payload, which would make the hash depend on the host compiler's operand order.
template <class T> static uint64_t fnv_canon(const T* v, uint64_t n) {
    std::vector<T> c(v, v + n);
    for (auto& e : c)
        if (to_f32(e) != to_f32(e)) {
            const uint32_t b = sizeof(T) == 4 ? 0x7fffffffu : 0x7fffu;
            memcpy(&e, &b, sizeof(T));
        }
    return fnv(c.data(), n * sizeof(T));
}

// Sums n losses the way the host does: levels of CHUNK-row blocks until one value is left.
static float host_reduce(float* rows, uint64_t n, unsigned long long* nv, bool mean) {
    std::vector<float> cur(rows, rows + n), out;
    for (;;) {
        const uint64_t blocks = (n + CHUNK - 1) / CHUNK;
        out.assign(blocks, -5.f);
        SumParams s{};
        s.in = (uint64_t)cur.data(); s.out = (uint64_t)out.data(); s.n_valid = (uint64_t)nv; s.n = n;
        s.flags = blocks == 1 && mean ? FLAG_MEAN : 0u;
        launch(cross_entropy_sum, dim3{(unsigned)blocks, 1, 1}, dim3{SLOTS, 1, 1}, s);
        if (blocks == 1) return out[0];
        cur = out;
        n = blocks;
    }
}

template <class T, class TI> static void run(const Case& c, uint64_t seed) {
    std::mt19937_64 g(seed);
    const uint64_t n = c.rows * c.vocab;
    Buf<T> x(n, c.offset), gr(n, c.offset);
    for (uint64_t i = 0; i < n; ++i) (void)rnd_logit<T>(g, c.specials);  // the targets' stream
    fill_logits(c, seed, x.p());
    std::vector<TI> t(c.rows);
    for (auto& v : t) {
        const unsigned r = g() % 10;
        v = r == 0 ? (TI)-100 : r == 1 && c.specials ? (TI)(g() & 1 ? c.vocab : -7) : (TI)(g() % c.vocab);
    }
    std::vector<float> up(c.rows);
    for (auto& u : up) u = uniform(g, -2.f, 3.f);
    for (uint64_t i = 0; i < n; ++i) memset(gr.p() + i, 0xEE, sizeof(T));
    std::vector<float> loss_rows(c.rows, -3.f);
    unsigned long long nv = 0;
    unsigned flag = 0;

    const TI* tp = t.data();
    if (c.red == 2) {
        CountParams q{};
        q.targets = (uint64_t)tp; q.n_valid = (uint64_t)&nv; q.rows = c.rows; q.vocab = c.vocab; q.ignore_index = -100;
        launch(K<T, TI>::count, dim3{2, 1, 1}, dim3{SLOTS, 1, 1}, q);
    }
    FusedParams p{};
    p.logits = (uint64_t)x.p();
    p.grad = c.grad == 2 ? (uint64_t)x.p() : (uint64_t)gr.p();
    p.targets = (uint64_t)tp;
    p.loss_rows = (uint64_t)loss_rows.data();
    p.upstream = (uint64_t)up.data();
    p.n_valid = (uint64_t)&nv;
    p.flag = (uint64_t)&flag;
    p.rows = c.rows; p.vocab = c.vocab; p.ignore_index = -100;
    p.conf = 1.f - c.alpha; p.alpha = c.alpha; p.eps = c.alpha / (float)c.vocab; p.vocab_f = (float)c.vocab;
    p.lambda = c.lambda; p.lam2 = 2.f * c.lambda;
    p.flags = (c.grad ? FLAG_GRAD : 0u) | (c.vec ? FLAG_VEC : 0u) | (c.red == 2 ? FLAG_MEAN : 0u) |
              (c.red == 0 && c.upstream ? FLAG_UPSTREAM : 0u);
    launch(K<T, TI>::fused, dim3{c.grid, 1, 1}, dim3{SLOTS, 1, 1}, p);
    float reduced = -1.f;
    if (c.red) reduced = host_reduce(loss_rows.data(), c.rows, &nv, c.red == 2);
    const T* gout = c.grad == 2 ? x.p() : gr.p();
    const uint64_t hg = c.grad ? fnv_canon(gout, n) : 0;

    // Math::Fast on fresh logits of the same seed, same options: its own output line ("fast ...").
    Buf<T> xf(n, c.offset), gf(n, c.offset);
    fill_logits(c, seed, xf.p());
    for (uint64_t i = 0; i < n; ++i) memset(gf.p() + i, 0xEE, sizeof(T));
    std::vector<float> floss(c.rows, -3.f);
    unsigned ffl = 0;
    FusedParams pf = p;
    pf.logits = (uint64_t)xf.p();
    pf.grad = c.grad == 2 ? (uint64_t)xf.p() : (uint64_t)gf.p();
    pf.loss_rows = (uint64_t)floss.data();
    pf.flag = (uint64_t)&ffl;
    launch(K<T, TI>::fast, dim3{c.grid, 1, 1}, dim3{SLOTS, 1, 1}, pf);
    float freduced = -1.f;
    if (c.red) freduced = host_reduce(floss.data(), c.rows, &nv, c.red == 2);
    const T* gfo = c.grad == 2 ? xf.p() : gf.p();

    // The unfused baseline on fresh logits of the same seed (the fused one may have overwritten x).
    Buf<T> x2(n, 0), lp(n, 0), ug(n, 0);
    fill_logits(c, seed, x2.p());
    std::vector<float> lse(c.rows, -4.f), urows(c.rows, -3.f);
    UnfusedParams u{};
    u.x = (uint64_t)x2.p(); u.y = (uint64_t)lp.p(); u.targets = (uint64_t)tp; u.lse = (uint64_t)lse.data();
    u.loss_rows = (uint64_t)urows.data(); u.upstream = p.upstream; u.n_valid = p.n_valid;
    u.rows = c.rows; u.vocab = c.vocab; u.ignore_index = -100;
    u.conf = p.conf; u.alpha = p.alpha; u.eps = p.eps; u.vocab_f = p.vocab_f; u.lambda = p.lambda; u.lam2 = p.lam2;
    u.flags = p.flags & (FLAG_MEAN | FLAG_UPSTREAM);
    launch(K<T, TI>::lsm, dim3{c.grid, 1, 1}, dim3{SLOTS, 1, 1}, u);
    UnfusedParams un = u; un.x = (uint64_t)lp.p(); un.y = 0;
    launch(K<T, TI>::nll, dim3{c.grid, 1, 1}, dim3{SLOTS, 1, 1}, un);
    UnfusedParams ub = u; ub.x = (uint64_t)lp.p(); ub.y = (uint64_t)ug.p();
    launch(K<T, TI>::bwd, dim3{c.grid, 1, 1}, dim3{SLOTS, 1, 1}, ub);

    // XE_DUMP=DIR: every case's inputs and outputs as text, for a check against the Rust CPU
    // reference (the host's expf/logf are the ones Rust's f32::exp/ln call).
    if (const char* dir = getenv("XE_DUMP")) {
        static std::atomic<int> file_no{0};
        const std::string path = std::string(dir) + "/" + std::to_string(seed) + ".txt";
        FILE* f = fopen(path.c_str(), "w");
        auto bits = [](const T& v) { uint32_t b = 0; memcpy(&b, &v, sizeof(T)); return b; };
        fprintf(f, "%d %d %llu %llu %d %d %d %08x %08x\n", (int)sizeof(T) == 4 ? 0 : std::is_same_v<T, __half> ? 1 : 2,
                (int)sizeof(TI), (unsigned long long)c.rows, (unsigned long long)c.vocab, c.grad, c.red, (int)c.upstream,
                __float_as_uint(c.alpha), __float_as_uint(c.lambda));
        for (uint64_t i = 0; i < n; ++i) fprintf(f, "%x ", bits(x2.p()[i]));
        fprintf(f, "\n");
        for (auto v : t) fprintf(f, "%lld ", (long long)v);
        fprintf(f, "\n");
        for (auto v : up) fprintf(f, "%x ", __float_as_uint(v));
        fprintf(f, "\n");
        for (auto v : loss_rows) fprintf(f, "%x ", __float_as_uint(v));
        fprintf(f, "\n%x %llu %u\n", __float_as_uint(reduced), nv, flag);
        for (uint64_t i = 0; i < n && c.grad; ++i) fprintf(f, "%x ", bits(gout[i]));
        fprintf(f, "\n");
        for (uint64_t i = 0; i < n; ++i) fprintf(f, "%x ", bits(ug.p()[i]));
        fprintf(f, "\n");
        for (auto v : urows) fprintf(f, "%x ", __float_as_uint(v));
        fprintf(f, "\n");
        // Math::Fast: loss rows; reduced, flag; gradient.
        for (auto v : floss) fprintf(f, "%x ", __float_as_uint(v));
        fprintf(f, "\n%x %u\n", __float_as_uint(freduced), ffl);
        for (uint64_t i = 0; i < n && c.grad; ++i) fprintf(f, "%x ", bits(gfo[i]));
        fprintf(f, "\n");
        fclose(f);
        file_no++;
    }
    printf("%s%s %llux%llu off %llu vec %d grad %d red %d up %d sp %d a %g l %g grid %u | loss %016llx red %08x nv %llu flag %u grad %016llx | lsm %016llx lse %016llx nll %016llx ug %016llx\n",
           c.nan ? "nan " : "", K<T, TI>::name, (unsigned long long)c.rows, (unsigned long long)c.vocab,
           (unsigned long long)c.offset, c.vec, c.grad, c.red, c.upstream, c.specials, c.alpha, c.lambda, c.grid,
           (unsigned long long)fnv_canon(loss_rows.data(), loss_rows.size()), __float_as_uint(emu_canon(reduced)), nv,
           flag, (unsigned long long)hg, (unsigned long long)fnv_canon(lp.p(), n),
           (unsigned long long)fnv_canon(lse.data(), lse.size()), (unsigned long long)fnv_canon(urows.data(), urows.size()),
           (unsigned long long)fnv_canon(ug.p(), n));
    printf("fast %s%s %llux%llu off %llu vec %d grad %d red %d up %d sp %d a %g l %g grid %u | loss %016llx red %08x flag %u grad %016llx\n",
           c.nan ? "nan " : "", K<T, TI>::name, (unsigned long long)c.rows, (unsigned long long)c.vocab,
           (unsigned long long)c.offset, c.vec, c.grad, c.red, c.upstream, c.specials, c.alpha, c.lambda, c.grid,
           (unsigned long long)fnv_canon(floss.data(), floss.size()), __float_as_uint(emu_canon(freduced)), ffl,
           (unsigned long long)(c.grad ? fnv_canon(gfo, n) : 0));
    fflush(stdout);
}

int main(int argc, char** argv) {
    const int part = argc > 1 ? atoi(argv[1]) : 0, parts = argc > 2 ? atoi(argv[2]) : 1;
    struct Shape { uint64_t rows, vocab; };
    // Vocabularies: 1; below, at and above a group; a multiple of 4 but not 8 (f32's vector path
    // with a partial last group); around one slot round (2048); several rounds plus a tail.
    const Shape shapes[] = {{3, 1}, {4, 7}, {5, 8}, {3, 9}, {4, 36}, {3, 2048}, {2, 2056}, {2, 5003}};
    const float alphas[] = {0.f, 0.1f, 1.f};
    int idx = 0;
    std::mt19937_64 g(777);
    for (int dt = 0; dt < 6; ++dt)
        for (const Shape& s : shapes)
            for (int variant = 0; variant < 3; ++variant) {
                Case c{};
                c.rows = s.rows; c.vocab = s.vocab;
                const size_t size = dt % 3 == 0 ? 4 : 2;
                c.vec = (s.vocab * size) % 16 == 0 && variant != 2;
                c.offset = !c.vec && variant == 2 ? 1 : 0;
                c.grad = (int)(g() % 3);
                c.red = (int)(g() % 3);
                c.upstream = g() & 1;
                c.specials = variant != 0;
                c.alpha = alphas[g() % 3];
                c.lambda = g() % 2 ? 1e-4f : 0.f;
                c.grid = 1 + (unsigned)(g() % 3);
                const uint64_t seed = g();
                if (idx++ % parts != part) continue;
                switch (dt) {
                    case 0: run<float, int32_t>(c, seed); break;
                    case 1: run<__half, int32_t>(c, seed); break;
                    case 2: run<__nv_bfloat16, int32_t>(c, seed); break;
                    case 3: run<float, int64_t>(c, seed); break;
                    case 4: run<__half, int64_t>(c, seed); break;
                    default: run<__nv_bfloat16, int64_t>(c, seed); break;
                }
            }
    // NaN and +inf at every position class (issue #25): one row per position (cycling through
    // the backgrounds), every dtype, vector and scalar paths, with and without smoothing/z-loss.
    {
        std::mt19937_64 h(4242);
        const Shape nshapes[] = {{3, 1}, {7, 9}, {40, 36}, {60, 2056}, {70, 5003}, {80, 10260}};
        for (int dt = 0; dt < 6; ++dt)
            for (const Shape& s : nshapes)
                for (int variant = 0; variant < 2; ++variant) {
                    Case c{};
                    c.nan = true;
                    c.rows = s.rows; c.vocab = s.vocab;
                    const size_t size = dt % 3 == 0 ? 4 : 2;
                    c.vec = (s.vocab * size) % 16 == 0 && variant == 0;
                    c.offset = !c.vec && variant == 1 ? 1 : 0;
                    c.grad = 1 + (int)(h() % 2);
                    c.red = (int)(h() % 3);
                    c.upstream = h() & 1;
                    c.alpha = alphas[h() % 3];
                    c.lambda = h() % 2 ? 1e-4f : 0.f;
                    c.grid = 1 + (unsigned)(h() % 3);
                    const uint64_t seed = h();
                    if (idx++ % parts != part) continue;
                    switch (dt) {
                        case 0: run<float, int32_t>(c, seed); break;
                        case 1: run<__half, int32_t>(c, seed); break;
                        case 2: run<__nv_bfloat16, int32_t>(c, seed); break;
                        case 3: run<float, int64_t>(c, seed); break;
                        case 4: run<__half, int64_t>(c, seed); break;
                        default: run<__nv_bfloat16, int64_t>(c, seed); break;
                    }
                }
    }
    // The loss sum across several chunk levels (more rows than one block sums).
    if (part == 0) {
        std::mt19937_64 h(99);
        for (uint64_t rows : {1ull, 4095ull, 4096ull, 4097ull, 9000ull}) {
            std::vector<float> v(rows);
            for (auto& f : v) f = uniform(h, 0.f, 12.f);
            unsigned long long nv = rows - rows / 3;
            const float s = host_reduce(v.data(), rows, &nv, false), m = host_reduce(v.data(), rows, &nv, true);
            printf("sum %llu | %08x %08x\n", (unsigned long long)rows, __float_as_uint(s), __float_as_uint(m));
        }
    }
    return 0;
}
