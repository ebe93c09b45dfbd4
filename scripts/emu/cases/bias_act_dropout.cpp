// Host emulation of kernels/bias_act_dropout.cu (see compare.sh): random cases (data with
// infinities, NaNs and signed zeros; every dtype and activation; vector and scalar paths; bias or
// none; h_out; backward from x or from a saved h; dbias partials and their finishing sum;
// thresholds 0, 2^32 and between) print one line of output hashes each; the unfused baseline's
// six kernels run on flat data. The first two groups (Math::Exact, 32-bit keying, the combined
// vector kernel) are the cases verified on a GPU; the third group ("fast" lines) runs
// Math::Fast through its per-activation vector kernels and the fast scalar kernel, the ReLU
// vector kernel, and 16-bit keying in both modes, with the emulator's deterministic model of the
// special-function unit (shim.h); the fourth ("key8" lines) 8-bit keying in both modes. With BAD_DUMP=<dir> each of those cases also writes its
// inputs and outputs to <dir>/case<k>.bin for tests/bias_act_dropout_emu.rs (the format is in
// run_new below).
#include "harness.h"

template <class T> struct K;
#define KS(T, S)                                                         \
    template <> struct K<T> {                                            \
        static constexpr auto fv = bias_act_dropout_fwd_vec_##S;         \
        static constexpr auto fs = bias_act_dropout_fwd_scalar_##S;      \
        static constexpr auto bv = bias_act_dropout_bwd_vec_##S;         \
        static constexpr auto bs = bias_act_dropout_bwd_scalar_##S;      \
        static constexpr auto db = bias_act_dropout_dbias_##S;           \
        static constexpr auto fvr = bias_act_dropout_fwd_vec_relu_##S;   \
        static constexpr decltype(&bias_act_dropout_bwd_vec_relu_##S) bvr[3] = {bias_act_dropout_bwd_vec_relu_##S, bias_act_dropout_bwd_vec_relu_k16_##S, bias_act_dropout_bwd_vec_relu_k8_##S};   \
        static constexpr auto fve = bias_act_dropout_fwd_vec_gelu_erf_fast_##S; \
        static constexpr decltype(&bias_act_dropout_bwd_vec_gelu_erf_fast_##S) bve[3] = {bias_act_dropout_bwd_vec_gelu_erf_fast_##S, bias_act_dropout_bwd_vec_gelu_erf_fast_k16_##S, bias_act_dropout_bwd_vec_gelu_erf_fast_k8_##S}; \
        static constexpr auto fvt = bias_act_dropout_fwd_vec_gelu_tanh_fast_##S; \
        static constexpr decltype(&bias_act_dropout_bwd_vec_gelu_tanh_fast_##S) bvt[3] = {bias_act_dropout_bwd_vec_gelu_tanh_fast_##S, bias_act_dropout_bwd_vec_gelu_tanh_fast_k16_##S, bias_act_dropout_bwd_vec_gelu_tanh_fast_k8_##S}; \
        static constexpr auto fvs = bias_act_dropout_fwd_vec_silu_fast_##S; \
        static constexpr decltype(&bias_act_dropout_bwd_vec_silu_fast_##S) bvs[3] = {bias_act_dropout_bwd_vec_silu_fast_##S, bias_act_dropout_bwd_vec_silu_fast_k16_##S, bias_act_dropout_bwd_vec_silu_fast_k8_##S}; \
        static constexpr auto fsf = bias_act_dropout_fwd_scalar_fast_##S; \
        static constexpr auto bsf = bias_act_dropout_bwd_scalar_fast_##S; \
        static constexpr auto ub = bias_act_dropout_unfused_bias_add_##S; \
        static constexpr auto ua = bias_act_dropout_unfused_act_##S;     \
        static constexpr auto ud = bias_act_dropout_unfused_dropout_##S; \
        static constexpr auto um = bias_act_dropout_unfused_masked_scale_##S; \
        static constexpr auto ug = bias_act_dropout_unfused_act_grad_##S; \
        static constexpr auto uc = bias_act_dropout_unfused_col_sum_##S; \
        static constexpr const char* name = #S;                          \
    };
KS(float, f32) KS(__half, f16) KS(__nv_bfloat16, bf16)

template <class T> static uint32_t bits_of(float f) {
    if constexpr (sizeof(T) == 4) return __float_as_uint(f);
    else if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(__float2half_rn(f));
    else return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Random elements: mostly moderate values, some zeros, infinities, NaNs and large magnitudes.
template <class T> static std::vector<uint8_t> fill(size_t n, std::mt19937_64& g, float lo, float hi, bool specials) {
    std::vector<uint8_t> v(n * sizeof(T));
    for (size_t i = 0; i < n; ++i) {
        float f = uniform(g, lo, hi);
        if (specials) {
            const unsigned r = g() % 61;
            if (r == 0) f = INFINITY; else if (r == 1) f = -INFINITY; else if (r == 2) f = NAN;
            else if (r == 3) f = -0.f; else if (r == 4) f = 40.f; else if (r == 5) f = -200.f;
        }
        const uint32_t b = bits_of<T>(f);
        memcpy(v.data() + i * sizeof(T), &b, sizeof(T));
    }
    return v;
}

struct Case {
    uint64_t rows, cols, slab, threshold;
    uint32_t act;
    bool vec, bias, h_out, from_h, dbias;
};

template <class T> static void run(const Case& c, uint64_t seed) {
    constexpr int VV = 16 / sizeof(T);
    const uint64_t n = c.rows * c.cols;
    std::mt19937_64 g(seed);
    auto x = fill<T>(n, g, -6.f, 6.f, true);
    auto b = fill<T>(c.cols, g, -1.f, 1.f, false);
    auto dy = fill<T>(n, g, -2.f, 2.f, true);
    const float scale = c.threshold >= (1ull << 32) ? 0.f : (float)(4294967296.0 / (4294967296.0 - (double)c.threshold));
    std::vector<uint8_t> y(n * sizeof(T), 0xEE), h(n * sizeof(T), 0xEE);
    const uint64_t per = c.vec ? VV : 1;
    const unsigned tiles = (unsigned)std::min<uint64_t>(((c.cols + per - 1) / per + 63) / 64, 3);
    const unsigned slabs = (unsigned)((c.rows + c.slab - 1) / c.slab);
    BiasActDropoutFwdParams p{};
    p.x = x.data(); p.bias = c.bias ? b.data() : nullptr; p.y = y.data(); p.h_out = c.h_out ? h.data() : nullptr;
    p.rows = c.rows; p.cols = c.cols; p.slab_rows = c.slab;
    p.seed = seed * 0x9E3779B97F4A7C15ull; p.call = seed ^ 0x5151ull; p.threshold = c.threshold;
    p.scale = scale; p.act = c.act;
    // Column tiles past grid.x are not visited: the hashes cover what the grid computed, the same
    // on any host, and a smaller grid keeps the emulation fast.
    launch(c.vec ? K<T>::fv : K<T>::fs, dim3{tiles, slabs, 1}, dim3{64, 4, 1}, p);

    std::vector<uint8_t> dx(n * sizeof(T), 0xDD), dbias(c.cols * sizeof(T), 0xDD);
    std::vector<float> part(c.dbias ? (size_t)slabs * c.cols : 1, -9.f);
    BiasActDropoutBwdParams q{};
    q.dy = dy.data(); q.x = c.from_h ? nullptr : x.data(); q.bias = c.from_h || !c.bias ? nullptr : b.data();
    q.h = c.from_h ? h.data() : nullptr; q.dx = dx.data(); q.partials = c.dbias ? part.data() : nullptr;
    q.rows = c.rows; q.cols = c.cols; q.slab_rows = c.slab; q.seed = p.seed; q.call = p.call;
    q.threshold = c.threshold; q.scale = scale; q.act = c.act;
    launch(c.vec ? K<T>::bv : K<T>::bs, dim3{tiles, slabs, 1}, dim3{64, 4, 1}, q);
    if (c.dbias) {
        drop::DbiasParams<T> d{part.data(), reinterpret_cast<T*>(dbias.data()), c.cols, slabs};
        launch(K<T>::db, dim3{(unsigned)((c.cols + 31) / 32), 1, 1}, dim3{256, 1, 1}, d);
    }
    printf("%s %llux%llu act %u vec %d bias %d hout %d fromh %d dbias %d thr %llu slab %llu | y %016llx h %016llx dx %016llx p %016llx db %016llx\n",
           K<T>::name, (unsigned long long)c.rows, (unsigned long long)c.cols, c.act, c.vec, c.bias, c.h_out, c.from_h,
           c.dbias, (unsigned long long)c.threshold, (unsigned long long)c.slab,
           (unsigned long long)fnv(y.data(), y.size()), (unsigned long long)fnv(h.data(), h.size()),
           (unsigned long long)fnv(dx.data(), dx.size()), (unsigned long long)fnv(part.data(), part.size() * 4),
           (unsigned long long)fnv(dbias.data(), dbias.size()));
    fflush(stdout);
}

// Math::Fast, the specialised vector kernels, 16-bit and 8-bit keying. p is the nominal drop
// rate; the launch constants are computed as src/bias_act_dropout/gpu.rs does: the threshold at
// the resolution, and scale, keep_frac and log2(scale) at the effective p = threshold / 2^bits.
struct NewCase {
    uint64_t rows, cols, slab;
    double p;
    uint32_t act, math, key16;  // key16: 0 = 32-bit keying, 1 = 16-bit, 2 = 8-bit
    bool vec, bias, h_out, from_h, dbias;
};

template <class T> static void run_new(const NewCase& c, uint64_t seed, int k) {
    constexpr int VV = 16 / sizeof(T);
    const uint64_t n = c.rows * c.cols;
    std::mt19937_64 g(seed);
    auto x = fill<T>(n, g, -12.f, 12.f, true);
    auto b = fill<T>(c.cols, g, -1.f, 1.f, false);
    auto dy = fill<T>(n, g, -2.f, 2.f, true);
    const double all = c.key16 == 2 ? 256.0 : c.key16 == 1 ? 65536.0 : 4294967296.0;
    const uint64_t threshold = (uint64_t)std::llround(c.p * all);
    const double pe = (double)threshold / all;  // the effective p
    const float scale = (double)threshold >= all ? 0.f : (float)(all / (all - (double)threshold));
    std::vector<uint8_t> y(n * sizeof(T), 0xEE), h(n * sizeof(T), 0xEE);
    const uint64_t per = c.vec ? VV : 1;
    const unsigned tiles = (unsigned)std::min<uint64_t>(((c.cols + per - 1) / per + 63) / 64, 3);
    const unsigned slabs = (unsigned)((c.rows + c.slab - 1) / c.slab);
    BiasActDropoutFwdParams p{};
    p.x = x.data(); p.bias = c.bias ? b.data() : nullptr; p.y = y.data(); p.h_out = c.h_out ? h.data() : nullptr;
    p.rows = c.rows; p.cols = c.cols; p.slab_rows = c.slab;
    p.seed = seed * 0x9E3779B97F4A7C15ull; p.call = seed ^ 0x5151ull; p.threshold = threshold;
    p.scale = scale; p.keep_frac = (float)(1.0 - pe); p.log2_scale = (float)std::log2((double)scale);
    p.act = c.act; p.math = c.math; p.flags = c.key16 == 2 ? drop::FLAG_KEY8 : c.key16 ? drop::FLAG_KEY16 : 0u;
    // The kernel the host would pick (gpu.rs `families`).
    auto fk = K<T>::fs; auto bk = K<T>::bs;
    const bool fast = c.math == MATH_FAST && c.act != ACT_RELU;
    if (c.vec) {
        // The per-activation backward kernels are one per keying: [32-bit, 16-bit, 8-bit].
        const int kk = c.key16 == 2 ? 2 : c.key16 ? 1 : 0;
        if (c.act == ACT_RELU) { fk = K<T>::fvr; bk = K<T>::bvr[kk]; }
        else if (!fast) { fk = K<T>::fv; bk = K<T>::bv; }
        else if (c.act == ACT_GELU_ERF) { fk = K<T>::fve; bk = K<T>::bve[kk]; }
        else if (c.act == ACT_GELU_TANH) { fk = K<T>::fvt; bk = K<T>::bvt[kk]; }
        else { fk = K<T>::fvs; bk = K<T>::bvs[kk]; }
    } else if (fast) {
        fk = K<T>::fsf; bk = K<T>::bsf;
    }
    launch(fk, dim3{tiles, slabs, 1}, dim3{64, 4, 1}, p);

    std::vector<uint8_t> dx(n * sizeof(T), 0xDD), dbias(c.cols * sizeof(T), 0xDD);
    std::vector<float> part(c.dbias ? (size_t)slabs * c.cols : 1, -9.f);
    BiasActDropoutBwdParams q{};
    q.dy = dy.data(); q.x = c.from_h ? nullptr : x.data(); q.bias = c.from_h || !c.bias ? nullptr : b.data();
    q.h = c.from_h ? h.data() : nullptr; q.dx = dx.data(); q.partials = c.dbias ? part.data() : nullptr;
    q.rows = c.rows; q.cols = c.cols; q.slab_rows = c.slab; q.seed = p.seed; q.call = p.call;
    q.threshold = threshold; q.scale = scale; q.act = c.act; q.math = c.math; q.flags = p.flags;
    q.keep_frac = p.keep_frac; q.log2_keep = (float)std::log2(1.0 - pe);
    launch(bk, dim3{tiles, slabs, 1}, dim3{64, 4, 1}, q);
    if (c.dbias) {
        drop::DbiasParams<T> d{part.data(), reinterpret_cast<T*>(dbias.data()), c.cols, slabs};
        launch(K<T>::db, dim3{(unsigned)((c.cols + 31) / 32), 1, 1}, dim3{256, 1, 1}, d);
    }
    printf("%s %s %llux%llu act %u math %u %s %u vec %d bias %d hout %d fromh %d dbias %d p %.4f slab %llu | y %016llx h %016llx dx %016llx p %016llx db %016llx\n",
           K<T>::name, c.key16 == 2 ? "key8" : "fast-or-key16", (unsigned long long)c.rows, (unsigned long long)c.cols,
           c.act, c.math, c.key16 == 2 ? "key8" : "key16", c.key16 == 2 ? 1u : c.key16, c.vec, c.bias,
           c.h_out, c.from_h, c.dbias, c.p, (unsigned long long)c.slab,
           (unsigned long long)fnv(y.data(), y.size()), (unsigned long long)fnv(h.data(), h.size()),
           (unsigned long long)fnv(dx.data(), dx.size()), (unsigned long long)fnv(part.data(), part.size() * 4),
           (unsigned long long)fnv(dbias.data(), dbias.size()));
    fflush(stdout);
    // The dump: u64 dtype (0 f32, 1 f16, 2 bf16), rows, cols, act, math, key (0: 32-bit keying,
    // 1: 16-bit, 2: 8-bit), vec, bias, h_out,
    // from_h, dbias, seed, call, bits of p (f64); then x [n], bias [cols], dy [n], y [n],
    // h [n] (as written: 0xEE bytes without h_out), dx [n], dbias [cols] (0xDD without dbias),
    // all in T, little-endian.
    if (const char* dir = getenv("BAD_DUMP")) {
        const std::string path = std::string(dir) + "/case" + std::to_string(k) + ".bin";
        FILE* f = fopen(path.c_str(), "wb");
        if (!f) { perror(path.c_str()); abort(); }
        uint64_t pb;
        memcpy(&pb, &c.p, 8);
        const uint64_t dt = sizeof(T) == 4 ? 0 : (std::is_same_v<T, __half> ? 1 : 2);
        const uint64_t hdr[14] = {dt, c.rows, c.cols, c.act, c.math, c.key16, c.vec, c.bias, c.h_out, c.from_h, c.dbias, p.seed, p.call, pb};
        fwrite(hdr, 8, 14, f);
        for (auto* v : {&x, &b, &dy, &y, &h, &dx, &dbias}) fwrite(v->data(), 1, v->size(), f);
        fclose(f);
    }
}

// The unfused baseline on a flat [rows, cols] tensor.
template <class T> static void run_unfused(uint64_t rows, uint64_t cols, uint32_t act, uint64_t thr, uint64_t seed) {
    const uint64_t n = rows * cols;
    std::mt19937_64 g(seed);
    auto x = fill<T>(n, g, -6.f, 6.f, true);
    auto b = fill<T>(cols, g, -1.f, 1.f, false);
    auto dy = fill<T>(n, g, -2.f, 2.f, true);
    const float scale = thr >= (1ull << 32) ? 0.f : (float)(4294967296.0 / (4294967296.0 - (double)thr));
    std::vector<uint8_t> h(n * sizeof(T)), a(n * sizeof(T)), y(n * sizeof(T)), m(n, 7), gg(n * sizeof(T)),
        dx(n * sizeof(T)), db(cols * sizeof(T));
    BiasActDropoutUnfusedParams p{};
    p.n = n; p.cols = cols; p.seed = seed; p.call = seed + 1; p.threshold = thr; p.scale = scale; p.act = act;
    auto go = [&](auto k, const void* in_a, const void* in_b, void* out, uint8_t* mask) {
        BiasActDropoutUnfusedParams q = p;
        q.a = in_a; q.b = in_b; q.out = out; q.mask = mask;
        launch(k, dim3{2, 1, 1}, dim3{32, 1, 1}, q);
    };
    go(K<T>::ub, x.data(), b.data(), h.data(), nullptr);
    go(K<T>::ua, h.data(), nullptr, a.data(), nullptr);
    go(K<T>::ud, a.data(), nullptr, y.data(), m.data());
    go(K<T>::um, dy.data(), m.data(), gg.data(), nullptr);
    go(K<T>::ug, gg.data(), h.data(), dx.data(), nullptr);
    go(K<T>::uc, dx.data(), nullptr, db.data(), nullptr);
    printf("%s unfused %llux%llu act %u thr %llu | h %016llx y %016llx m %016llx dx %016llx db %016llx\n", K<T>::name,
           (unsigned long long)rows, (unsigned long long)cols, act, (unsigned long long)thr,
           (unsigned long long)fnv(h.data(), h.size()), (unsigned long long)fnv(y.data(), y.size()),
           (unsigned long long)fnv(m.data(), m.size()), (unsigned long long)fnv(dx.data(), dx.size()),
           (unsigned long long)fnv(db.data(), db.size()));
    fflush(stdout);
}

int main(int argc, char** argv) {
    const int part = argc > 1 ? atoi(argv[1]) : 0, parts = argc > 2 ? atoi(argv[2]) : 1;
    const uint64_t thresholds[] = {0, 1ull << 32, 429496730ull, 2147483648ull};
    struct Shape { uint64_t rows, cols; };
    // cols a multiple of 8 (every dtype's vector path) or odd (scalar only); rows crossing the
    // 4 lanes and several slabs.
    const Shape shapes[] = {{1, 40}, {7, 64}, {13, 24}, {33, 16}, {19, 17}, {2, 3}};
    int idx = 0;
    std::mt19937_64 g(2718);
    for (int dt = 0; dt < 3; ++dt)
        for (const Shape& s : shapes)
            for (int v = 0; v < 2; ++v)
                for (uint32_t act = 0; act < 4; ++act) {
                    if (v == 1 && s.cols % 8) continue;
                    Case c{};
                    c.rows = s.rows; c.cols = s.cols; c.vec = v == 1; c.act = act;
                    c.threshold = thresholds[g() % 4];
                    c.bias = g() & 1; c.h_out = g() % 3 != 0; c.from_h = c.h_out && (g() & 1); c.dbias = g() % 4 != 0;
                    c.slab = 1 + g() % s.rows;
                    const uint64_t seed = g();
                    if (idx++ % parts != part) continue;
                    if (dt == 0) run<float>(c, seed);
                    else if (dt == 1) run<__half>(c, seed);
                    else run<__nv_bfloat16>(c, seed);
                }
    for (int dt = 0; dt < 3; ++dt)
        for (uint32_t act = 0; act < 4; ++act) {
            const uint64_t thr = thresholds[g() % 4], seed = g();
            if (idx++ % parts != part) continue;
            if (dt == 0) run_unfused<float>(9, 37, act, thr, seed);
            else if (dt == 1) run_unfused<__half>(9, 37, act, thr, seed);
            else run_unfused<__nv_bfloat16>(9, 37, act, thr, seed);
        }
    // Math::Fast / the specialised kernels / 16-bit keying (a separate generator, so the cases
    // above keep their draws).
    std::mt19937_64 g2(31415);
    const double rates[] = {0.0, 1.0, 0.1, 0.5};
    const Shape shapes2[] = {{1, 40}, {7, 64}, {13, 24}, {33, 16}, {19, 17}, {2, 3}, {70, 8}};
    int k = 0;
    for (int dt = 0; dt < 3; ++dt)
        for (const Shape& s : shapes2)
            for (int v = 0; v < 2; ++v)
                for (uint32_t act = 0; act < 4; ++act)
                    for (uint32_t mode = 0; mode < 3; ++mode) {  // 0: fast, 1: fast + key16, 2: exact + key16
                        if (v == 1 && s.cols % 8) continue;
                        NewCase c{};
                        c.rows = s.rows; c.cols = s.cols; c.vec = v == 1; c.act = act;
                        c.math = mode == 2 ? MATH_EXACT : MATH_FAST;
                        c.key16 = mode != 0;
                        c.p = rates[g2() % 4];
                        c.bias = g2() & 1; c.h_out = g2() % 3 != 0; c.from_h = c.h_out && (g2() & 1); c.dbias = g2() % 4 != 0;
                        // The host's slab (src/dropping slab_rows: min(16, rows) at these sizes),
                        // so the dbias sums are the CPU reference's partition.
                        c.slab = s.rows <= 1 ? 1 : std::min<uint64_t>(16, s.rows);
                        const uint64_t seed = g2();
                        const int kk = k++;
                        if (idx++ % parts != part) continue;
                        if (dt == 0) run_new<float>(c, seed, kk);
                        else if (dt == 1) run_new<__half>(c, seed, kk);
                        else run_new<__nv_bfloat16>(c, seed, kk);
                    }
    // 8-bit keying, both math modes (a third generator: the cases above keep their draws).
    std::mt19937_64 g3(16180);
    for (int dt = 0; dt < 3; ++dt)
        for (const Shape& s : shapes2)
            for (int v = 0; v < 2; ++v)
                for (uint32_t act = 0; act < 4; ++act)
                    for (uint32_t math = 0; math < 2; ++math) {
                        if (v == 1 && s.cols % 8) continue;
                        if (act == ACT_RELU && math == MATH_FAST) continue;  // the same kernel as exact
                        NewCase c{};
                        c.rows = s.rows; c.cols = s.cols; c.vec = v == 1; c.act = act;
                        c.math = math == 1 ? MATH_FAST : MATH_EXACT;
                        c.key16 = 2;
                        c.p = rates[g3() % 4];
                        c.bias = g3() & 1; c.h_out = g3() % 3 != 0; c.from_h = c.h_out && (g3() & 1); c.dbias = g3() % 4 != 0;
                        c.slab = s.rows <= 1 ? 1 : std::min<uint64_t>(16, s.rows);
                        const uint64_t seed = g3();
                        const int kk = k++;
                        if (idx++ % parts != part) continue;
                        if (dt == 0) run_new<float>(c, seed, kk);
                        else if (dt == 1) run_new<__half>(c, seed, kk);
                        else run_new<__nv_bfloat16>(c, seed, kk);
                    }
    return 0;
}
