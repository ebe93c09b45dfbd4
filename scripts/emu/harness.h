// What every emulated kernel file shares (see compare.sh): the launcher that runs a grid on host
// threads, the output hash, and portable random inputs. A case file includes this, then the
// kernel file under test (KFILE), then defines main(part, parts) printing one line per case.
#pragma once
#include "shim.h"
#include <random>
#include <type_traits>
#include <string>
#include <thread>

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
EmuBlock* emu_block;
std::atomic<long> emu_warp_calls;


template <class P> void launch(void (*k)(P), dim3 grid, dim3 block, const P& p) {
    const unsigned nt = block.x * block.y;
    if (block.x % 32 || nt == 0 || nt > 1024) { printf("bad block\n"); abort(); }
    blockDim = block;
    gridDim = grid;
    EmuBlock b(nt);
    emu_block = &b;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < nt; ++t)
        ts.emplace_back([&, t] {
            threadIdx = {t % block.x, t / block.x, 0};
            for (unsigned y = 0; y < grid.y; ++y)
                for (unsigned x = 0; x < grid.x; ++x) {
                    blockIdx = {x, y, 0};
                    k(p);
                    b.block_bar.arrive_and_wait();
                }
        });
    for (auto& t : ts) t.join();
}

static uint64_t fnv(const void* d, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; ++i) h = (h ^ ((const uint8_t*)d)[i]) * 1099511628211ull;
    return h;
}

// A float in [lo, hi) from 24 random bits: spelled out (std::uniform_real_distribution is not
// the same across standard libraries, and the golden hashes must not depend on the host).
static float uniform(std::mt19937_64& g, float lo, float hi) {
    return lo + (hi - lo) * ((float)(g() >> 40) * 0x1p-24f);
}

#include KFILE
#include "common/dtype.cuh"

// Random element bits of T: mostly moderate finite values, some zeros, infinities and NaNs (with
// random signs and payloads) when `specials`. Shared by the dropout case files.
template <class T> static void fill_bits(std::vector<uint8_t>& v, size_t n, std::mt19937_64& g, bool specials) {
    v.resize(n * sizeof(T));
    for (size_t i = 0; i < n; ++i) {
        float f = uniform(g, -4.f, 4.f);
        if (specials) {
            const unsigned r = g() % 97;
            if (r == 0) f = INFINITY; else if (r == 1) f = -INFINITY; else if (r == 2) f = NAN; else if (r == 3) f = -0.f;
        }
        uint32_t b = fusedreg::f32_to_bits<T>(f);
        if (specials && g() % 89 == 0) {  // a NaN with a random sign and payload
            const uint32_t r = (uint32_t)g();
            if constexpr (sizeof(T) == 4) b = 0x7f800000u | (r & 0x807fffffu) | 1u;
            else if constexpr (std::is_same_v<T, __half>) b = 0x7c00u | (r & 0x83ffu) | 1u;
            else b = 0x7f80u | (r & 0x807fu) | 1u;
        }
        memcpy(v.data() + i * sizeof(T), &b, sizeof(T));
    }
}
