// What the fuzz drivers of the dropping ops share (dropout.cpp): the launch
// plan of src/dropping/gpu.rs (segments, geometry, slabs) for a given LaunchTuning, the shared
// backward (dropout_bwd + dbias_finish) as src/dropping/gpu.rs launch_backward runs it, and the
// unfused baseline's byte-mask dropout and masked scale. Include after fuzz.h.
#pragma once
#include "fuzz.h"

// dropping::LaunchTuning (0: the defaults).
struct Tuning {
    unsigned block = 256, max_grid_x = 0x7fffffff;
    bool unroll = true, force_scalar = false;
    uint64_t slab_rows = 0, flat_width = 0;
};

inline Tuning read_tuning(In& in) {
    Tuning t;
    t.block = (unsigned)in.u64("block");
    t.max_grid_x = (unsigned)in.u64("max_grid_x");
    t.unroll = in.flag("unroll");
    t.force_scalar = in.flag("force_scalar");
    t.slab_rows = in.u64("tuning_slab_rows");
    t.flat_width = in.u64("flat_width");
    return t;
}

struct Seg { uint64_t base, rows, cols; };
struct Geo { uint64_t rows, cols, slab_rows; bool vector; dim3 grid, block; };
enum class Slabs { Dbias, DbiasLanes, Free };

// gpu.rs segments(): the config's shape when rows matter, else rows of the flat width plus a
// one-row remainder (or one row of n elements).
template <class T> std::vector<Seg> segments(uint64_t rows, uint64_t cols, bool rows_matter, bool vector_possible,
                                             const Tuning& t) {
    const uint64_t n = rows * cols;
    const uint64_t w = t.flat_width ? t.flat_width : 4ull * t.block * (16 / sizeof(T));
    if (rows_matter) return {{0, rows, cols}};
    if (!vector_possible || t.force_scalar || n < 2 * w || w % 32) return {{0, 1, n}};
    std::vector<Seg> s{{0, n / w, w}};
    if (n % w) s.push_back({n / w * w, 1, n % w});
    return s;
}

// gpu.rs geometry(); `dbias_slab` is dropping::slab_rows(rows, cols, dtype) of this shape.
template <class T> Geo geometry(uint64_t rows, uint64_t cols, bool aligned, bool vector_ok, Slabs kind,
                                uint64_t free_default, uint64_t dbias_slab, const Tuning& t) {
    const uint64_t vec = 16 / sizeof(T);
    Geo g{};
    g.rows = rows;
    g.cols = cols;
    g.vector = !t.force_scalar && aligned && vector_ok && (cols % vec == 0 || rows == 1);
    const uint64_t per = g.vector ? vec : 1;
    if (kind == Slabs::Free) {
        const uint64_t want = t.slab_rows ? t.slab_rows : free_default;
        g.slab_rows = std::max<uint64_t>(std::min<uint64_t>(want, std::max<uint64_t>(rows, 1)), (rows + 65534) / 65535);
    } else {
        g.slab_rows = dbias_slab;
    }
    const uint64_t slabs = (rows + g.slab_rows - 1) / g.slab_rows;
    const unsigned bx = kind == Slabs::DbiasLanes ? t.block / 4 : t.block, by = kind == Slabs::DbiasLanes ? 4 : 1;
    const uint64_t tiles = ((cols + per - 1) / per + bx - 1) / bx;
    g.grid = {(unsigned)std::min<uint64_t>(std::max<uint64_t>(tiles, 1), t.max_grid_x), (unsigned)std::max<uint64_t>(slabs, 1), 1};
    g.block = {bx, by, 1};
    return g;
}

// The fields every dropping kernel's params share, from the case.
struct Keys {
    uint64_t seed, call, threshold, path_call, path_threshold;
    float scale, path_scale;
    uint32_t flags, rows_per_sample;  // FLAG_DROP_PATH (1), FLAG_KEY16 (8), FLAG_KEY8 (16); FLAG_UNROLL per tuning
    bool drop_path;
};

inline Keys read_keys(In& in) {
    Keys k{};
    k.seed = in.u64("seed");
    k.call = in.u64("call");
    k.threshold = in.u64("threshold");
    k.scale = in.f32("scale");
    k.drop_path = in.flag("drop_path");
    k.path_call = in.u64("path_call");
    k.path_threshold = in.u64("path_threshold");
    k.path_scale = in.f32("path_scale");
    k.rows_per_sample = (uint32_t)in.u64("rows_per_sample");
    k.flags = (k.drop_path ? 1u : 0u) | (in.flag("key16") ? 8u : 0u);
    k.flags |= in.flag("key8") ? 16u : 0u;
    return k;
}

template <class T> struct BwdKernels {
    void (*vec)(drop::DropoutBwdParams<T>);
    void (*scalar)(drop::DropoutBwdParams<T>);
    void (*dbias)(drop::DbiasParams<T>);
};

// gpu.rs launch_backward: dx (and dbias through the slab partials) from dy, regenerating the keep
// bits or reading `mask` (null: regenerate).
template <class T>
void run_backward(const BwdKernels<T>& k, const Tuning& t, const Keys& keys, uint64_t rows, uint64_t cols,
                  uint64_t dbias_slab, const float* rowscale, const uint32_t* mask, const View<T>& dy, View<T>& dx,
                  View<T>* dbias) {
    const bool want_dbias = dbias != nullptr;
    const bool rows_matter = want_dbias || rowscale || keys.drop_path;
    const bool aligned = dy.aligned16() && dx.aligned16();
    const Slabs kind = want_dbias ? Slabs::DbiasLanes : Slabs::Free;
    std::vector<std::pair<Seg, Geo>> plan;
    for (const Seg& s : segments<T>(rows, cols, rows_matter, aligned, t))
        plan.push_back({s, geometry<T>(s.rows, s.cols, aligned, true, kind, 8, dbias_slab, t)});
    const uint64_t slabs = plan[0].second.grid.y;
    std::vector<float> part(want_dbias ? std::max<uint64_t>(slabs * cols, 1) : 1, -9.f);
    for (const auto& [s, g] : plan) {
        drop::DropoutBwdParams<T> q{};
        q.dy = dy.p + s.base; q.dx = dx.p + s.base; q.rowscale = rowscale;
        q.mask = mask ? mask + s.base / 32 : nullptr; q.partials = want_dbias ? part.data() : nullptr;
        q.rows = g.rows; q.cols = g.cols; q.slab_rows = g.slab_rows; q.seed = keys.seed; q.call = keys.call;
        q.threshold = keys.threshold; q.path_call = keys.path_call; q.path_threshold = keys.path_threshold;
        q.base = s.base; q.scale = keys.scale; q.path_scale = keys.path_scale;
        q.flags = keys.flags | (t.unroll ? 2u : 0u); q.rows_per_sample = keys.rows_per_sample;
        launch(g.vector ? k.vec : k.scalar, g.grid, g.block, q);
    }
    if (want_dbias) {
        drop::DbiasParams<T> d{part.data(), dbias->p, cols, slabs};
        launch(k.dbias, dim3{(unsigned)std::min<uint64_t>(std::max<uint64_t>((cols + 31) / 32, 1), 3), 1, 1},
               dim3{256, 1, 1}, d);
    }
}

// The unfused baseline's byte-mask dropout of `t` (then the residual add when `r`) and masked
// scale of `dy` (flat launches, vector path when gpu.rs takes it), written to `out`.
template <class T>
void run_unfused(void (*dk)(drop::UnfusedDropoutParams<T>), void (*mk)(drop::UnfusedMaskedScaleParams<T>),
                 void (*ak)(dropout::UnfusedAddParams<T>), const Keys& keys, const View<T>& t, const View<T>* r,
                 const View<T>& dy, Out& out) {
    const uint64_t n = t.n, vec = 16 / sizeof(T);
    View<T> d(n, 0, 0xAB), dx(n, 0, 0xBA);
    View<uint8_t> m(n, 0, 0x5A);
    drop::UnfusedDropoutParams<T> u{};
    u.t = t.p; u.d = d.p; u.mask = m.p; u.n = n; u.seed = keys.seed; u.call = keys.call;
    u.threshold = keys.threshold; u.scale = keys.scale;
    u.vec = t.aligned16() && d.aligned16() && (uintptr_t)m.p % vec == 0;
    launch(dk, dim3{2, 1, 1}, dim3{64, 1, 1}, u);
    if (r) {
        View<T> sum(n, 0, 0xAC);
        dropout::UnfusedAddParams<T> a{};
        a.a = d.p; a.b = r->p; a.out = sum.p; a.n = n;
        a.vec = d.aligned16() && r->aligned16() && sum.aligned16();
        launch(ak, dim3{2, 1, 1}, dim3{64, 1, 1}, a);
        memcpy(d.p, sum.p, d.bytes());
    }
    drop::UnfusedMaskedScaleParams<T> s{};
    s.dy = dy.p; s.mask = m.p; s.dx = dx.p; s.n = n; s.scale = keys.scale;
    s.vec = dy.aligned16() && dx.aligned16() && (uintptr_t)m.p % vec == 0;
    launch(mk, dim3{2, 1, 1}, dim3{64, 1, 1}, s);
    put(out, "unfused_y", d);
    put(out, "unfused_mask", m);
    put(out, "unfused_dx", dx);
}
