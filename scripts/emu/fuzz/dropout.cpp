// Fuzz driver of kernels/dropout.cu (see fuzz.h and dropping.h; cases and checks in
// tests/emu_fuzz/dropping.rs): the forward with or without a residual (separate or in place;
// bias, row scale given or a drop path, the 1-bit mask, the generated row scale, 32- or 16-bit
// keying) with the launch plan of src/dropout/gpu.rs under a random LaunchTuning; the backward
// regenerated and from the mask, with dbias; the unfused baseline's dropout, residual add and
// masked scale.
#include "dropping.h"

template <class T> struct K;
#define KS(T, S)                                                                                       \
    template <> struct K<T> {                                                                          \
        static constexpr auto fv = dropout_fwd_vec_##S;                                                \
        static constexpr auto fs = dropout_fwd_scalar_##S;                                             \
        static constexpr auto rv = dropout_fwd_res_vec_##S;                                            \
        static constexpr auto rs = dropout_fwd_res_scalar_##S;                                         \
        static constexpr auto add = dropout_unfused_add_##S;                                           \
        static constexpr BwdKernels<T> bwd{dropout_bwd_vec_##S, dropout_bwd_scalar_##S, dropout_dbias_##S}; \
        static constexpr auto ud = dropout_unfused_dropout_##S;                                        \
        static constexpr auto um = dropout_unfused_masked_scale_##S;                                   \
    };
KS(float, f32) KS(__half, f16) KS(__nv_bfloat16, bf16)

template <class T> static void run(In& in, Out& out) {
    const uint64_t rows = in.u64("rows"), cols = in.u64("cols"), n = rows * cols, dbias_slab = in.u64("dbias_slab_rows");
    const Keys keys = read_keys(in);
    const Tuning t = read_tuning(in);
    View<T> x = in_view<T>(in, "x"), bias = in_view<T>(in, "bias"), dy = in_view<T>(in, "dy");
    View<T> r = in_view<T>(in, "residual");  // empty: none
    const bool residual = in.flag("has_residual");
    const bool in_place = in.flag("in_place") && residual;  // read in order, always
    View<float> rs = in_view<float>(in, "rowscale");  // empty: none
    const bool want_mask = in.flag("mask_out"), want_rs_out = in.flag("rowscale_out"), want_dbias = in.flag("dbias");
    const uint64_t y_off = in.u64("y_off");
    View<T> y = in_place ? r : View<T>(n, y_off, 0xEE), dx(n, in.u64("dx_off"), 0xDD);
    const uint64_t words = (n + 31) / 32;
    View<uint32_t> mask(want_mask ? words : 0, 0, 0xEF);
    std::vector<float> rs_out(want_rs_out ? rows : 0, -7.f);

    // src/dropout/gpu.rs forward.
    const bool rows_matter = bias.n || rs.n || keys.drop_path;
    const bool aligned = x.aligned16() && y.aligned16() && (!residual || r.aligned16()) && (!bias.n || bias.aligned16());
    std::vector<std::pair<Seg, Geo>> plan;
    for (const Seg& s : segments<T>(rows, cols, rows_matter, aligned, t)) {
        const bool mask_ok = !want_mask || sizeof(T) != 4 || s.cols % 8 == 0 || s.rows == 1;
        plan.push_back({s, geometry<T>(s.rows, s.cols, aligned, mask_ok, Slabs::Free, residual ? 4 : 8, dbias_slab, t)});
    }
    bool any_scalar = false;
    for (const auto& [s, g] : plan) any_scalar |= !g.vector;
    if (want_mask && any_scalar && words) memset(mask.p, 0, words * 4);  // the scalar path ORs bits in
    for (const auto& [s, g] : plan) {
        if (!n) break;
        dropout::FwdParams<T> p{};
        p.x = x.p + s.base; p.bias = bias.n ? bias.p : nullptr; p.y = y.p + s.base;
        p.residual = residual ? (in_place ? y.p : r.p) + s.base : nullptr;
        p.rowscale = rs.n ? rs.p : nullptr; p.rowscale_out = want_rs_out ? rs_out.data() : nullptr;
        p.mask = want_mask ? mask.p + s.base / 32 : nullptr;
        p.rows = g.rows; p.cols = g.cols; p.slab_rows = g.slab_rows;
        p.seed = keys.seed; p.call = keys.call; p.threshold = keys.threshold;
        p.path_call = keys.path_call; p.path_threshold = keys.path_threshold; p.base = s.base;
        p.scale = keys.scale; p.path_scale = keys.path_scale;
        p.flags = keys.flags | (t.unroll ? 2u : 0u) | (in_place ? 4u : 0u); p.rows_per_sample = keys.rows_per_sample;
        launch(residual ? (g.vector ? K<T>::rv : K<T>::rs) : (g.vector ? K<T>::fv : K<T>::fs), g.grid, g.block, p);
    }
    put(out, "y", y);
    put(out, "mask", mask);
    put(out, "rowscale_out", rs_out);

    // Backward, regenerated and (with a mask) from the mask.
    for (int from_mask = 0; from_mask < 1 + (want_mask ? 1 : 0); ++from_mask) {
        View<T> d(n, dx.off, 0xDD), db(want_dbias ? cols : 0, 0, 0xCC);
        if (n) run_backward<T>(K<T>::bwd, t, keys, rows, cols, dbias_slab, rs.n ? rs.p : nullptr,
                               from_mask ? mask.p : nullptr, dy, d, want_dbias ? &db : nullptr);
        else if (want_dbias && cols) memset(db.p, 0, db.bytes());  // gpu.rs: no rows, zero dbias
        put(out, "dx", d);
        put(out, "dbias", db);
    }
    const bool unfused = n && !rs.n && !keys.drop_path && !(keys.flags & 24u) && !bias.n;
    if (unfused) run_unfused<T>(K<T>::ud, K<T>::um, residual ? K<T>::add : nullptr, keys, x, residual ? &r : nullptr, dy, out);
}

void run_case(In& in, Out& out) {
    switch (in.u64("dtype")) {
        case 0: run<float>(in, out); break;
        case 1: run<__half>(in, out); break;
        default: run<__nv_bfloat16>(in, out); break;
    }
}
