// Fuzz driver of kernels/cross_entropy.cu (see fuzz.h; cases and checks in
// tests/emu_fuzz/cross_entropy.rs): the count kernel (mean), the fused loss-and-gradient kernel
// of either math mode (gradient none, separate or in place; vector path exactly when
// src/cross_entropy/gpu.rs takes it), the loss sum over its chunk levels, then the unfused baseline on the same logits.
#include <cstdint>
// The count kernel's integer atomic (exact in any order) is shim.h's.
#include "fuzz.h"

template <class T, class TI> struct K;
#define KS(T, S, TI, TS)                                                       \
    template <> struct K<T, TI> {                                              \
        static constexpr auto fused = cross_entropy_fused_##S##_##TS;          \
        static constexpr auto fast = cross_entropy_fused_fast_##S##_##TS;      \
        static constexpr auto nll = cross_entropy_unfused_nll_##S##_##TS;      \
        static constexpr auto bwd = cross_entropy_unfused_backward_##S##_##TS; \
        static constexpr auto lsm = cross_entropy_unfused_log_softmax_##S;     \
        static constexpr auto count = cross_entropy_count_##TS;                \
    };
KS(float, f32, int32_t, ti32) KS(__half, f16, int32_t, ti32) KS(__nv_bfloat16, bf16, int32_t, ti32)
KS(float, f32, int64_t, ti64) KS(__half, f16, int64_t, ti64) KS(__nv_bfloat16, bf16, int64_t, ti64)

// gpu.rs reduce_losses: levels of CHUNK-row blocks until one value is left.
static float reduce(const float* rows, uint64_t n, unsigned long long* nv, bool mean) {
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

template <class T, class TI> static void run(In& in, Out& out) {
    const uint64_t rows = in.u64("rows"), vocab = in.u64("vocab"), grid = in.u64("grid");
    const int grad_mode = (int)in.u64("grad"), red = (int)in.u64("reduction");
    const float alpha = in.f32("alpha"), lambda = in.f32("lambda");
    const int64_t ignore = (int64_t)in.u64("ignore_index");
    const bool fast = in.flag("fast");
    View<T> x = in_view<T>(in, "logits");
    const View<T> x0 = x;  // the unfused baseline's input (the fused kernel may write over x)
    View<int64_t> t64 = in_view<int64_t>(in, "targets");
    View<float> up = in_view<float>(in, "upstream");  // empty: none
    const uint64_t grad_off = in.u64("grad_off");
    std::vector<TI> t(rows);
    for (uint64_t r = 0; r < rows; ++r) t[r] = (TI)t64.p[r];
    const uint64_t n = rows * vocab;
    View<T> gr(n, grad_off, 0xEE);
    std::vector<float> loss_rows(rows, -3.f);
    unsigned long long nv = 0;
    unsigned flag = 0;

    if (red == 2) {
        CountParams q{};
        q.targets = (uint64_t)t.data(); q.n_valid = (uint64_t)&nv; q.rows = rows; q.vocab = vocab; q.ignore_index = ignore;
        const unsigned cg = (unsigned)std::min<uint64_t>(std::max<uint64_t>((rows + SLOTS - 1) / SLOTS, 1), 1024);
        launch(K<T, TI>::count, dim3{cg, 1, 1}, dim3{SLOTS, 1, 1}, q);
    }
    FusedParams p{};
    p.logits = (uint64_t)x.p;
    p.grad = grad_mode == 2 ? (uint64_t)x.p : grad_mode == 1 ? (uint64_t)gr.p : 0;
    p.targets = (uint64_t)t.data();
    p.loss_rows = (uint64_t)loss_rows.data();
    p.upstream = (uint64_t)up.p;
    p.n_valid = (uint64_t)&nv;
    p.flag = (uint64_t)&flag;
    p.rows = rows; p.vocab = vocab; p.ignore_index = ignore;
    p.conf = 1.f - alpha; p.alpha = alpha; p.eps = alpha / (float)vocab; p.vocab_f = (float)vocab;
    p.lambda = lambda; p.lam2 = 2.f * lambda;
    const bool vec = p.logits % 16 == 0 && (grad_mode == 0 || p.grad % 16 == 0) && (vocab * sizeof(T)) % 16 == 0;
    p.flags = (grad_mode ? FLAG_GRAD : 0u) | (vec ? FLAG_VEC : 0u) | (red == 2 ? FLAG_MEAN : 0u) |
              (red == 0 && up.n ? FLAG_UPSTREAM : 0u);
    if (rows) launch(fast ? K<T, TI>::fast : K<T, TI>::fused, dim3{(unsigned)grid, 1, 1}, dim3{SLOTS, 1, 1}, p);
    const float reduced = red && rows ? reduce(loss_rows.data(), rows, &nv, red == 2) : 0.f;
    put(out, "loss_rows", loss_rows);
    out.f32("reduced", reduced);
    out.u64("n_valid", nv);
    out.u64("flag", flag);
    if (grad_mode == 2) put(out, "grad", x);
    else if (grad_mode == 1) put(out, "grad", gr);
    else out.put("grad", nullptr, 0);

    // The unfused baseline: log-softmax, nll, backward (scalar or vector per its own rule).
    View<T> lp(n, 0, 0xAB), ug(n, 0, 0xBA);
    std::vector<float> lse(rows, -4.f), urows(rows, -3.f);
    UnfusedParams u{};
    u.x = (uint64_t)x0.p; u.y = (uint64_t)lp.p; u.targets = (uint64_t)t.data(); u.lse = (uint64_t)lse.data();
    u.loss_rows = (uint64_t)urows.data(); u.upstream = p.upstream; u.n_valid = p.n_valid;
    u.rows = rows; u.vocab = vocab; u.ignore_index = ignore;
    u.conf = p.conf; u.alpha = p.alpha; u.eps = p.eps; u.vocab_f = p.vocab_f; u.lambda = p.lambda; u.lam2 = p.lam2;
    u.flags = p.flags & (FLAG_MEAN | FLAG_UPSTREAM);
    if (rows) {
        launch(K<T, TI>::lsm, dim3{(unsigned)grid, 1, 1}, dim3{SLOTS, 1, 1}, u);
        UnfusedParams un = u; un.x = (uint64_t)lp.p; un.y = 0;
        launch(K<T, TI>::nll, dim3{(unsigned)grid, 1, 1}, dim3{SLOTS, 1, 1}, un);
        UnfusedParams ub = u; ub.x = (uint64_t)lp.p; ub.y = (uint64_t)ug.p;
        launch(K<T, TI>::bwd, dim3{(unsigned)grid, 1, 1}, dim3{SLOTS, 1, 1}, ub);
    }
    put(out, "unfused_loss_rows", urows);
    put(out, "unfused_grad", ug);
}

template <class T> static void by_target(In& in, Out& out, uint64_t ti) {
    if (ti == 4) run<T, int32_t>(in, out);
    else run<T, int64_t>(in, out);
}

void run_case(In& in, Out& out) {
    const uint64_t dt = in.u64("dtype"), ti = in.u64("target_bytes");
    if (dt == 0) by_target<float>(in, out, ti);
    else if (dt == 1) by_target<__half>(in, out, ti);
    else by_target<__nv_bfloat16>(in, out, ti);
}
