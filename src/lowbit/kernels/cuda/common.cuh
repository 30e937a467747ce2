// What every CUDA kernel here starts with (cuda_jit.source prepends it): the integer types, the device-function
// macro and programmatic dependent launch.

typedef unsigned int u32;
typedef unsigned short u16;
struct U4 { u32 x, y, z, w; };

#define DEV __device__ __forceinline__

#ifdef LOWBIT_HOST  // on the CPU (cuda/host.h)
inline float half_to_float(u16 h) { return lowbit_host::h2f(h); }
inline u16 float_to_half(float f) { return lowbit_host::f2h(f); }
#else
DEV float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
DEV u16 float_to_half(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// 16 bytes read once (weights): kept out of L1
#ifdef LOWBIT_HOST
DEV U4 ld_stream(const U4* p) { return *p; }
#else
DEV U4 ld_stream(const U4* p) {
    U4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
#endif

// Programmatic dependent launch (cuda_jit.Kernel's ``early``): the kernel may start while the kernel before it in
// the stream still runs; nothing before wait_for_inputs() reads what that kernel writes (constants only).
// release_dependents() lets the kernel after this one start its own set-up. Both are no-ops when the launches are
// plain, and before Hopper.
DEV void wait_for_inputs() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
DEV void release_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// the sum of v over the block's WARPS_ warps, added in warp order (every thread gets it; partial: WARPS_ floats of
// shared memory)
template <int WARPS_> DEV float block_sum(float v, float* partial) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS_; ++w) total += partial[w];
    return total;
}
