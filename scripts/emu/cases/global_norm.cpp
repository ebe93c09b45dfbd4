// Differential host emulation of the global-norm kernels (see compare.sh): per-chunk partials
// (vector and scalar paths, split launches with a block offset, skip flags), the f64 reduce with
// and without the fused finalize, the separate finalize (loss scale, clipping on and off), the
// per-tensor norms and the scale pass (device or immediate coefficient, non-finite flag). Random
// gradients of every dtype with NaN and infinities in some cases; tensors of odd sizes, sizes
// crossing the 65,536-element chunk, zero-size tensors and views starting at element 1 (scalar
// path). One line of output hashes per case.
//
// Only the `Tables` / launch helpers below know the device structs: a change of the engine's
// table layout adapts them, and the same cases must still print the same hashes.
#include "harness.h"

template <class T> struct Name;
template <> struct Name<float> { static constexpr const char* s = "f32"; };
template <> struct Name<__half> { static constexpr const char* s = "f16"; };
template <> struct Name<__nv_bfloat16> { static constexpr const char* s = "bf16"; };

template <class T> struct K;
#define GN_K(T, S)                                                   \
    template <> struct K<T> {                                        \
        static constexpr auto partials = global_norm_partials_##S;   \
        static constexpr auto scale = global_norm_scale_##S;         \
    };
GN_K(float, f32) GN_K(__half, f16) GN_K(__nv_bfloat16, bf16)

// 256-byte aligned host buffer (the device allocator's alignment).
struct Buf {
    std::vector<uint8_t> raw;
    uint8_t* p = nullptr;
    explicit Buf(size_t bytes = 0) { resize(bytes); }
    void resize(size_t bytes) {
        raw.assign(bytes + 512, 0);
        p = raw.data() + ((256 - ((uintptr_t)raw.data() & 255)) & 255);
    }
};

template <class T> static T from_f(float f) {
    if constexpr (sizeof(T) == 4) return f;
    else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(f);
    else return __float2bfloat16_rn(f);
}

struct TensorSpec {
    uint64_t n;
    bool misaligned;  // the gradient view starts at element 1 of its buffer
};

// The engine's tables for a gradients-only set, as src/multi_tensor builds them.
struct Tables {
    std::vector<mt::TensorEntry> tensors;
    std::vector<mt::BlockEntry> blocks;
    uint32_t num_chunks = 0;
};

static Tables make_tables(const std::vector<TensorSpec>& specs, const std::vector<uint8_t*>& grads) {
    Tables t;
    for (size_t i = 0; i < specs.size(); ++i) {
        mt::TensorEntry e{};
        e.grad = (uint64_t)(uintptr_t)grads[i];
        e.n = specs[i].n;
        const bool g16 = e.grad % 16 == 0;
        e.flags = g16 ? mt::FLAG_GRAD16 : 0u;
        // A gradients-only set: vec4 needs only the gradient aligned for 4-element groups.
        e.flags |= specs[i].misaligned ? 0u : mt::FLAG_VEC4;
        e.first_chunk = t.num_chunks;
        e.num_chunks = (uint32_t)((e.n + mt::CHUNK - 1) / mt::CHUNK);
        for (uint32_t c = 0; c < e.num_chunks; ++c) t.blocks.push_back({(uint32_t)i, c});
        t.num_chunks += e.num_chunks;
        t.tensors.push_back(e);
    }
    if (t.blocks.empty()) t.blocks.push_back({0, 0});
    return t;
}

struct Case {
    int shape;
    bool specials, skip, split, fused, clip, loss_scale, device_coef;
    float max_norm, magnitude;
};

template <class G> static void run(const Case& c, uint64_t seed, int idx) {
    static const std::vector<std::vector<TensorSpec>> shapes = {
        {{2 * 65536 + 5, false}, {0, false}, {1000, false}, {7, false}, {65536, false}, {1, false}},
        {{3, false}, {0, false}, {0, false}, {129, true}},
        {{70001, true}, {12, true}, {4096, false}, {65535, false}},
        {{0, false}, {0, false}},
        {{65537, false}, {9, true}, {0, false}, {2048 + 3, false}},
    };
    const auto& specs = shapes[c.shape];
    std::mt19937_64 g(seed);
    std::vector<Buf> bufs;
    std::vector<uint8_t*> grads;
    for (const auto& s : specs) {
        bufs.emplace_back((s.n + 1) * sizeof(G));
        uint8_t* base = bufs.back().p + (s.misaligned ? sizeof(G) : 0);
        for (uint64_t i = 0; i < s.n; ++i) {
            float f = uniform(g, -c.magnitude, c.magnitude);
            if (c.specials) {
                const unsigned r = g() % 20011;
                if (r == 0) f = INFINITY; else if (r == 1) f = -INFINITY; else if (r == 2) f = NAN;
            }
            const G x = from_f<G>(f);
            memcpy(base + i * sizeof(G), &x, sizeof(G));
        }
        grads.push_back(s.n ? base : nullptr);
    }
    Tables t = make_tables(specs, grads);
    std::vector<uint8_t> skip(specs.size(), 0);
    if (c.skip)
        for (auto& s : skip) s = g() % 3 == 0;

    // A: partials (two launches with a block offset when `split`).
    std::vector<float> partials(std::max<uint32_t>(t.num_chunks, 1), -3.f);
    PartialsParams pp{};
    pp.tensors = t.tensors.data();
    pp.blocks = t.blocks.data();
    pp.partials = partials.data();
    pp.skip = c.skip ? skip.data() : nullptr;
    const uint32_t first = c.split ? t.num_chunks / 2 : t.num_chunks;
    if (first) { pp.block_offset = 0; launch(K<G>::partials, dim3{first, 1, 1}, dim3{NORM_THREADS, 1, 1}, pp); }
    if (t.num_chunks > first) {
        pp.block_offset = first;
        launch(K<G>::partials, dim3{t.num_chunks - first, 1, 1}, dim3{NORM_THREADS, 1, 1}, pp);
    }

    // B and C.
    NormResult res;
    memset(&res, 0xAB, sizeof res);
    const float ls = 1024.0f;
    ReduceParams rp{};
    rp.partials = partials.data();
    rp.count = t.num_chunks;
    rp.result = &res;
    rp.loss_scale = c.loss_scale ? &ls : nullptr;
    rp.max_norm = c.max_norm;
    rp.flags = c.fused ? (REDUCE_FINALIZE | (c.clip ? REDUCE_CLIP : 0u)) : 0u;
    launch(global_norm_reduce, dim3{1, 1, 1}, dim3{REDUCE_THREADS, 1, 1}, rp);
    if (!c.fused) {
        FinalizeParams fp{&res, c.loss_scale ? &ls : nullptr, c.max_norm, c.clip ? 1u : 0u};
        launch(global_norm_finalize, dim3{1, 1, 1}, dim3{32, 1, 1}, fp);
    }

    // Per-tensor norms.
    std::vector<double> sumsq(specs.size(), -1.0);
    std::vector<float> norms(specs.size(), -1.f);
    PerTensorParams tp{t.tensors.data(), partials.data(), sumsq.data(), norms.data(), (uint32_t)specs.size(), 0};
    const unsigned per_grid = (unsigned)((specs.size() + PER_TENSOR_THREADS / 32 - 1) / (PER_TENSOR_THREADS / 32));
    launch(global_norm_per_tensor, dim3{per_grid, 1, 1}, dim3{PER_TENSOR_THREADS, 1, 1}, tp);

    // Scale pass: by the device coefficient (and honouring the non-finite flag) or by 0.75.
    if (t.num_chunks) {
        ScaleParams sp{};
        sp.tensors = t.tensors.data();
        sp.blocks = t.blocks.data();
        sp.coef_ptr = c.device_coef ? &res.coef : nullptr;
        sp.nonfinite = c.device_coef ? &res.nonfinite : nullptr;
        sp.coef = 0.75f;
        sp.block_offset = 0;
        launch(K<G>::scale, dim3{t.num_chunks, 1, 1}, dim3{SCALE_THREADS, 1, 1}, sp);
    }
    uint64_t hg = 1469598103934665603ull;
    for (size_t i = 0; i < specs.size(); ++i)
        if (specs[i].n) hg ^= fnv(grads[i], specs[i].n * sizeof(G)) + i;

    printf("%04d %s shape %d specials %d skip %d split %d fused %d clip %d ls %d dcoef %d max %g mag %g | "
           "partials %016llx result %016llx tensors %016llx %016llx grads %016llx\n",
           idx, Name<G>::s, c.shape, c.specials, c.skip, c.split, c.fused, c.clip, c.loss_scale, c.device_coef,
           c.max_norm, c.magnitude, (unsigned long long)fnv(partials.data(), partials.size() * 4),
           (unsigned long long)fnv(&res, sizeof res), (unsigned long long)fnv(sumsq.data(), sumsq.size() * 8),
           (unsigned long long)fnv(norms.data(), norms.size() * 4), (unsigned long long)hg);
    fflush(stdout);
}

int main(int argc, char** argv) {
    const int part = argc > 1 ? atoi(argv[1]) : 0, parts = argc > 2 ? atoi(argv[2]) : 1;
    std::mt19937_64 g(2024);
    int idx = 0;
    for (int dt = 0; dt < 3; ++dt)
        for (int shape = 0; shape < 5; ++shape)
            for (int variant = 0; variant < 4; ++variant) {
                Case c{};
                c.shape = shape;
                c.specials = variant == 3;
                c.skip = g() % 3 == 0;
                c.split = g() & 1;
                c.fused = g() & 1;
                c.clip = variant != 1;
                c.loss_scale = g() % 3 == 0;
                c.device_coef = g() % 4 != 0;
                const float maxes[] = {1.0f, 0.5f, 1e6f, 30.0f};
                c.max_norm = maxes[g() % 4];
                const float mags[] = {1.0f, 1e-3f, 8.0f, 300.0f};
                c.magnitude = mags[variant == 2 ? 3 : g() % 3];
                const uint64_t seed = g();
                const int me = idx++;
                if (me % parts != part) continue;
                if (dt == 0) run<float>(c, seed, me);
                else if (dt == 1) run<__half>(c, seed, me);
                else run<__nv_bfloat16>(c, seed, me);
            }
    return 0;
}
