// Differential host emulation of the multi-tensor AdamW kernels (see compare.sh): every
// (param, grad) dtype pair; tensors of odd sizes, sizes crossing the 65,536-element chunk,
// zero-size tensors and views starting at element 1 (scalar path); master weights filled by the
// init kernel or restored at random, nearest-even or stochastic rounding of 16-bit parameters;
// per-tensor weight decay; skip flags; the non-finite flag; a device grad scale; restored step
// counts; launches split at a block offset; several steps with fresh gradients (NaN and
// infinities in some cases). One line of output hashes per case.
//
// Only `State`, `make_state` and `launch_step` below know the device structs: a change of the
// engine's or the optimizer's table layout adapts them, and the same cases must still print the
// same hashes.
#include "harness.h"

template <class T> struct Name;
template <> struct Name<float> { static constexpr const char* s = "f32"; };
template <> struct Name<__half> { static constexpr const char* s = "f16"; };
template <> struct Name<__nv_bfloat16> { static constexpr const char* s = "bf16"; };

// Kernel per (param, grad) pair and state layout: 0 the default (f32 moments, f32 master for
// 16-bit params), 1 bf16 moments, 2 no master (16-bit params), 3 bf16 moments and no master.
template <class P, class G, int L> struct K;
#define AW_K(P, PS, G, GS, L, SUF) \
    template <> struct K<P, G, L> { static constexpr auto step = adamw_p##PS##_g##GS##SUF; };
#define AW_KG(P, PS, L, SUF) \
    AW_K(P, PS, float, f32, L, SUF) AW_K(P, PS, __half, f16, L, SUF) AW_K(P, PS, __nv_bfloat16, bf16, L, SUF)
AW_KG(float, f32, 0, ) AW_KG(__half, f16, 0, ) AW_KG(__nv_bfloat16, bf16, 0, )
AW_KG(float, f32, 1, _mbf16) AW_KG(__half, f16, 1, _mbf16) AW_KG(__nv_bfloat16, bf16, 1, _mbf16)
AW_KG(__half, f16, 2, _nomaster) AW_KG(__nv_bfloat16, bf16, 2, _nomaster)
AW_KG(__half, f16, 3, _mbf16_nomaster) AW_KG(__nv_bfloat16, bf16, 3, _mbf16_nomaster)
template <class P> struct Init;
template <> struct Init<__half> { static constexpr auto k = adamw_init_master_f16; };
template <> struct Init<__nv_bfloat16> { static constexpr auto k = adamw_init_master_bf16; };

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
    bool misaligned;  // the parameter and gradient views start at element 1 of their buffers
};

constexpr uint64_t STATE_ALIGN = 64;  // multi_tensor::STATE_ALIGN: state arenas per tensor

// The optimizer state and the device tables of one set, as src/multi_tensor and src/adamw build
// them. `m`, `v`, `master` are f32 arenas with each tensor at a multiple of STATE_ALIGN.
struct State {
    int layout = 0;  // see K
    std::vector<uint64_t> off;
    std::vector<float> m, v, master;
    std::vector<__nv_bfloat16> mb, vb;  // bf16 moments (layouts 1 and 3)
    std::vector<uint32_t> chunk_steps;
    std::vector<uint8_t> skip;
    std::vector<mt::TensorEntry> tensors;
    std::vector<mt::BlockEntry> blocks;
    std::vector<AdamWTensor> table;  // the optimizer's own per-tensor rows
    std::vector<float> wd;
    uint32_t num_chunks = 0;
};

static State make_state(const std::vector<TensorSpec>& specs, const std::vector<uint8_t*>& params,
                        const std::vector<uint8_t*>& grads, const std::vector<float>& wd,
                        size_t psize, size_t gsize, int layout = 0) {
    State s;
    s.layout = layout;
    s.wd = wd;
    uint64_t arena = 0;
    for (const auto& t : specs) {
        s.off.push_back(arena);
        arena += (t.n + STATE_ALIGN - 1) / STATE_ALIGN * STATE_ALIGN;
    }
    arena = std::max<uint64_t>(arena, 1);
    if (layout & 1) {
        s.mb.assign(arena, __float2bfloat16_rn(0.f));
        s.vb.assign(arena, __float2bfloat16_rn(0.f));
    } else {
        s.m.assign(arena, 0.f);
        s.v.assign(arena, 0.f);
    }
    if (psize == 2 && !(layout & 2)) s.master.assign(arena, 0.f);
    s.skip.assign(specs.size(), 0);
    for (size_t i = 0; i < specs.size(); ++i) {
        mt::TensorEntry e{};
        e.param = (uint64_t)(uintptr_t)params[i];
        e.grad = (uint64_t)(uintptr_t)grads[i];
        e.n = specs[i].n;
        const bool vec4 = e.param % (4 * psize) == 0 && e.grad % (4 * gsize) == 0;
        e.flags = (vec4 ? mt::FLAG_VEC4 : 0u) | (e.grad % 16 == 0 ? mt::FLAG_GRAD16 : 0u);
        e.first_chunk = s.num_chunks;
        e.num_chunks = (uint32_t)((e.n + mt::CHUNK - 1) / mt::CHUNK);
        for (uint32_t c = 0; c < e.num_chunks; ++c) s.blocks.push_back({(uint32_t)i, c});
        s.num_chunks += e.num_chunks;
        s.tensors.push_back(e);
    }
    if (s.blocks.empty()) s.blocks.push_back({0, 0});
    s.chunk_steps.assign(std::max<uint32_t>(s.num_chunks, 1), 0);
    return s;
}

// Table addresses are filled after the state vectors stop moving.
static void bind(State& s) {
    s.table.assign(s.tensors.size(), AdamWTensor{});
    for (size_t i = 0; i < s.tensors.size(); ++i) {
        s.table[i].m = s.layout & 1 ? (uint64_t)(uintptr_t)(s.mb.data() + s.off[i])
                                    : (uint64_t)(uintptr_t)(s.m.data() + s.off[i]);
        s.table[i].v = s.layout & 1 ? (uint64_t)(uintptr_t)(s.vb.data() + s.off[i])
                                    : (uint64_t)(uintptr_t)(s.v.data() + s.off[i]);
        s.table[i].master = s.master.empty() ? 0 : (uint64_t)(uintptr_t)(s.master.data() + s.off[i]);
        s.table[i].weight_decay = s.wd[i];
    }
}

template <class P> static void init_master(State& s) {
    if constexpr (sizeof(P) == 2) {
        if (!s.num_chunks || s.master.empty()) return;
        InitMasterParams ip{s.tensors.data(), s.blocks.data(), s.table.data(), 0, 0};
        launch(Init<P>::k, dim3{s.num_chunks, 1, 1}, dim3{ADAMW_THREADS, 1, 1}, ip);
    }
}

struct Hyper {
    float lr, beta1, beta2, eps;
    const float* grad_scale;
    const uint32_t* nonfinite;
    bool stochastic;
    uint64_t seed;
    uint32_t split;  // 0: one launch; else the first launch covers this many chunks
};

template <class P, class G, int L> static void launch_step(State& s, const Hyper& h) {
    if (!s.num_chunks) return;
    AdamWParams p{};
    p.tensors = s.tensors.data();
    p.blocks = s.blocks.data();
    p.state = s.table.data();
    p.chunk_steps = s.chunk_steps.data();
    p.skip = s.skip.data();
    p.lr = &h.lr;
    p.grad_scale = h.grad_scale;
    p.nonfinite = h.nonfinite;
    p.seed = h.seed;
    p.beta1 = h.beta1;
    p.beta2 = h.beta2;
    p.eps = h.eps;
    p.stochastic = h.stochastic && sizeof(P) == 2 ? 1u : 0u;
    const uint32_t first = h.split && h.split < s.num_chunks ? h.split : s.num_chunks;
    p.block_offset = 0;
    launch(K<P, G, L>::step, dim3{first, 1, 1}, dim3{ADAMW_THREADS, 1, 1}, p);
    if (first < s.num_chunks) {
        p.block_offset = first;
        launch(K<P, G, L>::step, dim3{s.num_chunks - first, 1, 1}, dim3{ADAMW_THREADS, 1, 1}, p);
    }
}

struct Case {
    int layout;  // see K
    int shape;
    bool stochastic, restored, skip, nonfinite, grad_scale, specials;
    uint32_t split;
    int steps;
};

template <class P, class G, int L> static void run(const Case& c, uint64_t seed, int idx) {
    static const std::vector<std::vector<TensorSpec>> shapes = {
        {{65536 + 13, false}, {0, false}, {1024, false}, {7, false}, {777, true}},
        {{2 * 65536 + 1, false}, {4, false}, {0, false}, {33, true}},
        {{5, true}, {0, false}, {0, false}, {65536, false}, {100, false}},
    };
    const auto& specs = shapes[c.shape];
    std::mt19937_64 g(seed);
    std::vector<Buf> pbufs, gbufs;
    std::vector<uint8_t*> params, grads;
    std::vector<float> wd;
    for (const auto& t : specs) {
        pbufs.emplace_back((t.n + 1) * sizeof(P));
        gbufs.emplace_back((t.n + 1) * sizeof(G));
        uint8_t* pb = pbufs.back().p + (t.misaligned ? sizeof(P) : 0);
        uint8_t* gb = gbufs.back().p + (t.misaligned ? sizeof(G) : 0);
        for (uint64_t i = 0; i < t.n; ++i) {
            const P x = from_f<P>(uniform(g, -1.f, 1.f));
            memcpy(pb + i * sizeof(P), &x, sizeof(P));
        }
        params.push_back(t.n ? pb : nullptr);
        grads.push_back(t.n ? gb : nullptr);
        const float wds[] = {0.f, 0.01f, 0.1f};
        wd.push_back(wds[g() % 3]);
    }
    State s = make_state(specs, params, grads, wd, sizeof(P), sizeof(G), L);
    bind(s);
    if (c.restored) {  // a state as restore_state leaves it: any moments, master and counts
        for (size_t i = 0; i < s.m.size(); ++i) s.m[i] = uniform(g, -0.1f, 0.1f);
        for (size_t i = 0; i < s.v.size(); ++i) s.v[i] = uniform(g, 0.f, 0.01f);
        for (size_t i = 0; i < s.mb.size(); ++i) s.mb[i] = __float2bfloat16_rn(uniform(g, -0.1f, 0.1f));
        for (size_t i = 0; i < s.vb.size(); ++i) s.vb[i] = __float2bfloat16_rn(uniform(g, 0.f, 0.01f));
        for (size_t i = 0; i < s.master.size(); ++i) s.master[i] = uniform(g, -1.f, 1.f);
        for (size_t t = 0; t < specs.size(); ++t) {
            const uint32_t steps[] = {0, 1, 7, 1000, 123456};
            const uint32_t st = steps[g() % 5];
            for (uint32_t k = 0; k < s.tensors[t].num_chunks; ++k) s.chunk_steps[s.tensors[t].first_chunk + k] = st;
        }
    } else {
        init_master<P>(s);
    }

    const float scale = 1.0f / 1024.0f;
    uint32_t flag = 0;
    uint64_t hsteps = 0;
    for (int step = 0; step < c.steps; ++step) {
        for (size_t t = 0; t < specs.size(); ++t)
            for (uint64_t i = 0; i < specs[t].n; ++i) {
                float f = uniform(g, -1.f, 1.f) * (c.grad_scale ? 1024.f : 1.f);
                if (c.specials) {
                    const unsigned r = g() % 4001;
                    if (r == 0) f = INFINITY; else if (r == 1) f = -INFINITY; else if (r == 2) f = NAN;
                }
                const G x = from_f<G>(f);
                memcpy(grads[t] + i * sizeof(G), &x, sizeof(G));
            }
        for (size_t t = 0; t < specs.size(); ++t) s.skip[t] = c.skip && step == 1 && g() % 2 == 0;
        flag = c.nonfinite && step == 1 ? 1u : 0u;
        const float lrs[] = {1e-3f, 3e-4f, 1e-2f};
        Hyper h{lrs[step % 3], 0.9f, 0.999f, 1e-8f, c.grad_scale ? &scale : nullptr,
                c.nonfinite ? &flag : nullptr, c.stochastic, seed ^ 0x5EEDull, c.split};
        if (c.shape == 2 && step == 2) { h.beta1 = 0.8f; h.beta2 = 0.95f; h.eps = 1e-6f; }
        launch_step<P, G, L>(s, h);
        uint64_t hp = 0;
        for (size_t t = 0; t < specs.size(); ++t)
            if (specs[t].n) hp ^= fnv(params[t], specs[t].n * sizeof(P)) + t;
        hsteps = hsteps * 31 + hp;
    }
    char lay[16] = "";
    if (L) snprintf(lay, sizeof lay, " layout %d", L);  // the default layout's lines predate layouts
    const uint64_t hm = L & 1 ? fnv(s.mb.data(), s.mb.size() * 2) : fnv(s.m.data(), s.m.size() * 4);
    const uint64_t hv = L & 1 ? fnv(s.vb.data(), s.vb.size() * 2) : fnv(s.v.data(), s.v.size() * 4);
    printf("%04d p%s g%s%s shape %d sr %d restored %d skip %d nonfinite %d gscale %d specials %d split %u steps %d | "
           "params %016llx m %016llx v %016llx master %016llx steps %016llx\n",
           idx, Name<P>::s, Name<G>::s, lay, c.shape, c.stochastic, c.restored, c.skip, c.nonfinite, c.grad_scale,
           c.specials, c.split, c.steps, (unsigned long long)hsteps, (unsigned long long)hm, (unsigned long long)hv,
           (unsigned long long)fnv(s.master.data(), s.master.size() * 4),
           (unsigned long long)fnv(s.chunk_steps.data(), s.chunk_steps.size() * 4));
    fflush(stdout);
}

template <class P, int L> static void run_l(int gt, const Case& c, uint64_t seed, int idx) {
    if (gt == 0) run<P, float, L>(c, seed, idx);
    else if (gt == 1) run<P, __half, L>(c, seed, idx);
    else run<P, __nv_bfloat16, L>(c, seed, idx);
}

template <class P> static void run_p(int gt, const Case& c, uint64_t seed, int idx) {
    if (c.layout == 0) run_l<P, 0>(gt, c, seed, idx);
    else if (c.layout == 1) run_l<P, 1>(gt, c, seed, idx);
    else if constexpr (sizeof(P) == 2) {
        if (c.layout == 2) run_l<P, 2>(gt, c, seed, idx);
        else run_l<P, 3>(gt, c, seed, idx);
    }
}

// ADAMW_DUMP=DIR: instead of the hash lines, runs stochastic-rounding cases of every 16-bit
// param type, grad type and layout and writes each one's inputs and outputs to DIR/<idx>.bin for
// tests/adamw_emu.rs, which replays them through cpu::step and compares every bit (the GPU-free
// check that the emulated kernel and the CPU reference key and round identically). Format, all
// little-endian: u64 p_kind (1 f16, 2 bf16), g_kind (0 f32, 2 bf16), layout, seed, steps,
// tensors; f32 lr per step; per tensor: u64 n, f32 weight decay, the initial params (P), the
// grads of each step (G), the final params (P), m, v (f32, bf16 moments widened) and, with a
// master, the master (f32).
template <class T> static uint64_t kind_of() {
    if constexpr (sizeof(T) == 4) return 0;
    else if constexpr (std::is_same_v<T, __half>) return 1;
    else return 2;
}

template <class P, class G, int L> static void dump_case(const char* dir, int idx, uint64_t seed) {
    const std::vector<TensorSpec> specs = {{65536 + 13, false}, {1000, false}, {7, false}, {333, true}};
    const int steps = 2;
    const float lrs[steps] = {1e-2f, 3e-4f};
    std::mt19937_64 g(seed);
    std::vector<Buf> pbufs, gbufs;
    std::vector<uint8_t*> params, grads;
    std::vector<float> wd;
    std::vector<std::vector<uint8_t>> out;  // per tensor: the bytes to write
    for (const auto& t : specs) {
        pbufs.emplace_back((t.n + 1) * sizeof(P));
        gbufs.emplace_back((t.n + 1) * sizeof(G));
        uint8_t* pb = pbufs.back().p + (t.misaligned ? sizeof(P) : 0);
        uint8_t* gb = gbufs.back().p + (t.misaligned ? sizeof(G) : 0);
        for (uint64_t i = 0; i < t.n; ++i) {
            const P x = from_f<P>(uniform(g, -1.f, 1.f));
            memcpy(pb + i * sizeof(P), &x, sizeof(P));
        }
        params.push_back(pb);
        grads.push_back(gb);
        const float wds[] = {0.f, 0.01f, 0.1f};
        wd.push_back(wds[g() % 3]);
    }
    State s = make_state(specs, params, grads, wd, sizeof(P), sizeof(G), L);
    bind(s);
    init_master<P>(s);
    auto put = [](std::vector<uint8_t>& o, const void* p, size_t n) {
        o.insert(o.end(), (const uint8_t*)p, (const uint8_t*)p + n);
    };
    for (size_t t = 0; t < specs.size(); ++t) {
        out.emplace_back();
        put(out[t], &specs[t].n, 8);
        put(out[t], &wd[t], 4);
        put(out[t], params[t], specs[t].n * sizeof(P));
    }
    for (int step = 0; step < steps; ++step) {
        for (size_t t = 0; t < specs.size(); ++t) {
            for (uint64_t i = 0; i < specs[t].n; ++i) {
                const G x = from_f<G>(uniform(g, -1.f, 1.f));
                memcpy(grads[t] + i * sizeof(G), &x, sizeof(G));
            }
            put(out[t], grads[t], specs[t].n * sizeof(G));
        }
        Hyper h{lrs[step], 0.9f, 0.999f, 1e-8f, nullptr, nullptr, true, seed ^ 0x5EEDull, 0};
        launch_step<P, G, L>(s, h);
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/%04d.bin", dir, idx);
    FILE* f = fopen(path, "wb");
    if (!f) { perror(path); exit(1); }
    const uint64_t head[6] = {kind_of<P>(), kind_of<G>(), (uint64_t)L, seed ^ 0x5EEDull, (uint64_t)steps,
                              (uint64_t)specs.size()};
    fwrite(head, 8, 6, f);
    fwrite(lrs, 4, steps, f);
    for (size_t t = 0; t < specs.size(); ++t) {
        const uint64_t n = specs[t].n, o = s.off[t];
        put(out[t], params[t], n * sizeof(P));
        std::vector<float> m(n), v(n);
        for (uint64_t i = 0; i < n; ++i) {
            m[i] = L & 1 ? __bfloat162float(s.mb[o + i]) : s.m[o + i];
            v[i] = L & 1 ? __bfloat162float(s.vb[o + i]) : s.v[o + i];
        }
        put(out[t], m.data(), n * 4);
        put(out[t], v.data(), n * 4);
        if (!s.master.empty()) put(out[t], s.master.data() + o, n * 4);
        fwrite(out[t].data(), 1, out[t].size(), f);
    }
    fclose(f);
}

template <class P, int L> static void dump_l(const char* dir, int gt, int idx, uint64_t seed) {
    if (gt == 0) dump_case<P, float, L>(dir, idx, seed);
    else dump_case<P, __nv_bfloat16, L>(dir, idx, seed);
}

static int dump_all(const char* dir, int part, int parts) {
    std::mt19937_64 g(779);
    int idx = 0;
    for (int pt = 1; pt < 3; ++pt)
        for (int gt = 0; gt < 2; ++gt)
            for (int layout = 0; layout < 4; ++layout) {
                const uint64_t seed = g();
                const int me = idx++;
                if (me % parts != part) continue;
                if (pt == 1) {
                    if (layout == 0) dump_l<__half, 0>(dir, gt, me, seed);
                    else if (layout == 1) dump_l<__half, 1>(dir, gt, me, seed);
                    else if (layout == 2) dump_l<__half, 2>(dir, gt, me, seed);
                    else dump_l<__half, 3>(dir, gt, me, seed);
                } else {
                    if (layout == 0) dump_l<__nv_bfloat16, 0>(dir, gt, me, seed);
                    else if (layout == 1) dump_l<__nv_bfloat16, 1>(dir, gt, me, seed);
                    else if (layout == 2) dump_l<__nv_bfloat16, 2>(dir, gt, me, seed);
                    else dump_l<__nv_bfloat16, 3>(dir, gt, me, seed);
                }
            }
    return 0;
}

int main(int argc, char** argv) {
    const int part = argc > 1 ? atoi(argv[1]) : 0, parts = argc > 2 ? atoi(argv[2]) : 1;
    if (const char* dir = getenv("ADAMW_DUMP")) return dump_all(dir, part, parts);
    std::mt19937_64 g(777);
    int idx = 0;
    for (int pt = 0; pt < 3; ++pt)
        for (int gt = 0; gt < 3; ++gt)
            for (int variant = 0; variant < 6; ++variant) {
                Case c{};
                c.shape = variant % 3;
                c.stochastic = variant >= 3;
                c.restored = variant == 1 || variant == 4 || variant == 5;
                c.skip = variant == 1 || variant == 3;
                c.nonfinite = variant == 2 || variant == 4;
                c.grad_scale = variant == 2 || variant == 5;
                c.specials = variant == 5 && (g() & 1);
                c.split = variant == 1 || variant == 4 ? 1 : 0;
                c.steps = 3;
                const uint64_t seed = g();
                const int me = idx++;
                if (me % parts != part) continue;
                if (pt == 0) run_p<float>(gt, c, seed, me);
                else if (pt == 1) run_p<__half>(gt, c, seed, me);
                else run_p<__nv_bfloat16>(gt, c, seed, me);
            }
    // The lean layouts (after every default case, so those keep their lines and indices): bf16
    // moments for every pair; no master, with and without bf16 moments, for 16-bit params.
    std::mt19937_64 g2(778);
    for (int layout = 1; layout < 4; ++layout)
        for (int pt = layout == 1 ? 0 : 1; pt < 3; ++pt)
            for (int gt = 0; gt < 3; ++gt)
                for (int variant = 0; variant < 3; ++variant) {
                    Case c{};
                    c.layout = layout;
                    c.shape = variant;
                    c.stochastic = variant != 1 || layout == 1;
                    c.restored = variant == 1;
                    c.skip = variant == 2;
                    c.nonfinite = variant == 0;
                    c.grad_scale = variant != 2;
                    c.specials = variant == 2 && (g2() & 1);
                    c.split = variant == 1 ? 1 : 0;
                    c.steps = 3;
                    const uint64_t seed = g2();
                    const int me = idx++;
                    if (me % parts != part) continue;
                    if (pt == 0) run_p<float>(gt, c, seed, me);
                    else if (pt == 1) run_p<__half>(gt, c, seed, me);
                    else run_p<__nv_bfloat16>(gt, c, seed, me);
                }
    return 0;
}
