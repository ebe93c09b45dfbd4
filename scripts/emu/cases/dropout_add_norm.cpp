// Differential host emulation of kernels/dropout_add_norm.cu (see compare.sh): random cases over
// every dtype pair (x f32/f16/bf16, stream the same or f32), LayerNorm and RMSNorm, hidden sizes
// 1, odd, multiples of 8 and past one block's groups; with and without residual (and in place),
// beta, bias, a given row scale or a drop path (per row or per sample), d_s (prenorm); dropout
// thresholds 0, 2^32 and between; the vector and the scalar path; a capped forward grid; the
// backward's slab partials in shared or in global memory; the norm-only forward of the unfused
// baseline; the forward's row cached in shared memory or not; inputs with infinities and NaNs in
// some cases. One line of output hashes per case.
//
// Kernels are chosen as src/dropout_add_norm/gpu.rs chooses them: on the vector path a register
// tier (dropout_add_norm_{fwd,bwd}_t<NG>) when the row fits one, the generic kernels otherwise.
// Every case that takes a tier also runs the generic kernels on the same inputs and aborts unless
// every output has the same bits, so each line checks both against the golden.
//
// With DAN_DUMP=<dir> each case also writes its inputs and outputs to <dir>/case<k>.bin, which
// the CPU reference can read back to check the emulated kernels bit for bit (done when the kernel
// was written; the format is in dump() below).
#include "harness.h"

template <class T> struct Kind;
template <> struct Kind<float> { static constexpr uint64_t id = 0; static constexpr const char* name = "f32"; };
template <> struct Kind<__half> { static constexpr uint64_t id = 1; static constexpr const char* name = "f16"; };
template <> struct Kind<__nv_bfloat16> { static constexpr uint64_t id = 2; static constexpr const char* name = "bf16"; };

template <class T, class S> struct K;
// fwd_t[i] / bwd_t[i]: tier NG = 1 << i (null: no such tier for this stream type).
#define KS(T, S, NAME, T8F, T8B)                                                                     \
    template <> struct K<T, S> {                                                                     \
        static constexpr auto fwd = dropout_add_norm_fwd_##NAME;                                     \
        static constexpr auto bwd = dropout_add_norm_bwd_##NAME;                                     \
        static constexpr void (*fwd_t[4])(FwdParams<T, S>) = {                                       \
            dropout_add_norm_fwd_t1_##NAME, dropout_add_norm_fwd_t2_##NAME, dropout_add_norm_fwd_t4_##NAME, \
            T8F};                                                                                    \
        static constexpr void (*bwd_t[4])(BwdParams<T, S>) = {                                       \
            dropout_add_norm_bwd_t1_##NAME, dropout_add_norm_bwd_t2_##NAME, dropout_add_norm_bwd_t4_##NAME, \
            T8B};                                                                                    \
    };
KS(float, float, f32, dropout_add_norm_fwd_t8_f32, dropout_add_norm_bwd_t8_f32)
KS(__half, __half, f16, dropout_add_norm_fwd_t8_f16, dropout_add_norm_bwd_t8_f16)
KS(__nv_bfloat16, __nv_bfloat16, bf16, dropout_add_norm_fwd_t8_bf16, dropout_add_norm_bwd_t8_bf16)
KS(__half, float, f16_sf32, dropout_add_norm_fwd_t8_f16_sf32, dropout_add_norm_bwd_t8_f16_sf32)
KS(__nv_bfloat16, float, bf16_sf32, dropout_add_norm_fwd_t8_bf16_sf32, dropout_add_norm_bwd_t8_bf16_sf32)
template <class T> struct C;
template <> struct C<float> { static constexpr auto colsum = dropout_add_norm_colsum_f32; };
template <> struct C<__half> { static constexpr auto colsum = dropout_add_norm_colsum_f16; };
template <> struct C<__nv_bfloat16> { static constexpr auto colsum = dropout_add_norm_colsum_bf16; };

// n random elements of T in [lo, hi); with specials, some infinities and NaNs.
template <class T> static std::vector<T> fill(size_t n, std::mt19937_64& g, float lo, float hi, bool specials) {
    std::vector<T> v(n);
    for (auto& e : v) {
        float f = uniform(g, lo, hi);
        if (specials) {
            const unsigned r = g() % 211;
            if (r == 0) f = INFINITY; else if (r == 1) f = -INFINITY; else if (r == 2) f = NAN;
        }
        e = from_f32<T>(f);
    }
    return v;
}

struct Case {
    uint64_t rows, cols;
    bool rms, residual, in_place, beta, bias, prenorm, vec, specials;
    int rs;  // 0 none, 1 given, 2 drop path per row, 3 drop path per sample of 3 rows
    double p, p_path;
    int layer;
    unsigned max_grid;
    int key = 32;  // keying resolution: 32-, 16- or 8-bit fields of the Philox stream
};

static uint64_t threshold_of(double p) { return (uint64_t)std::round(p * 4294967296.0); }
static float scale_of(double p) { return threshold_of(p) >= (1ull << 32) ? 0.f : (float)(1.0 / (1.0 - p)); }
// 16- and 8-bit keying (MaskResolution::Bits16 / Bits8): the threshold round(p * 2^key) and the
// scale at the effective p, 2^key / (2^key - threshold) (DropRate::threshold_at, scale_at); 32:
// the functions above, as the cases before the resolutions were written.
static uint64_t threshold_at(double p, int key) {
    return key == 32 ? threshold_of(p) : (uint64_t)std::round(p * (double)(1ull << key));
}
static float scale_at(double p, int key) {
    if (key == 32) return scale_of(p);
    const double all = (double)(1ull << key), t = (double)threshold_at(p, key);
    return t >= all ? 0.f : (float)(all / (all - t));
}
static uint32_t key_flag(int key) { return key == 16 ? drop::FLAG_KEY16 : key == 8 ? drop::FLAG_KEY8 : 0u; }
static const char* key_name(int key) { return key == 16 ? "key16 " : key == 8 ? "key8 " : ""; }
static uint64_t key_dump_flags(int key) { return key == 16 ? 128 : key == 8 ? 256 : 0; }

static uint32_t partials_of(uint64_t cols) {  // row_partials in src/dropout_add_norm/mod.rs
    uint64_t g = (cols + 7) / 8, p = 1;
    while (p < g) p <<= 1;
    return (uint32_t)std::min<uint64_t>(std::max<uint64_t>(p, 32), 256);
}

// The register tier of a vector-path row (src/dropout_add_norm/gpu.rs, tier_of): log2 NG, or -1
// when the row needs more than 8 groups per partial.
static int tier_of(uint64_t cols) {
    const uint64_t groups = cols / 8, per = (groups + partials_of(cols) - 1) / partials_of(cols);
    for (int i = 0; i < 4; ++i)
        if (per <= (1u << i)) return i;
    return -1;
}

template <class V> static void put(FILE* f, const std::vector<V>& v) { fwrite(v.data(), sizeof(V), v.size(), f); }

// Segments per partial of each tier (Tier in kernels/dropout_add_norm.cu): the block is
// partials_of(cols) * segments threads. An f32 stream has its own table (its t8 holds two groups
// per thread over 4 segments, as a 16-bit stream's).
template <class S> static unsigned segments(int tier) {
    static const unsigned narrow[4] = {1, 1, 2, 4}, wide[4] = {1, 2, 4, 4};
    return sizeof(S) == 4 ? wide[tier] : narrow[tier];
}

// The tier's output must be the generic kernel's, bit for bit.
template <class V> static void same(const std::vector<V>& a, const std::vector<V>& b, const char* what) {
    if (a.size() != b.size() || memcmp(a.data(), b.data(), a.size() * sizeof(V)) != 0) {
        printf("tier and generic kernels differ in %s\n", what);
        fflush(stdout);
        abort();
    }
}

template <class T, class S> static void run(const Case& c, uint64_t seed, int index) {
    const uint64_t n = c.rows * c.cols, rows = c.rows, cols = c.cols;
    std::mt19937_64 g(seed);
    auto x = fill<T>(n, g, -3.f, 3.f, c.specials);
    auto r = fill<S>(n, g, -3.f, 3.f, c.specials);
    auto gamma = fill<T>(cols, g, 0.5f, 1.5f, false);
    auto beta = fill<T>(cols, g, -0.5f, 0.5f, false);
    auto bias = fill<T>(cols, g, -0.5f, 0.5f, false);
    auto d_out = fill<T>(n, g, -1.f, 1.f, false);
    auto d_s = fill<S>(n, g, -1.f, 1.f, false);
    std::vector<float> rsv(rows);
    for (auto& f : rsv) f = g() % 4 == 0 ? 0.f : uniform(g, 0.5f, 2.f);
    const uint64_t dseed = g(), dcall = g(), path_call = g();
    const float eps = g() & 1 ? 1e-5f : 1e-6f;
    const float ls = (float)(1.0 / std::sqrt((double)c.layer));

    // Forward. In place, the stream buffer holds the residual on entry.
    std::vector<S> s = c.in_place ? r : std::vector<S>(n, from_f32<S>(-77.f));
    std::vector<T> out(n, from_f32<T>(-77.f));
    std::vector<float> mean(rows, -5.f), rstd(rows, -5.f);
    FwdParams<T, S> p{};
    p.x = x.data();
    p.residual = c.in_place ? s.data() : c.residual ? r.data() : nullptr;
    p.bias = c.bias ? bias.data() : nullptr;
    p.gamma = gamma.data();
    p.beta = c.beta ? beta.data() : nullptr;
    p.rowscale = c.rs == 1 ? rsv.data() : nullptr;
    p.out = out.data(); p.s = s.data(); p.mean = mean.data(); p.rstd = rstd.data();
    p.rows = rows; p.cols = cols;
    p.seed = dseed; p.call = dcall; p.threshold = threshold_at(c.p, c.key);
    p.path_call = path_call; p.path_threshold = c.rs >= 2 ? threshold_of(c.p_path) : 0;
    p.scale = scale_at(c.p, c.key); p.path_scale = c.rs >= 2 ? scale_of(c.p_path) : 0.f;
    p.eps = eps; p.layer_scale = ls;
    p.flags = (c.rs >= 2 ? FLAG_DROP_PATH : 0u) | (c.vec ? FLAG_VEC : 0u) | (c.rms ? FLAG_RMS : 0u) |
              (c.beta ? FLAG_BETA : 0u) | key_flag(c.key);
    // Half the generic forwards keep the row in shared memory (FLAG_SMEM): the same bits.
    const uint32_t fwd_smem = seed & 2 ? FLAG_SMEM : 0u;
    p.flags |= fwd_smem;
    p.rows_per_sample = c.rs == 3 ? 3 : 1;
    const unsigned block = partials_of(cols);
    const dim3 fgrid{(unsigned)std::min<uint64_t>(rows, c.max_grid), 1, 1};
    const int tier = c.vec && tier_of(cols) >= 0 && K<T, S>::fwd_t[tier_of(cols)] != nullptr ? tier_of(cols) : -1;
    // The generic forward on the same inputs first (a tier case compares against it below).
    std::vector<S> s_g = s;
    std::vector<T> out_g = out;
    std::vector<float> mean_g = mean, rstd_g = rstd;
    if (tier >= 0) {
        FwdParams<T, S> g = p;
        g.residual = c.in_place ? s_g.data() : p.residual;
        g.out = out_g.data(); g.s = s_g.data(); g.mean = mean_g.data(); g.rstd = rstd_g.data();
        launch(K<T, S>::fwd, fgrid, dim3{block, 1, 1}, g);
        p.flags &= ~FLAG_SMEM;
        launch(K<T, S>::fwd_t[tier], fgrid, dim3{block * segments<S>(tier), 1, 1}, p);
        same(out, out_g, "out"); same(s, s_g, "s"); same(mean, mean_g, "mean"); same(rstd, rstd_g, "rstd");
    } else {
        launch(K<T, S>::fwd, fgrid, dim3{block, 1, 1}, p);
    }

    // The unfused baseline's norm: the same kernel with s as an input (FLAG_NORM_ONLY = 16).
    std::vector<T> out2(n, from_f32<T>(-77.f));
    std::vector<float> mean2(rows, -5.f), rstd2(rows, -5.f);
    const std::vector<S> s_before = s;
    {
        FwdParams<T, S> q = p;
        q.x = nullptr; q.residual = nullptr; q.bias = nullptr; q.rowscale = nullptr;
        q.out = out2.data(); q.mean = mean2.data(); q.rstd = rstd2.data();
        q.flags = (p.flags & ~FLAG_DROP_PATH & ~FLAG_SMEM) | FLAG_NORM_ONLY | (seed & 4 ? FLAG_SMEM : 0u);
        if (tier >= 0) {
            std::vector<T> out2_g = out2;
            std::vector<float> mean2_g = mean2, rstd2_g = rstd2;
            FwdParams<T, S> g = q;
            g.out = out2_g.data(); g.mean = mean2_g.data(); g.rstd = rstd2_g.data();
            launch(K<T, S>::fwd, fgrid, dim3{block, 1, 1}, g);
            q.flags &= ~FLAG_SMEM;
            launch(K<T, S>::fwd_t[tier], fgrid, dim3{block * segments<S>(tier), 1, 1}, q);
            same(out2, out2_g, "norm-only out"); same(mean2, mean2_g, "norm-only mean");
            same(rstd2, rstd2_g, "norm-only rstd");
        } else {
            launch(K<T, S>::fwd, fgrid, dim3{block, 1, 1}, q);
        }
    }
    if (memcmp(s.data(), s_before.data(), n * sizeof(S)) != 0) { printf("norm-only wrote s\n"); abort(); }

    // Backward: one block per slab of ceil(rows / 1024) rows, then the in-order column sums.
    const uint64_t slab_rows = std::max<uint64_t>(1, (rows + 1023) / 1024), slabs = (rows + slab_rows - 1) / slab_rows;
    const bool want_dres = c.residual || c.in_place;
    std::vector<T> dx(n, from_f32<T>(-77.f)), dgamma(cols, from_f32<T>(-77.f)), dbeta = dgamma, dbias = dgamma;
    std::vector<S> d_res(n, from_f32<S>(-77.f));
    std::vector<float> part(3 * slabs * cols, -9.f);
    BwdParams<T, S> q{};
    q.d_out = d_out.data(); q.d_s = c.prenorm ? d_s.data() : nullptr; q.s = s.data(); q.gamma = gamma.data();
    q.mean = mean.data(); q.rstd = rstd.data(); q.rowscale = p.rowscale;
    q.dx = dx.data(); q.d_residual = want_dres ? d_res.data() : nullptr; q.partials = part.data();
    q.rows = rows; q.cols = cols; q.slab_rows = slab_rows; q.slabs = slabs;
    q.seed = dseed; q.call = dcall; q.threshold = p.threshold; q.path_call = path_call;
    q.path_threshold = p.path_threshold; q.scale = p.scale; q.path_scale = p.path_scale; q.layer_scale = ls;
    // Half the generic backwards keep the slab partials in shared memory (FLAG_SMEM): the same
    // bits, so the case line does not say which. The tiers accumulate the wanted partial arrays
    // only (here all three: the colsum writes every column gradient).
    q.flags = (p.flags & ~FLAG_BETA & ~FLAG_SMEM) | (seed & 1 ? FLAG_SMEM : 0u) | FLAG_DBETA | FLAG_DBIAS;
    q.rows_per_sample = p.rows_per_sample;
    const int btier = tier >= 0 && K<T, S>::bwd_t[tier] != nullptr ? tier : -1;
    ColsumParams<T> cs{};
    cs.cols = cols; cs.slabs = slabs;
    auto colsum = [&](const std::vector<float>& parts, std::vector<T>& dg, std::vector<T>& db, std::vector<T>& dbi) {
        cs.partials = parts.data(); cs.dgamma = dg.data(); cs.dbeta = db.data(); cs.dbias = dbi.data();
        launch(C<T>::colsum, dim3{(unsigned)std::min<uint64_t>((cols + 31) / 32, 3), 3, 1}, dim3{256, 1, 1}, cs);
    };
    if (btier >= 0) {
        std::vector<T> dx_g = dx, dg_g = dgamma, db_g = dbeta, dbi_g = dbias;
        std::vector<S> d_res_g = d_res;
        std::vector<float> part_g = part;
        BwdParams<T, S> g = q;
        g.dx = dx_g.data(); g.d_residual = want_dres ? d_res_g.data() : nullptr; g.partials = part_g.data();
        launch(K<T, S>::bwd, dim3{(unsigned)slabs, 1, 1}, dim3{block, 1, 1}, g);
        colsum(part_g, dg_g, db_g, dbi_g);
        q.flags &= ~FLAG_SMEM;
        const unsigned bblock = block * segments<S>(btier);
        launch(K<T, S>::bwd_t[btier], dim3{(unsigned)slabs, 1, 1}, dim3{bblock, 1, 1}, q);
        colsum(part, dgamma, dbeta, dbias);
        same(dx, dx_g, "dx"); same(d_res, d_res_g, "d_residual"); same(dgamma, dg_g, "dgamma");
        same(dbeta, db_g, "dbeta"); same(dbias, dbi_g, "dbias");
    } else {
        launch(K<T, S>::bwd, dim3{(unsigned)slabs, 1, 1}, dim3{block, 1, 1}, q);
        colsum(part, dgamma, dbeta, dbias);
    }

    auto h = [](const auto& v) { return (unsigned long long)fnv(v.data(), v.size() * sizeof(v[0])); };
    printf("%s%s/%s %llux%llu %s res %d inpl %d beta %d bias %d rs %d pre %d vec %d spec %d p %g pp %g l %d grid %u | "
           "out %016llx s %016llx mean %016llx rstd %016llx dx %016llx dres %016llx dg %016llx db %016llx dbias %016llx "
           "norm-only out %016llx mean %016llx rstd %016llx\n",
           key_name(c.key), Kind<T>::name, Kind<S>::name, (unsigned long long)rows, (unsigned long long)cols,
           c.rms ? "rms" : "ln", c.residual, c.in_place, c.beta, c.bias, c.rs, c.prenorm, c.vec, c.specials, c.p, c.p_path, c.layer,
           c.max_grid, h(out), h(s), h(mean), h(rstd), h(dx), h(d_res), h(dgamma), h(dbeta), h(dbias),
           h(out2), h(mean2), h(rstd2));
    fflush(stdout);

    if (const char* dir = getenv("DAN_DUMP")) {
        // u64 header (flags 128 / 256: 16- / 8-bit keying), then the arrays in this order (absent ones skipped): x, residual, gamma,
        // beta, bias, rowscale, d_out, d_s | out, s, mean, rstd, dx, d_residual, dgamma, dbeta,
        // dbias.
        char path[512];
        snprintf(path, sizeof path, "%s/case%04d.bin", dir, index);
        FILE* f = fopen(path, "wb");
        uint64_t flags = (c.residual || c.in_place ? 1 : 0) | (c.beta ? 2 : 0) | (c.bias ? 4 : 0) |
                         (c.rs == 1 ? 8 : 0) | (c.rs >= 2 ? 16 : 0) | (c.prenorm ? 32 : 0) | (c.rms ? 64 : 0) |
                         key_dump_flags(c.key);
        double pp = c.p, ppath = c.p_path;
        uint64_t pbits, ppbits;
        memcpy(&pbits, &pp, 8);
        memcpy(&ppbits, &ppath, 8);
        std::vector<uint64_t> hdr = {Kind<T>::id, Kind<S>::id, rows, cols, flags, dseed, dcall, path_call,
                                     (uint64_t)p.rows_per_sample, pbits, ppbits, __float_as_uint(eps),
                                     __float_as_uint(ls)};
        put(f, hdr);
        put(f, x);
        if (flags & 1) put(f, r);
        put(f, gamma);
        if (c.beta) put(f, beta);
        if (c.bias) put(f, bias);
        if (c.rs == 1) put(f, rsv);
        put(f, d_out);
        if (c.prenorm) put(f, d_s);
        put(f, out); put(f, s); put(f, mean); put(f, rstd); put(f, dx);
        if (want_dres) put(f, d_res);
        put(f, dgamma); put(f, dbeta); put(f, dbias);
        fclose(f);
    }
}

#include "dropout_add_norm_stats.inc"

int main(int argc, char** argv) {
    const int part = argc > 1 ? atoi(argv[1]) : 0, parts = argc > 2 ? atoi(argv[2]) : 1;
    struct Shape { uint64_t rows, cols; };
    // Hidden 1, odd, multiples of 8 (vector-capable), one past 256 groups (2056: a thread takes
    // two groups), and enough rows (1025) for slabs of 2 rows with a partial last one (slow under
    // emulation: two cases only).
    const Shape shapes[] = {{3, 1}, {5, 7}, {4, 8}, {6, 40}, {3, 99}, {2, 264}, {2, 2056}, {1025, 3}, {2, 1001}};
    const double rates[] = {0.0, 1.0, 0.1, 0.5};
    int idx = 0;
    std::mt19937_64 g(20261129);
    for (int pair = 0; pair < 5; ++pair)
        for (const Shape& sh : shapes)
            for (int variant = 0; variant < 4; ++variant) {
                Case c{};
                c.rows = sh.rows; c.cols = sh.cols;
                c.rms = variant & 1;
                c.residual = g() % 4 != 0;
                c.in_place = c.residual && g() % 3 == 0;
                c.beta = g() & 1; c.bias = g() & 1; c.prenorm = g() & 1;
                c.vec = sh.cols % 8 == 0 && variant < 2;
                c.specials = variant == 3;
                c.rs = (int)(g() % 4);
                if (c.rs == 3 && sh.rows % 3) c.rs = 2;
                c.p = rates[(variant + g()) % 4];
                c.p_path = g() & 1 ? 0.25 : 0.5;
                c.layer = g() & 1 ? 1 : 3;
                c.max_grid = g() & 1 ? 1u << 20 : 2u;
                const uint64_t seed = g();
                if (sh.rows > 1024 && !((pair == 0 && variant == 0) || (pair == 4 && variant == 1))) continue;
                const int k = idx++;
                if (k % parts != part) continue;
                switch (pair) {
                    case 0: run<float, float>(c, seed, k); break;
                    case 1: run<__half, __half>(c, seed, k); break;
                    case 2: run<__nv_bfloat16, __nv_bfloat16>(c, seed, k); break;
                    case 3: run<__half, float>(c, seed, k); break;
                    default: run<__nv_bfloat16, float>(c, seed, k); break;
                }
            }
    // Rows for the register tiers t4 and t8 (and the generic kernels past them: 20008 columns),
    // added with the tiers (their own generator, so the cases above keep their inputs): LayerNorm
    // and RMSNorm, the vector path, every dtype pair.
    const Shape wide[] = {{2, 4104}, {1, 8200}, {2, 16384}, {1, 20008}};
    std::mt19937_64 g2(20261206);
    for (int pair = 0; pair < 5; ++pair)
        for (const Shape& sh : wide)
            for (int variant = 0; variant < 2; ++variant) {
                Case c{};
                c.rows = sh.rows; c.cols = sh.cols;
                c.rms = variant & 1;
                c.residual = g2() % 4 != 0;
                c.in_place = c.residual && g2() % 3 == 0;
                c.beta = g2() & 1; c.bias = g2() & 1; c.prenorm = g2() & 1;
                c.vec = true;
                c.specials = g2() % 4 == 0;
                c.rs = (int)(g2() % 3);
                c.p = rates[(variant + g2()) % 4];
                c.p_path = 0.25;
                c.layer = g2() & 1 ? 1 : 3;
                c.max_grid = 1u << 20;
                const uint64_t seed = g2();
                const int k = idx++;
                if (k % parts != part) continue;
                switch (pair) {
                    case 0: run<float, float>(c, seed, k); break;
                    case 1: run<__half, __half>(c, seed, k); break;
                    case 2: run<__nv_bfloat16, __nv_bfloat16>(c, seed, k); break;
                    case 3: run<__half, float>(c, seed, k); break;
                    default: run<__nv_bfloat16, float>(c, seed, k); break;
                }
            }
    // The Block Influence statistics (dropout_add_norm_stats.inc), after every case above.
    stats_cases(idx, part, parts);
    // 16- and 8-bit keying (MaskResolution::Bits16 / Bits8), added with them (their own generator,
    // after every earlier case): each resolution over odd rows (the generic kernels' fields
    // straddling Philox blocks at any offset), the scalar and the vector path, every tier, every
    // dtype pair; p with a non-dyadic threshold at each resolution, 0 and 1.
    const Shape keyed[] = {{3, 1}, {5, 7}, {3, 99}, {4, 40}, {2, 264}, {2, 2056}, {1, 8200}, {2, 16384}, {2, 1001}};
    const double krates[] = {0.1, 0.3, 0.0, 1.0, 0.5};
    std::mt19937_64 g3(20261207);
    for (int pair = 0; pair < 5; ++pair)
        for (const Shape& sh : keyed)
            for (int key : {16, 8}) {
                Case c{};
                c.key = key;
                c.rows = sh.rows; c.cols = sh.cols;
                c.rms = g3() & 1;
                c.residual = g3() % 4 != 0;
                c.in_place = c.residual && g3() % 3 == 0;
                c.beta = g3() & 1; c.bias = g3() & 1; c.prenorm = g3() & 1;
                c.vec = sh.cols % 8 == 0 && g3() % 4 != 0;
                c.specials = g3() % 4 == 0;
                c.rs = (int)(g3() % 4);
                if (c.rs == 3 && sh.rows % 3) c.rs = 2;
                c.p = krates[g3() % 5 < 3 ? g3() % 2 : 2 + g3() % 3];
                c.p_path = 0.25;
                c.layer = g3() & 1 ? 1 : 3;
                c.max_grid = g3() & 1 ? 1u << 20 : 2u;
                const uint64_t seed = g3();
                const int k = idx++;
                if (k % parts != part) continue;
                switch (pair) {
                    case 0: run<float, float>(c, seed, k); break;
                    case 1: run<__half, __half>(c, seed, k); break;
                    case 2: run<__nv_bfloat16, __nv_bfloat16>(c, seed, k); break;
                    case 3: run<__half, float>(c, seed, k); break;
                    default: run<__nv_bfloat16, float>(c, seed, k); break;
                }
            }
    stats_key_cases(idx, part, parts);
    // The f32 stream's tier boundaries (t4 to its t8, t8 to the generic kernels: 8192, 8200,
    // 16384, 16392 columns), added with its t8 (their own generator, after every earlier case):
    // the pairs with an f32 stream, LayerNorm and RMSNorm, the vector path, d_s given or not.
    const Shape fbound[] = {{2, 8192}, {1, 8200}, {2, 16384}, {1, 16392}};
    std::mt19937_64 g4(20261208);
    for (int pair : {0, 3, 4})
        for (const Shape& sh : fbound)
            for (int variant = 0; variant < 2; ++variant) {
                Case c{};
                c.rows = sh.rows; c.cols = sh.cols;
                c.rms = variant & 1;
                c.residual = g4() % 4 != 0;
                c.in_place = c.residual && g4() % 3 == 0;
                c.beta = g4() & 1; c.bias = g4() & 1; c.prenorm = g4() & 1;
                c.vec = true;
                c.specials = g4() % 4 == 0;
                c.rs = (int)(g4() % 3);
                c.p = rates[(variant + g4()) % 4];
                c.p_path = 0.25;
                c.layer = g4() & 1 ? 1 : 3;
                c.max_grid = g4() & 1 ? 1u << 20 : 2u;
                const uint64_t seed = g4();
                const int k = idx++;
                if (k % parts != part) continue;
                switch (pair) {
                    case 0: run<float, float>(c, seed, k); break;
                    case 3: run<__half, float>(c, seed, k); break;
                    default: run<__nv_bfloat16, float>(c, seed, k); break;
                }
            }
    return 0;
}
