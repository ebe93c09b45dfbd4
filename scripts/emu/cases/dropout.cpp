// Differential host emulation of the dropout kernels (see compare.sh): random data with
// infinities and NaNs; every dtype; vector and scalar paths; unroll, bias, mask, dbias lanes, row
// scale given or drawn per row or per sample; 32-, 16- and 8-bit keying with thresholds 0, all and
// between; no residual, a residual, a residual in place; flat offsets. The forward, the backward
// (regenerated and from the mask, with the dbias partials and the finishing sum) and the unfused
// byte-mask dropout / masked scale / residual add; one line of hashes per case.
//
// Three case lists, each with its own random sequence so that adding one moves no other line:
//   plain_cases     no residual (the lines of the former dropout.cpp, GPU-verified at 8b4c2de)
//   residual_cases  a residual, 32-bit keying (the former dropout_residual.cpp, same revision)
//   residual16_cases a residual under 16-bit keying (new with the merge: "k16 1" in the line)
//   key8_cases      8-bit keying with and without a residual ("k8 1" in the line)
//   stats_cases     the statistics forward (dropout_stats.inc; "stats" lines)
//   stats_vec_cases its vector entry on rows of multiples of 8 ("statsvec" lines)
// A residual line keeps the former dropout_residual format (no k16 field unless 16-bit, no u).
#include "harness.h"

template <class T> struct K;
#define KS(T, S)                                                     \
    template <> struct K<T> {                                        \
        static constexpr auto fv = dropout_fwd_vec_##S;              \
        static constexpr auto fs = dropout_fwd_scalar_##S;           \
        static constexpr auto frv = dropout_fwd_res_vec_##S;         \
        static constexpr auto frs = dropout_fwd_res_scalar_##S;      \
        static constexpr auto bv = dropout_bwd_vec_##S;              \
        static constexpr auto bs = dropout_bwd_scalar_##S;           \
        static constexpr auto db = dropout_dbias_##S;                \
        static constexpr auto ud = dropout_unfused_dropout_##S;      \
        static constexpr auto um = dropout_unfused_masked_scale_##S; \
        static constexpr auto ua = dropout_unfused_add_##S;          \
        static constexpr const char* name = #S;                      \
    };
KS(float, f32) KS(__half, f16) KS(__nv_bfloat16, bf16)

struct Case {
    uint64_t rows, cols, base;
    bool vec, unroll, bias, mask, dbias, key16, key8;
    bool residual, in_place;
    int rs;  // 0 none, 1 given, 2 drop path (rows_per_sample 1), 3 drop path per sample (3 rows)
    uint64_t threshold, path_threshold, slab;
    unsigned block;
};

template <class T> static void run(const Case& c, uint64_t seed) {
    constexpr int VV = 16 / sizeof(T);
    const uint64_t n = c.rows * c.cols;
    std::mt19937_64 g(seed);
    std::vector<uint8_t> x, r, b, dy;
    fill_bits<T>(x, n, g, true);
    if (c.residual) fill_bits<T>(r, n, g, true);
    fill_bits<T>(b, c.cols, g, false);
    fill_bits<T>(dy, n, g, true);
    std::vector<float> rsv(c.rows);
    for (auto& f : rsv) {
        const unsigned k = g() % 13;
        f = k == 0 ? 0.f : k == 1 ? -1.5f : k == 2 && c.rs == 1 ? NAN : uniform(g, 0.5f, 2.f);
    }
    const size_t words = (n + 31) / 32;
    std::vector<uint8_t> y = c.in_place ? r : std::vector<uint8_t>(n * sizeof(T), 0xEE);
    std::vector<uint32_t> mask(words + 1, c.vec ? 0xEFEFEFEFu : 0u);
    std::vector<float> rso(c.rows, -7.f);
    // The scale from the applied p (any f32 works: the kernels take it as given).
    const double all = c.key8 ? 256.0 : c.key16 ? 65536.0 : 4294967296.0;
    const float scale = (double)c.threshold >= all ? 0.f : (float)(all / (all - (double)c.threshold));
    const float path_scale = c.path_threshold >= (1ull << 32) ? 0.f : (float)(4294967296.0 / (4294967296.0 - (double)c.path_threshold));

    dropout::FwdParams<T> p{};
    p.x = (const T*)x.data();
    p.bias = c.bias ? (const T*)b.data() : nullptr;
    p.residual = c.residual ? (const T*)(c.in_place ? y.data() : r.data()) : nullptr;
    p.y = (T*)y.data();
    p.rowscale = c.rs == 1 ? rsv.data() : nullptr;
    p.rowscale_out = c.rs >= 2 ? rso.data() : nullptr;
    p.mask = c.mask ? mask.data() : nullptr;
    p.rows = c.rows; p.cols = c.cols; p.slab_rows = c.slab;
    p.seed = seed * 0x9E3779B97F4A7C15ull; p.call = seed ^ 0xABCDEF0123ull; p.threshold = c.threshold;
    p.path_call = 77 + seed; p.path_threshold = c.rs >= 2 ? c.path_threshold : 0; p.base = c.base;
    p.scale = scale; p.path_scale = c.rs >= 2 ? path_scale : 0.f;
    p.flags = (c.rs >= 2 ? 1u : 0u) | (c.unroll ? 2u : 0u) | (c.in_place ? 4u : 0u) | (c.key16 ? 8u : 0u) |
              (c.key8 ? 16u : 0u);
    p.rows_per_sample = c.rs == 3 ? 3 : 1;
    const uint64_t per = c.vec ? VV : 1;
    const uint64_t tiles = ((c.cols + per - 1) / per + c.block - 1) / c.block;
    const unsigned slabs = (unsigned)((c.rows + c.slab - 1) / c.slab);
    const auto fwd = c.residual ? (c.vec ? K<T>::frv : K<T>::frs) : (c.vec ? K<T>::fv : K<T>::fs);
    launch(fwd, dim3{(unsigned)std::min<uint64_t>(tiles, 3), slabs, 1}, dim3{c.block, 1, 1}, p);

    // Backward: regenerated, and from the mask when there is one; dbias finished when asked.
    uint64_t hb[2] = {0, 0}, hp[2] = {0, 0}, hd[2] = {0, 0};
    for (int from_mask = 0; from_mask < 1 + (c.mask ? 1 : 0); ++from_mask) {
        std::vector<uint8_t> dx(n * sizeof(T), 0xDD);
        const unsigned lanes = c.dbias ? 4 : 1, bx = c.dbias ? c.block / 4 / 32 * 32 : c.block;
        std::vector<float> part(c.dbias ? (size_t)slabs * c.cols : 1, -9.f);
        DropoutBwdParams<T> q{};
        q.dy = (const T*)dy.data(); q.dx = (T*)dx.data(); q.rowscale = p.rowscale;
        q.mask = from_mask ? mask.data() : nullptr; q.partials = c.dbias ? part.data() : nullptr;
        q.rows = c.rows; q.cols = c.cols; q.slab_rows = c.slab; q.seed = p.seed; q.call = p.call;
        q.threshold = p.threshold; q.path_call = p.path_call; q.path_threshold = p.path_threshold; q.base = c.base;
        q.scale = scale; q.path_scale = p.path_scale; q.flags = p.flags & 27u; q.rows_per_sample = p.rows_per_sample;
        const uint64_t btiles = ((c.cols + per - 1) / per + bx - 1) / bx;
        launch(c.vec ? K<T>::bv : K<T>::bs, dim3{(unsigned)std::min<uint64_t>(btiles, 3), slabs, 1}, dim3{bx, lanes, 1}, q);
        hb[from_mask] = fnv(dx.data(), dx.size());
        hp[from_mask] = fnv(part.data(), part.size() * 4);
        if (c.dbias) {
            std::vector<uint8_t> dbias(c.cols * sizeof(T), 0xCC);
            DbiasParams<T> d{};
            d.partials = part.data(); d.dbias = (T*)dbias.data(); d.cols = c.cols; d.slabs = slabs;
            launch(K<T>::db, dim3{(unsigned)std::min<uint64_t>((c.cols + 31) / 32, 2), 1, 1}, dim3{256, 1, 1}, d);
            hd[from_mask] = fnv(dbias.data(), dbias.size());
        }
    }

    const auto u64 = [](uint64_t v) { return (unsigned long long)v; };
    if (c.residual) {
        // The former dropout_residual line; "k16 1" and the dbias / unfused add hashes only in
        // the lines new with the merge (16-bit keying).
        std::string extra;
        if (c.key16 || c.key8) {
            // The unfused residual add of x and dy (flat, vector or scalar).
            std::vector<uint8_t> ua(n * sizeof(T), 0xA5);
            dropout::UnfusedAddParams<T> a{};
            a.a = (const T*)x.data(); a.b = (const T*)dy.data(); a.out = (T*)ua.data(); a.n = n; a.vec = c.vec ? 1u : 0u;
            launch(K<T>::ua, dim3{2, 1, 1}, dim3{64, 1, 1}, a);
            char buf[128];
            snprintf(buf, sizeof buf, " db %016llx %016llx ua %016llx", u64(hd[0]), u64(hd[1]), u64(fnv(ua.data(), ua.size())));
            extra = buf;
        }
        printf("%s %llux%llu base %llu vec %d unroll %d bias %d mask %d inpl %d %sdbias %d rs %d thr %llu pthr %llu slab %llu block %u | y %016llx m %016llx rs %016llx dx %016llx %016llx p %016llx %016llx%s\n",
               K<T>::name, u64(c.rows), u64(c.cols), u64(c.base), c.vec, c.unroll, c.bias, c.mask, c.in_place,
               c.key8 ? "k8 1 " : c.key16 ? "k16 1 " : "", c.dbias, c.rs, u64(c.threshold), u64(c.path_threshold), u64(c.slab), c.block,
               u64(fnv(y.data(), y.size())), u64(fnv(mask.data(), mask.size() * 4)), u64(fnv(rso.data(), rso.size() * 4)),
               u64(hb[0]), u64(hb[1]), u64(hp[0]), u64(hp[1]), extra.c_str());
        fflush(stdout);
        return;
    }

    // The unfused byte-mask dropout of x, then its masked scale of dy (flat, vector or scalar).
    std::vector<uint8_t> ud(n * sizeof(T), 0xAB), um(n * sizeof(T), 0xBA), bytes(n + 8, 0x5A);
    UnfusedDropoutParams<T> u{};
    u.t = (const T*)x.data(); u.d = (T*)ud.data(); u.mask = bytes.data(); u.n = n;
    u.seed = p.seed; u.call = p.call; u.threshold = c.key16 || c.key8 ? 0 : p.threshold; u.scale = scale; u.vec = c.vec ? 1u : 0u;
    launch(K<T>::ud, dim3{2, 1, 1}, dim3{64, 1, 1}, u);
    UnfusedMaskedScaleParams<T> m{};
    m.dy = (const T*)dy.data(); m.mask = bytes.data(); m.dx = (T*)um.data(); m.n = n; m.scale = scale;
    m.vec = c.vec ? 1u : 0u;
    launch(K<T>::um, dim3{2, 1, 1}, dim3{64, 1, 1}, m);

    printf("%s %llux%llu base %llu vec %d unroll %d bias %d mask %d dbias %d k16 %d %srs %d thr %llu pthr %llu slab %llu block %u | y %016llx m %016llx rs %016llx dx %016llx %016llx p %016llx %016llx db %016llx %016llx u %016llx %016llx %016llx\n",
           K<T>::name, u64(c.rows), u64(c.cols), u64(c.base), c.vec, c.unroll,
           c.bias, c.mask, c.dbias, c.key16, c.key8 ? "k8 1 " : "", c.rs, u64(c.threshold), u64(c.path_threshold),
           u64(c.slab), c.block, u64(fnv(y.data(), y.size())),
           u64(fnv(mask.data(), mask.size() * 4)), u64(fnv(rso.data(), rso.size() * 4)),
           u64(hb[0]), u64(hb[1]), u64(hp[0]), u64(hp[1]), u64(hd[0]), u64(hd[1]),
           u64(fnv(ud.data(), ud.size())), u64(fnv(bytes.data(), bytes.size())), u64(fnv(um.data(), um.size())));
    fflush(stdout);
}

static void run_any(int dt, const Case& c, uint64_t seed) {
    if (dt == 0) run<float>(c, seed);
    else if (dt == 1) run<__half>(c, seed);
    else run<__nv_bfloat16>(c, seed);
}

static const uint64_t thresholds[] = {0, 1ull << 32, 429496730ull, 2147483648ull, 1, 0xFFFFFFFFull};
static const uint64_t thresholds16[] = {0, 1ull << 16, 6554, 32768, 1, 0xFFFF};
static const uint64_t thresholds8[] = {0, 1ull << 8, 26, 128, 1, 0xFF};
static const uint64_t pthr[] = {1288490189ull, 1ull << 32, 0};
struct Shape { uint64_t rows, cols; };
// Row-major shapes: cols a multiple of 8 (every dtype's vector path) or odd (scalar only).
static const Shape shapes[] = {{1, 4104}, {1, 999}, {7, 64}, {13, 40}, {33, 24}, {5, 264}, {19, 17}, {2, 3}};

// Every list draws its options from its own generator in a fixed order (the order of the
// former case files: changing it moves golden lines).
static void plain_cases(int& idx, int part, int parts) {
    std::mt19937_64 g(54321);
    for (int dt = 0; dt < 3; ++dt)
        for (const Shape& s : shapes)
            for (int v = 0; v < 2; ++v)
                for (int ti = 0; ti < 6; ++ti)
                    for (int variant = 0; variant < (dt == 0 ? 2 : 1); ++variant) {
                        Case c{};
                        c.rows = s.rows; c.cols = s.cols;
                        c.vec = v == 1;
                        if (c.vec && s.cols % 8) continue;  // keep the vector cases whole groups
                        c.key16 = g() % 3 == 0;  // 16-bit keying (the unfused kernels stay 32-bit)
                        c.threshold = c.key16 ? thresholds16[ti] : thresholds[ti];
                        c.unroll = g() & 1; c.bias = s.rows > 1 && (g() & 1); c.mask = g() % 3 != 0;
                        c.dbias = s.rows > 1 && (g() & 1);
                        c.rs = s.rows > 1 ? (int)(g() % 4) : 0;
                        if (c.rs == 3 && s.rows % 3) c.rs = 2;
                        c.path_threshold = pthr[g() % 3];
                        c.slab = 1 + g() % std::max<uint64_t>(1, s.rows);
                        if (c.dbias && c.slab < 4) c.slab = std::min<uint64_t>(s.rows, 4);
                        c.block = c.dbias ? 256 : (g() & 1 ? 64 : 128);
                        c.base = s.rows == 1 && !c.rs && !c.bias ? (c.vec ? 8192 * (g() % 5) : g() % 1000) : 0;
                        const uint64_t seed = g();
                        if (idx++ % parts == part) run_any(dt, c, seed);
                    }
}

// key16: false for the former dropout_residual list (seed 12345), true for the new one.
static void residual_cases(bool key16, int& idx, int part, int parts) {
    std::mt19937_64 g(key16 ? 161616 : 12345);
    for (int dt = 0; dt < 3; ++dt)
        for (const Shape& s : shapes)
            for (int v = 0; v < 2; ++v)
                for (int ti = 0; ti < 6; ++ti)
                    for (int variant = 0; variant < (key16 ? 1 : 3); ++variant) {
                        Case c{};
                        c.rows = s.rows; c.cols = s.cols;
                        c.vec = v == 1;
                        if (c.vec && s.cols % 8) continue;  // keep the vector cases whole groups
                        c.residual = true; c.key16 = key16;
                        c.threshold = key16 ? thresholds16[ti] : thresholds[ti];
                        c.unroll = g() & 1; c.bias = s.rows > 1 && (g() & 1); c.mask = g() % 3 != 0;
                        c.in_place = g() % 4 == 0; c.dbias = s.rows > 1 && (g() & 1);
                        c.rs = s.rows > 1 ? (int)(g() % 4) : 0;
                        if (c.rs == 3 && s.rows % 3) c.rs = 2;
                        c.path_threshold = pthr[g() % 3];
                        c.slab = 1 + g() % std::max<uint64_t>(1, s.rows);
                        if (c.dbias && c.slab < 4) c.slab = std::min<uint64_t>(s.rows, 4);
                        c.block = c.dbias ? 256 : (g() & 1 ? 64 : 128);
                        c.base = s.rows == 1 && !c.rs && !c.bias ? (c.vec ? 8192 * (g() % 5) : g() % 1000) : 0;
                        const uint64_t seed = g();
                        if (idx++ % parts == part) run_any(dt, c, seed);
                    }
}

// 8-bit keying (new with Bits8 in the dropout kernels: "k8 1" in the line), with and without a
// residual (in place too), its own random sequence.
static void key8_cases(int& idx, int part, int parts) {
    std::mt19937_64 g(888888);
    for (int dt = 0; dt < 3; ++dt)
        for (const Shape& s : shapes)
            for (int v = 0; v < 2; ++v)
                for (int ti = 0; ti < 6; ++ti)
                    for (int residual = 0; residual < 2; ++residual) {
                        Case c{};
                        c.rows = s.rows; c.cols = s.cols;
                        c.vec = v == 1;
                        if (c.vec && s.cols % 8) continue;  // keep the vector cases whole groups
                        c.residual = residual == 1; c.key8 = true;
                        c.threshold = thresholds8[ti];
                        c.unroll = g() & 1; c.bias = s.rows > 1 && (g() & 1); c.mask = g() % 3 != 0;
                        c.in_place = c.residual && g() % 4 == 0; c.dbias = s.rows > 1 && (g() & 1);
                        c.rs = s.rows > 1 ? (int)(g() % 4) : 0;
                        if (c.rs == 3 && s.rows % 3) c.rs = 2;
                        c.path_threshold = pthr[g() % 3];
                        c.slab = 1 + g() % std::max<uint64_t>(1, s.rows);
                        if (c.dbias && c.slab < 4) c.slab = std::min<uint64_t>(s.rows, 4);
                        c.block = c.dbias ? 256 : (g() & 1 ? 64 : 128);
                        c.base = s.rows == 1 && !c.rs && !c.bias ? (c.vec ? 8192 * (g() % 5) : g() % 1000) : 0;
                        const uint64_t seed = g();
                        if (idx++ % parts == part) run_any(dt, c, seed);
                    }
}

#include "dropout_stats.inc"

int main(int argc, char** argv) {
    const int part = argc > 1 ? atoi(argv[1]) : 0, parts = argc > 2 ? atoi(argv[2]) : 1;
    int idx = 0;
    // DO_ONLY_STATS: the statistics cases alone (scripts/emu/redundancy_vs_cpu.sh).
    if (!getenv("DO_ONLY_STATS")) {
        plain_cases(idx, part, parts);
        residual_cases(false, idx, part, parts);
        residual_cases(true, idx, part, parts);
        key8_cases(idx, part, parts);
    }
    stats_cases(idx, part, parts);
    stats_vec_cases(idx, part, parts);
    return 0;
}
