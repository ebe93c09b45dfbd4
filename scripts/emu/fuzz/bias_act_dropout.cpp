// Fuzz driver of kernels/bias_act_dropout.cu (see fuzz.h; cases and checks in
// tests/emu_fuzz/bias_act_dropout.rs): the forward (h_out optional), the backward from x or from
// the saved h with the dbias partials and their finishing sum, with the geometry and the kernel
// choice of src/bias_act_dropout/gpu.rs (vector path exactly when it takes it; per-body vector
// kernels; Math::Exact or Fast; 32- or 16-bit keying); then the unfused baseline's six kernels.
#include "fuzz.h"

template <class T> struct K;
#define KS(T, S)                                                               \
    template <> struct K<T> {                                                  \
        /* gpu.rs families(): index [act][fast] (act: 0 GELU-erf, 1 GELU-tanh, 2 SiLU, 3 ReLU) */ \
        static constexpr decltype(&bias_act_dropout_fwd_vec_##S) fv[4][2] = {                     \
            {bias_act_dropout_fwd_vec_##S, bias_act_dropout_fwd_vec_gelu_erf_fast_##S},           \
            {bias_act_dropout_fwd_vec_##S, bias_act_dropout_fwd_vec_gelu_tanh_fast_##S},          \
            {bias_act_dropout_fwd_vec_##S, bias_act_dropout_fwd_vec_silu_fast_##S},               \
            {bias_act_dropout_fwd_vec_relu_##S, bias_act_dropout_fwd_vec_relu_##S}};              \
        /* the per-body backwards are one kernel per keying: [act][fast][32-, 16-, 8-bit keys]  \
           (gpu.rs by_keying); the exact bodies' kernel takes every keying */                    \
        static constexpr decltype(&bias_act_dropout_bwd_vec_##S) bv[4][2][3] = {                  \
            {{bias_act_dropout_bwd_vec_##S, bias_act_dropout_bwd_vec_##S, bias_act_dropout_bwd_vec_##S}, \
             {bias_act_dropout_bwd_vec_gelu_erf_fast_##S, bias_act_dropout_bwd_vec_gelu_erf_fast_k16_##S, \
              bias_act_dropout_bwd_vec_gelu_erf_fast_k8_##S}},                                   \
            {{bias_act_dropout_bwd_vec_##S, bias_act_dropout_bwd_vec_##S, bias_act_dropout_bwd_vec_##S}, \
             {bias_act_dropout_bwd_vec_gelu_tanh_fast_##S, bias_act_dropout_bwd_vec_gelu_tanh_fast_k16_##S, \
              bias_act_dropout_bwd_vec_gelu_tanh_fast_k8_##S}},                                  \
            {{bias_act_dropout_bwd_vec_##S, bias_act_dropout_bwd_vec_##S, bias_act_dropout_bwd_vec_##S}, \
             {bias_act_dropout_bwd_vec_silu_fast_##S, bias_act_dropout_bwd_vec_silu_fast_k16_##S, \
              bias_act_dropout_bwd_vec_silu_fast_k8_##S}},                                       \
            {{bias_act_dropout_bwd_vec_relu_##S, bias_act_dropout_bwd_vec_relu_k16_##S, bias_act_dropout_bwd_vec_relu_k8_##S}, \
             {bias_act_dropout_bwd_vec_relu_##S, bias_act_dropout_bwd_vec_relu_k16_##S, bias_act_dropout_bwd_vec_relu_k8_##S}}}; \
        static constexpr decltype(&bias_act_dropout_fwd_scalar_##S) fs[2] = {                     \
            bias_act_dropout_fwd_scalar_##S, bias_act_dropout_fwd_scalar_fast_##S};               \
        static constexpr decltype(&bias_act_dropout_bwd_scalar_##S) bs[2] = {                     \
            bias_act_dropout_bwd_scalar_##S, bias_act_dropout_bwd_scalar_fast_##S};               \
        static constexpr auto db = bias_act_dropout_dbias_##S;                 \
        static constexpr auto ub = bias_act_dropout_unfused_bias_add_##S;      \
        static constexpr auto ua = bias_act_dropout_unfused_act_##S;           \
        static constexpr auto ud = bias_act_dropout_unfused_dropout_##S;       \
        static constexpr auto um = bias_act_dropout_unfused_masked_scale_##S;  \
        static constexpr auto ug = bias_act_dropout_unfused_act_grad_##S;      \
        static constexpr auto uc = bias_act_dropout_unfused_col_sum_##S;       \
    };
KS(float, f32) KS(__half, f16) KS(__nv_bfloat16, bf16)

constexpr unsigned BX = 64, BY = 4;  // gpu.rs BLOCK_X, mod.rs LANES

template <class T> static void run(In& in, Out& out) {
    const uint64_t rows = in.u64("rows"), cols = in.u64("cols"), slab = in.u64("slab_rows");
    const uint64_t seed = in.u64("seed"), call = in.u64("call"), threshold = in.u64("threshold");
    const float scale = in.f32("scale"), keep_frac = in.f32("keep_frac"), log2_scale = in.f32("log2_scale");
    const float log2_keep = in.f32("log2_keep");
    const uint32_t act = (uint32_t)in.u64("act"), math = (uint32_t)in.u64("math"), flags = (uint32_t)in.u64("flags");
    const bool from_h = in.flag("from_h"), want_dbias = in.flag("dbias");
    View<T> x = in_view<T>(in, "x"), b = in_view<T>(in, "bias"), dy = in_view<T>(in, "dy");  // bias empty: none
    const uint64_t y_off = in.u64("y_off"), h_off = in.u64("h_off"), dx_off = in.u64("dx_off");
    const bool h_out = in.flag("h_out");
    const uint64_t n = rows * cols;
    View<T> y(n, y_off, 0xEE), h(n, h_off, 0xEE), dx(n, dx_off, 0xDD);

    // gpu.rs geometry(): one vector per thread when every pointer is 16-byte aligned and rows
    // start on a vector.
    auto tiles_of = [&](bool vec) {
        const uint64_t per = vec ? 16 / sizeof(T) : 1;
        return (unsigned)std::max<uint64_t>(((cols + per - 1) / per + BX - 1) / BX, 1);
    };
    const unsigned slabs = (unsigned)std::max<uint64_t>((rows + slab - 1) / slab, 1);
    const bool fvec = x.aligned16() && y.aligned16() && (!h_out || h.aligned16()) && cols % (16 / sizeof(T)) == 0;
    BiasActDropoutFwdParams p{};
    p.x = x.p; p.bias = b.n ? b.p : nullptr; p.y = y.p; p.h_out = h_out ? h.p : nullptr;
    p.rows = rows; p.cols = cols; p.slab_rows = slab; p.seed = seed; p.call = call; p.threshold = threshold;
    p.scale = scale; p.keep_frac = keep_frac; p.log2_scale = log2_scale; p.act = act; p.math = math; p.flags = flags;
    if (n) launch(fvec ? K<T>::fv[act][math] : K<T>::fs[math], dim3{tiles_of(fvec), slabs, 1}, dim3{BX, BY, 1}, p);
    put(out, "y", y);
    put(out, "h", h_out ? h : View<T>());

    std::vector<float> part(want_dbias ? std::max<uint64_t>(slabs * cols, 1) : 1, -9.f);
    const bool bvec = dy.aligned16() && dx.aligned16() && (from_h ? h.aligned16() : x.aligned16()) &&
                      cols % (16 / sizeof(T)) == 0;
    BiasActDropoutBwdParams q{};
    q.dy = dy.p; q.x = from_h ? nullptr : x.p; q.bias = from_h || !b.n ? nullptr : b.p;
    q.h = from_h ? h.p : nullptr; q.dx = dx.p; q.partials = want_dbias ? part.data() : nullptr;
    q.rows = rows; q.cols = cols; q.slab_rows = slab; q.seed = seed; q.call = call;
    q.threshold = threshold; q.scale = scale; q.act = act; q.math = math; q.flags = flags;
    q.keep_frac = keep_frac; q.log2_keep = log2_keep;
    const int kk = (flags & drop::FLAG_KEY8) ? 2 : (flags & drop::FLAG_KEY16) ? 1 : 0;
    if (n) launch(bvec ? K<T>::bv[act][math][kk] : K<T>::bs[math], dim3{tiles_of(bvec), slabs, 1}, dim3{BX, BY, 1}, q);
    put(out, "dx", dx);
    View<T> dbias(want_dbias ? cols : 0, 0, 0xCC);
    if (want_dbias && cols) {
        // No rows: gpu.rs finishes dbias from zero slabs.
        drop::DbiasParams<T> d{n ? part.data() : nullptr, dbias.p, cols, n ? slabs : 0u};
        launch(K<T>::db, dim3{(unsigned)std::min<uint64_t>((cols + 31) / 32, 3), 1, 1}, dim3{256, 1, 1}, d);
    }
    put(out, "dbias", dbias);

    // The unfused baseline (needs a bias and 32-bit keying; always the exact arithmetic):
    // grid-stride loops, any grid.
    if (b.n && n && !(flags & drop::FLAG_KEY16)) {
        View<T> uh(n, 0, 1), ua(n, 0, 2), uy(n, 0, 3), ugg(n, 0, 4), udx(n, 0, 5), udb(cols, 0, 6);
        View<uint8_t> m(n, 0, 7);
        BiasActDropoutUnfusedParams u{};
        u.n = n; u.cols = cols; u.seed = seed; u.call = call; u.threshold = threshold; u.scale = scale; u.act = act;
        auto go = [&](auto k, const void* a, const void* bb, void* o, uint8_t* mask) {
            BiasActDropoutUnfusedParams v = u;
            v.a = a; v.b = bb; v.out = o; v.mask = mask;
            launch(k, dim3{2, 1, 1}, dim3{64, 1, 1}, v);
        };
        go(K<T>::ub, x.p, b.p, uh.p, nullptr);
        go(K<T>::ua, uh.p, nullptr, ua.p, nullptr);
        go(K<T>::ud, ua.p, nullptr, uy.p, m.p);
        go(K<T>::um, dy.p, m.p, ugg.p, nullptr);
        go(K<T>::ug, ugg.p, uh.p, udx.p, nullptr);
        go(K<T>::uc, udx.p, nullptr, udb.p, nullptr);
        put(out, "unfused_h", uh);
        put(out, "unfused_y", uy);
        put(out, "unfused_mask", m);
        put(out, "unfused_dx", udx);
        put(out, "unfused_dbias", udb);
    }
}

void run_case(In& in, Out& out) {
    switch (in.u64("dtype")) {
        case 0: run<float>(in, out); break;
        case 1: run<__half>(in, out); break;
        default: run<__nv_bfloat16>(in, out); break;
    }
}
