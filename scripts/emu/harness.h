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
