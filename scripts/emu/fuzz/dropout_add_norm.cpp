// Fuzz driver of kernels/dropout_add_norm.cu (see fuzz.h; cases and checks in
// tests/emu_fuzz/dropout_add_norm.rs): the forward (with or without residual, in place, the row
// cached in shared memory or not, a capped grid), the norm-only forward of the unfused baseline
// on the forward's stream, the backward (slab partials in shared or global memory) and the column
// sums, with the flags and geometry of src/dropout_add_norm/gpu.rs.
#include "fuzz.h"

template <class T, class S> struct K;
#define KS(T, S, NAME)                                           \
    template <> struct K<T, S> {                                 \
        static constexpr auto fwd = dropout_add_norm_fwd_##NAME; \
        static constexpr auto bwd = dropout_add_norm_bwd_##NAME; \
    };
KS(float, float, f32) KS(__half, __half, f16) KS(__nv_bfloat16, __nv_bfloat16, bf16)
KS(__half, float, f16_sf32) KS(__nv_bfloat16, float, bf16_sf32)
template <class T> struct C;
template <> struct C<float> { static constexpr auto colsum = dropout_add_norm_colsum_f32; };
template <> struct C<__half> { static constexpr auto colsum = dropout_add_norm_colsum_f16; };
template <> struct C<__nv_bfloat16> { static constexpr auto colsum = dropout_add_norm_colsum_bf16; };

static unsigned row_partials(uint64_t cols) {  // src/dropout_add_norm/mod.rs row_partials
    uint64_t g = (cols + GROUP - 1) / GROUP, p = 1;
    while (p < g) p <<= 1;
    return (unsigned)std::min<uint64_t>(std::max<uint64_t>(p, 32), 256);
}

template <class V> static bool al(const V& v) { return v.n == 0 || v.aligned16(); }

template <class T, class S> static void run(In& in, Out& out) {
    const uint64_t rows = in.u64("rows"), cols = in.u64("cols"), n = rows * cols;
    const uint64_t seed = in.u64("seed"), call = in.u64("call"), threshold = in.u64("threshold");
    const float scale = in.f32("scale");
    const uint32_t key_flags = (uint32_t)in.u64("key_flags");  // drop::FLAG_KEY16 / FLAG_KEY8
    const uint64_t path_call = in.u64("path_call"), path_threshold = in.u64("path_threshold");
    const float path_scale = in.f32("path_scale");
    const uint32_t rows_per_sample = (uint32_t)in.u64("rows_per_sample");
    const bool drop_path = in.flag("drop_path"), rms = in.flag("rms"), in_place = in.flag("in_place");
    const float eps = in.f32("eps"), layer_scale = in.f32("layer_scale");
    const unsigned max_grid = (unsigned)in.u64("max_grid");
    const bool fwd_smem = in.flag("fwd_smem"), bwd_smem = in.flag("bwd_smem");
    View<T> x = in_view<T>(in, "x");
    View<S> r = in_view<S>(in, "residual");  // empty: none
    View<T> bias = in_view<T>(in, "bias"), gamma = in_view<T>(in, "gamma"), beta = in_view<T>(in, "beta");
    View<float> rs = in_view<float>(in, "rowscale");
    View<T> d_out = in_view<T>(in, "d_out");
    View<S> d_s = in_view<S>(in, "d_s");
    const bool want_dres = in.flag("d_residual"), want_dbeta = in.flag("dbeta"), want_dbias = in.flag("dbias");
    const uint64_t out_off = in.u64("out_off"), s_off = in.u64("s_off"), dx_off = in.u64("dx_off");

    // Forward. In place, the stream buffer holds the residual on entry.
    View<S> s = in_place ? r : View<S>(n, s_off, 0x77);
    View<T> o(n, out_off, 0x77);
    std::vector<float> mean(rows, -5.f), rstd(rows, -5.f);
    FwdParams<T, S> p{};
    p.x = x.p;
    p.residual = in_place ? s.p : r.n ? r.p : nullptr;
    p.bias = bias.n ? bias.p : nullptr;
    p.gamma = gamma.p;
    p.beta = beta.n ? beta.p : nullptr;
    p.rowscale = rs.n ? rs.p : nullptr;
    p.out = o.p; p.s = s.p; p.mean = mean.data(); p.rstd = rstd.data();
    p.rows = rows; p.cols = cols; p.seed = seed; p.call = call; p.threshold = threshold;
    p.path_call = path_call; p.path_threshold = path_threshold; p.scale = scale; p.path_scale = path_scale;
    p.eps = eps; p.layer_scale = layer_scale;
    const bool fvec = cols % GROUP == 0 && al(x) && al(gamma) && al(beta) && al(bias) && al(r) && al(o) && al(s);
    p.flags = (drop_path ? FLAG_DROP_PATH : 0u) | (fvec ? FLAG_VEC : 0u) | (rms ? FLAG_RMS : 0u) | (beta.n ? FLAG_BETA : 0u) | (fwd_smem ? FLAG_SMEM : 0u) | key_flags;
    p.rows_per_sample = rows_per_sample;
    const unsigned block = row_partials(cols);
    const unsigned grid = (unsigned)std::min<uint64_t>(rows, max_grid);
    if (n) launch(K<T, S>::fwd, dim3{grid, 1, 1}, dim3{block, 1, 1}, p);
    put(out, "out", o);
    put(out, "s", s);
    put(out, "mean", mean);
    put(out, "rstd", rstd);

    // The norm-only forward (FLAG_NORM_ONLY) of the stream just written.
    View<T> o2(n, out_off, 0x66);
    std::vector<float> mean2(rows, -5.f), rstd2(rows, -5.f);
    FwdParams<T, S> q = p;
    q.x = nullptr; q.residual = nullptr; q.bias = nullptr; q.rowscale = nullptr;
    q.out = o2.p; q.mean = mean2.data(); q.rstd = rstd2.data();
    const bool nvec = cols % GROUP == 0 && al(gamma) && al(beta) && al(o2) && al(s);
    q.flags = (nvec ? FLAG_VEC : 0u) | (rms ? FLAG_RMS : 0u) | (beta.n ? FLAG_BETA : 0u) | FLAG_NORM_ONLY | (bwd_smem ? FLAG_SMEM : 0u);
    if (n) launch(K<T, S>::fwd, dim3{grid, 1, 1}, dim3{block, 1, 1}, q);
    put(out, "norm_only_out", o2);
    put(out, "norm_only_mean", mean2);
    put(out, "norm_only_rstd", rstd2);

    // Backward, one block per slab of colsum_slab_rows(rows) rows, then the column sums.
    const uint64_t slab_rows = std::max<uint64_t>(1, (rows + 1023) / 1024), slabs = (rows + slab_rows - 1) / slab_rows;
    View<T> dx(n, dx_off, 0x55), dgamma(cols, 0, 0x55), dbeta(want_dbeta ? cols : 0, 0, 0x55),
        dbias(want_dbias ? cols : 0, 0, 0x55);
    View<S> d_res(want_dres ? n : 0, 0, 0x55);
    std::vector<float> part(std::max<uint64_t>(3 * slabs * cols, 1), -9.f);
    BwdParams<T, S> b{};
    b.d_out = d_out.p; b.d_s = d_s.n ? d_s.p : nullptr; b.s = s.p; b.gamma = gamma.p;
    b.mean = mean.data(); b.rstd = rstd.data(); b.rowscale = p.rowscale;
    b.dx = dx.p; b.d_residual = want_dres ? d_res.p : nullptr; b.partials = part.data();
    b.rows = rows; b.cols = cols; b.slab_rows = slab_rows; b.slabs = slabs;
    b.seed = seed; b.call = call; b.threshold = threshold; b.path_call = path_call;
    b.path_threshold = path_threshold; b.scale = scale; b.path_scale = path_scale; b.layer_scale = layer_scale;
    const bool bvec = cols % GROUP == 0 && al(d_out) && al(d_s) && al(s) && al(gamma) && al(dx) && al(d_res);
    b.flags = (drop_path ? FLAG_DROP_PATH : 0u) | (bvec ? FLAG_VEC : 0u) | (rms ? FLAG_RMS : 0u) | (bwd_smem ? FLAG_SMEM : 0u) | key_flags |
              (want_dbeta ? FLAG_DBETA : 0u) | (want_dbias ? FLAG_DBIAS : 0u);
    b.rows_per_sample = rows_per_sample;
    if (n) launch(K<T, S>::bwd, dim3{(unsigned)slabs, 1, 1}, dim3{block, 1, 1}, b);
    ColsumParams<T> cs{};
    cs.partials = part.data(); cs.dgamma = dgamma.p; cs.dbeta = want_dbeta ? dbeta.p : nullptr;
    cs.dbias = want_dbias ? dbias.p : nullptr; cs.cols = cols; cs.slabs = slabs;
    // As src/dropout_add_norm/gpu.rs: a block per 32 columns, blockIdx.y picks dgamma / dbeta / dbias.
    if (cols) launch(C<T>::colsum, dim3{(unsigned)std::min<uint64_t>((cols + 31) / 32, 1u << 16), 3, 1}, dim3{256, 1, 1}, cs);
    put(out, "dx", dx);
    put(out, "d_residual", d_res);
    put(out, "dgamma", dgamma);
    put(out, "dbeta", dbeta);
    put(out, "dbias", dbias);
}

template <class T> static void by_stream(In& in, Out& out, bool f32_stream) {
    if constexpr (sizeof(T) == 2) {
        if (f32_stream) return run<T, float>(in, out);
    }
    run<T, T>(in, out);
}

void run_case(In& in, Out& out) {
    const uint64_t dt = in.u64("dtype");
    const bool f32_stream = in.flag("f32_stream");
    if (dt == 0) by_stream<float>(in, out, f32_stream);
    else if (dt == 1) by_stream<__half>(in, out, f32_stream);
    else by_stream<__nv_bfloat16>(in, out, f32_stream);
}
