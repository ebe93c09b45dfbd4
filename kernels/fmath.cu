// Evaluates the shared f32 math of common/fmath.cuh over an array, so the GPU tests can compare
// the device with src/fmath.rs bit for bit (tests/gpu/fmath.rs) over sweeps of the f32 range.
#include "common/fmath.cuh"

using namespace fusedreg;

// Function codes: must match fmath::Func in src/fmath/gpu.rs.
constexpr uint32_t FMATH_EXP = 0, FMATH_LN = 1, FMATH_ERF = 2, FMATH_TANH = 3, FMATH_SIGMOID = 4;

struct FmathEvalParams {
    const float* x;
    float* y;        // y[i] = f(x[i]); an unknown code leaves y as it was
    uint64_t n;
    uint32_t func;
    uint32_t pad;
};
static_assert(sizeof(FmathEvalParams) == 32, "must match src/fmath/gpu.rs");

extern "C" __global__ void fmath_eval(const FmathEvalParams p) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < p.n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const float x = p.x[i];
        switch (p.func) {
            case FMATH_EXP: p.y[i] = fr_exp(x); break;
            case FMATH_LN: p.y[i] = fr_log(x); break;
            case FMATH_ERF: p.y[i] = fr_erf(x); break;
            case FMATH_TANH: p.y[i] = fr_tanh(x); break;
            case FMATH_SIGMOID: p.y[i] = fr_sigmoid(x); break;
            default: break;
        }
    }
}
