// Several weight matrices ("phases", back to back in w: phase p is units bounds[p] .. bounds[p + 1]) streamed in
// order by one launch, each warp's XOR of every unit it read written to out[warp]: the speed of light of a decode
// step whose GEMVs ran as one persistent kernel (benchmarks/step_floor.py), against one launch per matrix (the same
// kernel with one phase). A grid-stride loop, UNROLL 16-byte loads in flight per thread, registers capped so that
// PER_SM blocks fit on an SM.
//   BARRIER   1: a grid-wide barrier after each phase, as a matrix whose input is the previous one's output needs
//             (every block of the grid must be resident at once: at most PER_SM per SM)
//   PREFETCH  1: a thread's first loads of the next phase are issued before that barrier (weights never depend on
//             the phase before; only activations would); 2: its first AHEAD units of each phase are copied into
//             shared memory (cp.async, no registers held) before the barrier or the launch's wait, and read from
//             there after it, so that the dependency finds DRAM busy; 3: the block's share of the phase requested
//             into L2 (cp.async.bulk.prefetch, 4 KB a thread) and its first loads issued, before the barrier or the
//             wait (no registers or shared memory held: the loads after it find the bytes on chip or on the way)
// With programmatic dependent launch the first loads are in flight before griddepcontrol.wait, and the next launch
// is released once the last ones are read, as the GEMVs do.

DEV void load_group(U4* v, const U4* w, long long i, long long stride, long long hi) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const long long j = i + stride * u;
        v[u] = j < hi ? ld_stream(w + j) : U4{0u, 0u, 0u, 0u};
    }
}

#if PREFETCH == 2
#define AHEAD 8  // units per thread: 32 KB of shared memory a block
__shared__ U4 ahead[AHEAD][256];
// The thread's units i, i + stride, ... (AHEAD of them, zeros past hi) copied into its column of `ahead`.
DEV void copy_ahead(const U4* w, long long i, long long stride, long long hi) {
#pragma unroll
    for (int d = 0; d < AHEAD; ++d) {
        const long long j = i + stride * d;
#ifdef LOWBIT_HOST
        ahead[d][threadIdx.x] = j < hi ? w[j] : U4{0u, 0u, 0u, 0u};
#else
        const unsigned dst = (unsigned)__cvta_generic_to_shared(&ahead[d][threadIdx.x]);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                     :: "r"(dst), "l"(w + (j < hi ? j : 0)), "r"(j < hi ? 16 : 0));  // src size 0: zeros
#endif
    }
#ifndef LOWBIT_HOST
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// The XOR of the thread's copied units, once its copies have landed (each thread reads only what it copied).
DEV u32 take_ahead(u32 acc) {
#ifndef LOWBIT_HOST
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
#pragma unroll
    for (int d = 0; d < AHEAD; ++d) {
        const U4 a = ahead[d][threadIdx.x];
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    return acc;
}
#endif

#if PREFETCH == 3
// The block's 256-unit groups of units lo .. hi (lo + b * 256, then every stride), one bulk L2 prefetch a thread.
DEV void prefetch_l2(const U4* w, long long lo, long long hi, long long stride) {
#if !defined(LOWBIT_HOST) && __CUDA_ARCH__ >= 900
    for (long long j = lo + (long long)blockIdx.x * 256 + threadIdx.x * stride; j < hi; j += 256 * stride) {
        const unsigned bytes = (unsigned)(16 * (hi - j < 256 ? hi - j : 256));
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(w + j), "r"(bytes) : "memory");
    }
#endif
}
#endif

// Every block arrives, the last one to arrive starts the next generation; the count resets itself (sync[0]: the
// arrivals, sync[1]: the generation). On the CPU blocks run one after another, so there is nothing to wait for.
DEV void grid_barrier(unsigned* sync) {
#ifndef LOWBIT_HOST
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile unsigned* gen = sync + 1;
        const unsigned mine = *gen;
        __threadfence();
        if (atomicAdd(sync, 1u) == gridDim.x - 1) {
            sync[0] = 0u;
            __threadfence();
            atomicAdd(sync + 1, 1u);
        } else {
            while (*gen == mine) {
            }
        }
    }
    __syncthreads();
#endif
}

extern "C" __global__ void __launch_bounds__(256, PER_SM)
stream_phases(const U4* __restrict__ w, const long long* __restrict__ bounds, int phases, u32* __restrict__ out,
              unsigned* sync) {
    const long long stride = (long long)gridDim.x * 256, me = (long long)blockIdx.x * 256 + threadIdx.x;
    u32 acc = 0u;
    U4 v[UNROLL];
    long long i = bounds[0] + me;
#if PREFETCH == 2
    copy_ahead(w, i, stride, bounds[1]);
    wait_for_inputs();  // where the launch is early: only the first weights are read before the kernel ahead ends
    i += stride * AHEAD;
    load_group(v, w, i, stride, bounds[1]);
    acc = take_ahead(acc);
#else
#if PREFETCH == 3
    prefetch_l2(w, bounds[0], bounds[1], stride);
#endif
    load_group(v, w, i, stride, bounds[1]);
    wait_for_inputs();
#endif
    for (int p = 0; p < phases; ++p) {
        const long long hi = bounds[p + 1];
        for (;;) {  // v holds the group at i
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
            i += stride * UNROLL;
            if (i >= hi) break;
            load_group(v, w, i, stride, hi);
        }
        if (p + 1 == phases) break;
        i = bounds[p + 1] + me;
#if PREFETCH == 2
        copy_ahead(w, i, stride, bounds[p + 2]);
        if (BARRIER) grid_barrier(sync);
        i += stride * AHEAD;
        load_group(v, w, i, stride, bounds[p + 2]);
        acc = take_ahead(acc);
#else
#if PREFETCH == 3
        prefetch_l2(w, bounds[p + 1], bounds[p + 2], stride);
#endif
        if (PREFETCH) load_group(v, w, i, stride, bounds[p + 2]);
        if (BARRIER) grid_barrier(sync);
        if (!PREFETCH) load_group(v, w, i, stride, bounds[p + 2]);
#endif
    }
    release_dependents();  // every weight is read
#pragma unroll
    for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) out[blockIdx.x * 8 + (threadIdx.x >> 5)] = acc;
}
