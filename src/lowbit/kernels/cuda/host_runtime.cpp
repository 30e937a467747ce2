// The CPU side of cuda/host.h: threads, barriers and the per-warp exchange buffers. Compiled once into its own
// library (cuda_host.py) so that each kernel's translation unit needs no standard header.

#include <barrier>
#include <memory>
#include <thread>
#include <vector>

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx;
Dim3 blockIdx, gridDim;

namespace lowbit_host {

struct WarpData { float f[32]; unsigned a[32][4], b[32][2]; };
struct Warp { std::barrier<> bar{32}; WarpData data; };

static std::barrier<>* block_bar = nullptr;
static Warp* warps = nullptr;
void* dyn_ptr = nullptr;

WarpData* warp_data() { return &warps[threadIdx.x >> 5].data; }
void warp_sync() { warps[threadIdx.x >> 5].bar.arrive_and_wait(); }
void block_sync() { block_bar->arrive_and_wait(); }

// 0, or -1 when the threads could not be started (the message is not carried: the caller says what it launched)
int run(int grid, int threads, int shared_bytes, void (*body)(void*), void* ctx) try {
    gridDim.x = grid;
    std::vector<unsigned long long> dyn((shared_bytes + 15) / 8 + 2);
    for (int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        dyn_ptr = dyn.data();
        std::barrier<> bar(threads);
        std::unique_ptr<Warp[]> ws(new Warp[(threads + 31) / 32]);
        block_bar = &bar;
        warps = ws.get();
        std::vector<std::thread> ts;
        ts.reserve(threads);
        for (int i = 0; i < threads; ++i) ts.emplace_back([i, body, ctx] { threadIdx.x = i; body(ctx); });
        for (auto& t : ts) t.join();
    }
    return 0;
} catch (...) {  // e.g. std::system_error from std::thread under a low thread limit: never across the C boundary
    return -1;
}

}  // namespace lowbit_host
