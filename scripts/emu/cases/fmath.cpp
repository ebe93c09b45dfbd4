// Host emulation of kernels/fmath.cu (see compare.sh): each function of common/fmath.cuh over
// every 9973rd f32 bit pattern and every 3rd subnormal pattern (both signs), one output hash per
// function and sweep. tests/fmath.rs recomputes the same hashes from src/fmath.rs and compares
// them with golden/fmath.txt, so CI checks the device code against the CPU code without a GPU.
#include "harness.h"

static const char* NAMES[] = {"exp", "ln", "erf", "tanh", "sigmoid"};

static std::vector<float> sweep(int which) {
    std::vector<float> xs;
    if (which == 0) {
        for (uint64_t b = 0; b < (1ull << 32); b += 9973) xs.push_back(__uint_as_float((uint32_t)b));
    } else {
        for (uint32_t b = 0; b < 0x00800000u; b += 3) {
            xs.push_back(__uint_as_float(b));
            xs.push_back(__uint_as_float(b | 0x80000000u));
        }
    }
    return xs;
}

int main(int argc, char** argv) {
    const int part = argc > 1 ? atoi(argv[1]) : 0, parts = argc > 2 ? atoi(argv[2]) : 1;
    int k = 0;
    for (int which = 0; which < 2; ++which) {
        const std::vector<float> xs = sweep(which);
        for (uint32_t f = 0; f < 5; ++f, ++k) {
            if (k % parts != part) continue;
            std::vector<float> y(xs.size(), 0.0f);
            FmathEvalParams p{xs.data(), y.data(), xs.size(), f, 0};
            launch(fmath_eval, dim3(4, 1, 1), dim3(32, 1, 1), p);
            printf("%s sweep %d n %zu | y %016llx\n", NAMES[f], which, xs.size(),
                   (unsigned long long)fnv(y.data(), y.size() * 4));
        }
    }
    return 0;
}
