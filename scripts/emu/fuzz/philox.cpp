// Fuzz driver of kernels/philox.cu (see fuzz.h; cases and checks in tests/emu_fuzz/philox.rs):
// the generator on (counter, key) pairs and the mask keying over a run of 64-bit indices.
#include "fuzz.h"

void run_case(In& in, Out& out) {
    const unsigned grid = (unsigned)in.u64("grid"), block = (unsigned)in.u64("block");
    View<uint32_t> counters = in_view<uint32_t>(in, "counters"), keys = in_view<uint32_t>(in, "keys");
    const uint64_t pairs = counters.n / 4;
    View<uint32_t> words(4 * pairs, 0, 0xEE);
    launch(philox_fill, dim3{grid, 1, 1}, dim3{block, 1, 1}, PhiloxFillParams{counters.p, keys.p, words.p, pairs});
    put(out, "blocks", words);

    MaskWordsParams m{};
    m.seed = in.u64("seed");
    m.call = in.u64("call");
    m.start = in.u64("start");
    m.n = in.u64("n");
    View<uint32_t> mw(m.n, in.u64("off"), 0xEE);
    m.out = mw.p;
    launch(philox_mask_words, dim3{grid, 1, 1}, dim3{block, 1, 1}, m);
    put(out, "mask_words", mw);
}
