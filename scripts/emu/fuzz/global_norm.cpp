// Fuzz driver of kernels/global_norm.cu (see fuzz.h; cases and checks in
// tests/emu_fuzz/global_norm.rs): a gradients-only set, its tables built as src/multi_tensor
// builds them, then the partials (split at a random block offset), the f64 reduce with or without
// the fused finalize, the separate finalize, the per-tensor norms and the scale pass.
#include "fuzz.h"

template <class G> struct K;
#define GN_K(G, S)                                                 \
    template <> struct K<G> {                                      \
        static constexpr auto partials = global_norm_partials_##S; \
        static constexpr auto scale = global_norm_scale_##S;       \
    };
GN_K(float, f32) GN_K(__half, f16) GN_K(__nv_bfloat16, bf16)

template <class G> static void run(In& in, Out& out) {
    const uint64_t count = in.u64("tensors");
    std::vector<View<G>> grads;
    std::vector<mt::TensorEntry> tensors;
    std::vector<mt::BlockEntry> blocks;
    uint32_t chunks = 0;
    for (uint64_t i = 0; i < count; ++i) {
        grads.push_back(in_view<G>(in, "grad"));
        const View<G>& g = grads.back();
        mt::TensorEntry e{};
        e.grad = (uint64_t)(uintptr_t)g.p;
        e.n = g.n;
        // multi_tensor::entry_flags for a set without parameters.
        e.flags = (e.grad % (4 * sizeof(G)) == 0 ? mt::FLAG_VEC4 : 0u) | (e.grad % 16 == 0 ? mt::FLAG_GRAD16 : 0u);
        e.first_chunk = chunks;
        e.num_chunks = (uint32_t)((e.n + mt::CHUNK - 1) / mt::CHUNK);
        for (uint32_t c = 0; c < e.num_chunks; ++c) blocks.push_back({(uint32_t)i, c});
        chunks += e.num_chunks;
        tensors.push_back(e);
    }
    if (blocks.empty()) blocks.push_back({0, 0});
    View<uint8_t> skip = in_view<uint8_t>(in, "skip");  // empty: no skip flags
    const uint32_t split = (uint32_t)std::min<uint64_t>(in.u64("split"), chunks);
    const bool fused = in.flag("fused"), clip = in.flag("clip"), device_coef = in.flag("device_coef");
    const float max_norm = in.f32("max_norm"), loss_scale = in.f32("loss_scale"), coef = in.f32("coef");
    const bool has_ls = in.flag("has_loss_scale");

    std::vector<float> partials(std::max<uint32_t>(chunks, 1), -3.f);
    PartialsParams pp{};
    pp.tensors = tensors.data();
    pp.blocks = blocks.data();
    pp.partials = partials.data();
    pp.skip = skip.n ? skip.p : nullptr;
    if (split) { pp.block_offset = 0; launch(K<G>::partials, dim3{split, 1, 1}, dim3{NORM_THREADS, 1, 1}, pp); }
    if (chunks > split) {
        pp.block_offset = split;
        launch(K<G>::partials, dim3{chunks - split, 1, 1}, dim3{NORM_THREADS, 1, 1}, pp);
    }
    partials.resize(chunks);
    put(out, "partials", partials);

    NormResult res;
    memset(&res, 0xAB, sizeof res);
    ReduceParams rp{};
    rp.partials = partials.data();
    rp.count = chunks;
    rp.result = &res;
    rp.loss_scale = has_ls ? &loss_scale : nullptr;
    rp.max_norm = max_norm;
    rp.flags = fused ? (REDUCE_FINALIZE | (clip ? REDUCE_CLIP : 0u)) : 0u;
    launch(global_norm_reduce, dim3{1, 1, 1}, dim3{REDUCE_THREADS, 1, 1}, rp);
    if (!fused) {
        FinalizeParams fp{&res, has_ls ? &loss_scale : nullptr, max_norm, clip ? 1u : 0u};
        launch(global_norm_finalize, dim3{1, 1, 1}, dim3{32, 1, 1}, fp);
    }
    out.put("result", &res, sizeof res);

    std::vector<double> sumsq(count, -1.0);
    std::vector<float> norms(count, -1.f);
    if (count) {
        PerTensorParams tp{tensors.data(), partials.data(), sumsq.data(), norms.data(), (uint32_t)count, 0};
        const unsigned per_grid = (unsigned)((count + PER_TENSOR_THREADS / 32 - 1) / (PER_TENSOR_THREADS / 32));
        launch(global_norm_per_tensor, dim3{per_grid, 1, 1}, dim3{PER_TENSOR_THREADS, 1, 1}, tp);
    }
    put(out, "sumsq", sumsq);
    put(out, "norms", norms);

    if (chunks) {
        ScaleParams sp{};
        sp.tensors = tensors.data();
        sp.blocks = blocks.data();
        sp.coef_ptr = device_coef ? &res.coef : nullptr;
        sp.nonfinite = device_coef ? &res.nonfinite : nullptr;
        sp.coef = coef;
        sp.block_offset = 0;
        launch(K<G>::scale, dim3{chunks, 1, 1}, dim3{SCALE_THREADS, 1, 1}, sp);
    }
    for (const View<G>& g : grads) put(out, "scaled", g);
}

void run_case(In& in, Out& out) {
    switch (in.u64("dtype")) {
        case 0: run<float>(in, out); break;
        case 1: run<__half>(in, out); break;
        default: run<__nv_bfloat16>(in, out); break;
    }
}
