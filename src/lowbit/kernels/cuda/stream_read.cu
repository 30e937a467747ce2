// A kernel that only reads: the XOR of n 16-byte units, each warp's XOR written to out[warp]. It is the speed of
// light of a call that must stream those bytes once on this GPU (launch, ramp-up, the first DRAM latency and the
// tail, with nothing to decode), the yardstick benchmarks/gemv_speed.py --read-ceiling holds each GEMV against.
// UNROLL: loads each thread has in flight before it combines them. The grid is one pass (cuda_read.py).

extern "C" __global__ void __launch_bounds__(256) stream_read(const U4* __restrict__ w, int n, u32* __restrict__ out) {
    const int first = blockIdx.x * 256 * UNROLL + threadIdx.x;
    U4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int i = first + 256 * u;  // a warp's 32 lanes read 512 contiguous bytes per load
        v[u] = i < n ? ld_stream(w + i) : U4{0u, 0u, 0u, 0u};
    }
    u32 acc = 0u;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
#pragma unroll
    for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) out[blockIdx.x * 8 + (threadIdx.x >> 5)] = acc;
}
