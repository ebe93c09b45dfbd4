// Fuzz driver of kernels/adamw.cu (see fuzz.h; cases and checks in tests/emu_fuzz/adamw.rs): one
// step over a set whose state (moments, master weights, step counts) comes from the case, with
// the tables built as src/multi_tensor and src/adamw build them (state arenas at multiples of 64
// elements), the launch split at a random block offset; then the init-master kernel.
#include "fuzz.h"

template <class P, class G, int L> struct K;
#define AW_K(P, PS, G, GS, L, SUF) \
    template <> struct K<P, G, L> { static constexpr auto step = adamw_p##PS##_g##GS##SUF; };
#define AW_KG(P, PS, L, SUF) \
    AW_K(P, PS, float, f32, L, SUF) AW_K(P, PS, __half, f16, L, SUF) AW_K(P, PS, __nv_bfloat16, bf16, L, SUF)
AW_KG(float, f32, 0, ) AW_KG(__half, f16, 0, ) AW_KG(__nv_bfloat16, bf16, 0, )
AW_KG(float, f32, 1, _mbf16) AW_KG(__half, f16, 1, _mbf16) AW_KG(__nv_bfloat16, bf16, 1, _mbf16)
AW_KG(__half, f16, 2, _nomaster) AW_KG(__nv_bfloat16, bf16, 2, _nomaster)
AW_KG(__half, f16, 3, _mbf16_nomaster) AW_KG(__nv_bfloat16, bf16, 3, _mbf16_nomaster)

constexpr uint64_t STATE_ALIGN = 64;  // multi_tensor::STATE_ALIGN

// L: bit 0 bf16 moments, bit 1 no master weights (16-bit params only).
template <class P, class G, int L> static void run(In& in, Out& out) {
    using M = std::conditional_t<(L & 1) != 0, __nv_bfloat16, float>;
    constexpr bool master = sizeof(P) == 2 && !(L & 2);
    const uint64_t count = in.u64("tensors");
    std::vector<View<P>> params;
    std::vector<View<G>> grads;
    std::vector<uint64_t> off;
    std::vector<uint32_t> steps;
    std::vector<float> wd;
    std::vector<mt::TensorEntry> tensors;
    std::vector<mt::BlockEntry> blocks;
    uint32_t chunks = 0;
    uint64_t arena = 0;
    // Inputs per tensor: param, grad, m, v, master (f32; moments rounded to M here), step, decay.
    std::vector<View<float>> m_in, v_in, master_in;
    for (uint64_t i = 0; i < count; ++i) {
        params.push_back(in_view<P>(in, "param"));
        grads.push_back(in_view<G>(in, "grad"));
        m_in.push_back(in_view<float>(in, "m"));
        v_in.push_back(in_view<float>(in, "v"));
        master_in.push_back(in_view<float>(in, "master"));
        steps.push_back((uint32_t)in.u64("step"));
        wd.push_back(in.f32("weight_decay"));
        mt::TensorEntry e{};
        e.param = (uint64_t)(uintptr_t)params.back().p;
        e.grad = (uint64_t)(uintptr_t)grads.back().p;
        e.n = params.back().n;
        // multi_tensor::entry_flags.
        const bool vec4 = e.param % (4 * sizeof(P)) == 0 && e.grad % (4 * sizeof(G)) == 0;
        e.flags = (vec4 ? mt::FLAG_VEC4 : 0u) | (e.grad % 16 == 0 ? mt::FLAG_GRAD16 : 0u);
        e.first_chunk = chunks;
        e.num_chunks = (uint32_t)((e.n + mt::CHUNK - 1) / mt::CHUNK);
        for (uint32_t c = 0; c < e.num_chunks; ++c) blocks.push_back({(uint32_t)i, c});
        chunks += e.num_chunks;
        tensors.push_back(e);
        off.push_back(arena);
        arena += (e.n + STATE_ALIGN - 1) / STATE_ALIGN * STATE_ALIGN;
    }
    if (blocks.empty()) blocks.push_back({0, 0});
    View<uint8_t> skip = in_view<uint8_t>(in, "skip");  // empty: none
    const float lr = in.f32("lr"), beta1 = in.f32("beta1"), beta2 = in.f32("beta2"), eps = in.f32("eps");
    const float grad_scale = in.f32("grad_scale");
    const bool has_gs = in.flag("has_grad_scale"), has_flag = in.flag("has_flag");
    const uint32_t flag = (uint32_t)in.u64("flag");
    const bool stochastic = in.flag("stochastic");
    const uint64_t seed = in.u64("seed");
    const uint32_t split = (uint32_t)std::min<uint64_t>(in.u64("split"), chunks);

    View<M> m(std::max<uint64_t>(arena, 1), 0, 0), v(std::max<uint64_t>(arena, 1), 0, 0);
    View<float> ms(master ? std::max<uint64_t>(arena, 1) : 0, 0, 0);
    std::vector<uint32_t> chunk_steps(std::max<uint32_t>(chunks, 1), 0);
    std::vector<AdamWTensor> table(count);
    for (uint64_t i = 0; i < count; ++i) {
        for (uint64_t j = 0; j < tensors[i].n; ++j) {
            m.p[off[i] + j] = from_f32<M>(m_in[i].p[j]);
            v.p[off[i] + j] = from_f32<M>(v_in[i].p[j]);
            if (master) ms.p[off[i] + j] = master_in[i].p[j];
        }
        for (uint32_t c = 0; c < tensors[i].num_chunks; ++c) chunk_steps[tensors[i].first_chunk + c] = steps[i];
        table[i].m = (uint64_t)(uintptr_t)(m.p + off[i]);
        table[i].v = (uint64_t)(uintptr_t)(v.p + off[i]);
        table[i].master = master ? (uint64_t)(uintptr_t)(ms.p + off[i]) : 0;
        table[i].weight_decay = wd[i];
    }

    AdamWParams p{};
    p.tensors = tensors.data();
    p.blocks = blocks.data();
    p.state = table.data();
    p.chunk_steps = chunk_steps.data();
    p.skip = skip.n ? skip.p : nullptr;
    p.lr = &lr;
    p.grad_scale = has_gs ? &grad_scale : nullptr;
    p.nonfinite = has_flag ? &flag : nullptr;
    p.seed = seed;
    p.beta1 = beta1;
    p.beta2 = beta2;
    p.eps = eps;
    p.stochastic = stochastic && sizeof(P) == 2 ? 1u : 0u;
    if (split) { p.block_offset = 0; launch(K<P, G, L>::step, dim3{split, 1, 1}, dim3{ADAMW_THREADS, 1, 1}, p); }
    if (chunks > split) {
        p.block_offset = split;
        launch(K<P, G, L>::step, dim3{chunks - split, 1, 1}, dim3{ADAMW_THREADS, 1, 1}, p);
    }
    for (uint64_t i = 0; i < count; ++i) {
        std::vector<float> mo(tensors[i].n), vo(tensors[i].n), mso(master ? tensors[i].n : 0);
        for (uint64_t j = 0; j < tensors[i].n; ++j) {
            mo[j] = to_f32(m.p[off[i] + j]);
            vo[j] = to_f32(v.p[off[i] + j]);
            if (master) mso[j] = ms.p[off[i] + j];
        }
        put(out, "param", params[i]);
        put(out, "m", mo);
        put(out, "v", vo);
        put(out, "master", mso);
    }
    chunk_steps.resize(chunks);
    put(out, "chunk_steps", chunk_steps);

    // The init-master kernel (16-bit params with master weights): master = f32(param).
    if constexpr (master) {
        View<float> fresh(std::max<uint64_t>(arena, 1), 0, 0xEE);
        for (uint64_t i = 0; i < count; ++i) table[i].master = (uint64_t)(uintptr_t)(fresh.p + off[i]);
        if (chunks) {
            InitMasterParams ip{tensors.data(), blocks.data(), table.data(), 0, 0};
            if constexpr (std::is_same_v<P, __half>)
                launch(adamw_init_master_f16, dim3{chunks, 1, 1}, dim3{ADAMW_THREADS, 1, 1}, ip);
            else
                launch(adamw_init_master_bf16, dim3{chunks, 1, 1}, dim3{ADAMW_THREADS, 1, 1}, ip);
        }
        for (uint64_t i = 0; i < count; ++i) out.put("init_master", fresh.p + off[i], tensors[i].n * 4);
    }
}

template <class P, int L> static void by_grad(In& in, Out& out, uint64_t g) {
    if (g == 0) run<P, float, L>(in, out);
    else if (g == 1) run<P, __half, L>(in, out);
    else run<P, __nv_bfloat16, L>(in, out);
}

template <class P> static void by_layout(In& in, Out& out, uint64_t g, uint64_t layout) {
    if (layout == 0) by_grad<P, 0>(in, out, g);
    else if (layout == 1) by_grad<P, 1>(in, out, g);
    else if constexpr (sizeof(P) == 2) {
        if (layout == 2) by_grad<P, 2>(in, out, g);
        else by_grad<P, 3>(in, out, g);
    } else in.bad("f32 parameters have no layout without master weights");
}

void run_case(In& in, Out& out) {
    const uint64_t pd = in.u64("param_dtype"), gd = in.u64("grad_dtype"), layout = in.u64("layout");
    if (pd == 0) by_layout<float>(in, out, gd, layout);
    else if (pd == 1) by_layout<__half>(in, out, gd, layout);
    else by_layout<__nv_bfloat16>(in, out, gd, layout);
}
