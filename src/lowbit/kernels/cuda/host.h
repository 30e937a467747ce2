// The CUDA kernels of this folder, run on the CPU (cuda_host.py): g++ compiles a kernel's source after this header,
// with LOWBIT_HOST defined. Each thread of a block is a std::thread and blocks run one after another, so __shared__
// variables become statics. What the kernels take from the GPU is emulated: bit for bit where it is elementwise
// (PRMT, LOP3, fp16 HFMA2 / HMUL2 with one rounding, fp16 conversions), in fp32 where it is a sum (the MMA adds its
// 16 exact products in k order; the tensor cores' order is not specified), and warp collectives through per-warp
// barriers. What this checks is a kernel's logic (fragment layouts, decode steps, scales, loops, barriers), on
// fresh inputs and without a GPU; not its speed.

// Everything here is inline or declared: the threads, barriers and warp buffers live in cuda/host_runtime.cpp,
// compiled once, so a kernel's translation unit includes no standard header (it compiles in a fraction of a second).

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

typedef __SIZE_TYPE__ size_t;
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
extern thread_local Dim3 threadIdx;
extern Dim3 blockIdx, gridDim;

namespace lowbit_host {

struct WarpData { float f[32]; unsigned a[32][4], b[32][2]; };
WarpData* warp_data();  // the calling thread's warp's exchange buffers
void warp_sync();       // a barrier of the calling thread's warp
void block_sync();      // a barrier of its block
extern void* dyn_ptr;   // the block's dynamic shared memory (extern __shared__ on the GPU)
// every thread of each block runs body(ctx), blocks one after another
int run(int grid, int threads, int shared_bytes, void (*body)(void*), void* ctx);  // 0, or -1: no threads

inline float h2f(unsigned short h) { _Float16 v; __builtin_memcpy(&v, &h, 2); return (float)v; }
inline unsigned short f2h(long double f) {  // one rounding to nearest even (libgcc's extended -> half)
    _Float16 v = (_Float16)f;
    unsigned short h;
    __builtin_memcpy(&h, &v, 2);
    return h;
}
inline long double lo(unsigned w) { return h2f((unsigned short)(w & 0xffffu)); }
inline long double hi(unsigned w) { return h2f((unsigned short)(w >> 16)); }
inline unsigned pack(long double l, long double h) { return (unsigned)f2h(l) | ((unsigned)f2h(h) << 16); }

}  // namespace lowbit_host

inline void __syncthreads() { lowbit_host::block_sync(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    lowbit_host::WarpData* w = lowbit_host::warp_data();
    const int lane = threadIdx.x & 31;
    w->f[lane] = v;
    lowbit_host::warp_sync();
    const float r = w->f[lane ^ o];
    lowbit_host::warp_sync();
    return r;
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int o) {  // the bits through the float exchange
    float f;
    __builtin_memcpy(&f, &v, 4);
    f = __shfl_xor_sync(mask, f, o);
    __builtin_memcpy(&v, &f, 4);
    return v;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __expf(float v) { return __builtin_expf(v); }
inline float rsqrtf(float v) { return 1.f / __builtin_sqrtf(v); }
inline float fmaf(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

// PTX's lop3.b32: bit i of the result is bit (a_i b_i c_i) of lut
inline unsigned lop3(unsigned a, unsigned b, unsigned c, unsigned lut) {
    unsigned r = 0;
    for (int i = 0; i < 8; ++i)
        if ((lut >> i) & 1) r |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
    return r;
}
// PTX's prmt.b32, default mode: byte i of the result is byte (sel >> 4 i) & 7 of {b, a}, or that byte's sign
// replicated when bit 3 of the nibble is set
inline unsigned prmt_host(unsigned a, unsigned b, unsigned sel) {
    const unsigned long long v = (unsigned long long)a | ((unsigned long long)b << 32);
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) {
        const unsigned n = (sel >> (4 * i)) & 15;
        unsigned byte = (unsigned)(v >> (8 * (n & 7))) & 0xffu;
        if (n & 8) byte = (byte & 0x80u) ? 0xffu : 0u;
        r |= byte << (8 * i);
    }
    return r;
}
inline unsigned hfma2_host(unsigned a, unsigned b, unsigned c) {  // exact in long double, one rounding
    using namespace lowbit_host;
    return pack(lo(a) * lo(b) + lo(c), hi(a) * hi(b) + hi(c));
}
inline unsigned hmul2_host(unsigned a, unsigned b) {
    using namespace lowbit_host;
    return pack(lo(a) * lo(b), hi(a) * hi(b));
}
// mma.sync.m16n8k16.row.col f32.f16.f16.f32 for the calling lane: the warp's fragments meet in shared buffers.
// A: a0 (row g, k 2t, 2t + 1), a1 (row g + 8), a2 (row g, k 2t + 8, 2t + 9), a3 (row g + 8, k 2t + 8, ..);
// B: b0 (k 2t, 2t + 1, column g), b1 (k 2t + 8, 2t + 9); D: d0, d1 (row g, columns 2t, 2t + 1), d2, d3 (row g + 8).
inline void mma_host(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    using namespace lowbit_host;
    WarpData& w = *warp_data();
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    w.a[lane][0] = a0; w.a[lane][1] = a1; w.a[lane][2] = a2; w.a[lane][3] = a3;
    w.b[lane][0] = b0; w.b[lane][1] = b1;
    warp_sync();
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float s = d[e];
        for (int k = 0; k < 16; ++k) {
            const int src = (row & 7) * 4 + (k & 7) / 2;  // the lane holding A[row][k]
            const unsigned aw = w.a[src][(row >> 3) + 2 * (k >> 3)];
            const unsigned bw = w.b[col * 4 + (k & 7) / 2][k >> 3];
            const float av = (float)((k & 1) ? hi(aw) : lo(aw)), bv = (float)((k & 1) ? hi(bw) : lo(bw));
            s += av * bv;  // exact product of two fp16, fp32 sum
        }
        d[e] = s;
    }
    warp_sync();
}
