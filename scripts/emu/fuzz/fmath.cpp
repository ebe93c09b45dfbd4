// Fuzz driver of kernels/fmath.cu (see fuzz.h; cases and checks in tests/emu_fuzz/fmath.rs):
// one function of common/fmath.cuh over an array of f32 bit patterns.
#include "fuzz.h"

void run_case(In& in, Out& out) {
    const unsigned grid = (unsigned)in.u64("grid"), block = (unsigned)in.u64("block");
    const uint32_t func = (uint32_t)in.u64("func");
    View<float> x = in_view<float>(in, "x");
    View<float> y(x.n, in.u64("y_off"), 0xEE);
    launch(fmath_eval, dim3{grid, 1, 1}, dim3{block, 1, 1}, FmathEvalParams{x.p, y.p, x.n, func, 0});
    put(out, "y", y);
}
