// Randomized Hadamard transforms of rows of N = 2^LOG_N 16-bit values (512 <= N <= 8192), one block of N / 16
// threads per row, float32 inside (lowbit.kernels.cuda_hadamard, which prepends the #defines: LOG_N, BF16 and
// INVERSE). Two layouts of a row's values over the block:
//   M1: thread t holds values 16 t .. 16 t + 15 (index bits 0-3 in registers, 4-8 in the lane, 9+ in the warp);
//   M2: thread t holds values t + j N / 16 for j = 0..15 (index bits 0-4 in the lane, 5.. in the warp, the top
//       four in registers).
// The Walsh-Hadamard transform is one butterfly stage per index bit, in any order: stages on register bits run in
// registers, on lane bits through shuffles, and one pass through shared memory changes M1 into M2 (or back) so
// that the warp bits become register (or lane) bits. A transform starting in M1 ends in M2 and vice versa.
//   hadamard:      one transform per row, x R^T (signs, then H) or with INVERSE y R (H, then signs).
//   residual_norm: h = r + y U, x = rms_norm(h) w V^T, rounding where the separate steps round.
// Programmatic dependent launch (common.cuh): constants (signs, norm weight) are read before wait_for_inputs(), the
// inputs after it.

#define N (1 << LOG_N)
#define THREADS (N / 16)
#define WARPS (THREADS / 32)
#define FULL 0xffffffffu

DEV float to_f(u16 v) {
#if BF16
    return __uint_as_float(((u32)v) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#endif
}
DEV u16 to_t(float f) {
    u16 v;
#if BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
#endif
    return v;
}
DEV float round_t(float f) { return to_f(to_t(f)); }  // f as the activations' dtype holds it

// butterflies on register index bits [LO, HI): (v[e], v[e + 2^b]) -> (sum, difference)
template <int LO, int HI> DEV void reg_stages(float* v) {
#pragma unroll
    for (int b = LO; b < HI; ++b) {
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            if (e & (1 << b)) continue;
            const float a = v[e], c = v[e | (1 << b)];
            v[e] = a + c;
            v[e | (1 << b)] = a - c;
        }
    }
}
// butterflies on lane bits [LO, HI): the lane with the bit clear keeps the sum, its partner the difference
template <int LO, int HI> DEV void lane_stages(float* v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int b = LO; b < HI; ++b) {
        const bool upper = lane & (1 << b);
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            const float p = __shfl_xor_sync(FULL, v[e], 1 << b);
            v[e] = upper ? p - v[e] : v[e] + p;
        }
    }
}

__shared__ float buf[N + N / 32];  // one float of padding per 32: both layouts read and write without conflicts
DEV int pad(int i) { return i + (i >> 5); }
DEV void m1_to_m2(float* v) {
    const int t = threadIdx.x;
#pragma unroll
    for (int e = 0; e < 16; ++e) buf[pad(16 * t + e)] = v[e];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = buf[pad(j * THREADS + t)];
    __syncthreads();  // buf is free again
}
DEV void m2_to_m1(float* v) {
    const int t = threadIdx.x;
#pragma unroll
    for (int j = 0; j < 16; ++j) buf[pad(j * THREADS + t)] = v[j];
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 16; ++e) v[e] = buf[pad(16 * t + e)];
    __syncthreads();
}

// the whole transform (unnormalized) from M1 to M2: bits 0-3 and 4-8 in M1, then the bits from 9 up, which M2
// holds in registers j = 13 - LOG_N .. 3 (its register bits are LOG_N - 4 .. LOG_N - 1)
DEV void fwht_m1(float* v) {
    reg_stages<0, 4>(v);
    lane_stages<0, 5>(v);
    m1_to_m2(v);
    reg_stages<(13 - LOG_N > 0 ? 13 - LOG_N : 0), 4>(v);
}
// from M2 to M1: the register bits (LOG_N - 4 ..) and bits 0-4 in M2, then bits 5 .. LOG_N - 5 (M2's warp bits),
// which are lane bits 1 .. LOG_N - 9 in M1
DEV void fwht_m2(float* v) {
    reg_stages<0, 4>(v);
    lane_stages<0, 5>(v);
    m2_to_m1(v);
    lane_stages<1, LOG_N - 8>(v);
}

DEV void load_m1(const u16* row, float* v) {
    const U4* p = (const U4*)(row + 16 * threadIdx.x);
    const U4 a = p[0], b = p[1];
    const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        v[2 * k] = to_f((u16)(w[k] & 0xffffu));
        v[2 * k + 1] = to_f((u16)(w[k] >> 16));
    }
}
DEV void store_m1(u16* row, const float* v, float scale) {
    u32 w[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = (u32)to_t(v[2 * k] * scale) | ((u32)to_t(v[2 * k + 1] * scale) << 16);
    U4* p = (U4*)(row + 16 * threadIdx.x);
    p[0] = U4{w[0], w[1], w[2], w[3]};
    p[1] = U4{w[4], w[5], w[6], w[7]};
}

// x R^T = H (s * x) scaled, or (INVERSE) y R = s * (H y) scaled: rows of N, row c taking signs row c % sign_rows
extern "C" __global__ void __launch_bounds__(THREADS) hadamard(const u16* x, const float* signs, u16* y,
                                                                int sign_rows, float scale) {
    const long row = blockIdx.x;
    const float* s = signs + (long)(blockIdx.x % sign_rows) * N;
    float sg[16], v[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) sg[e] = INVERSE ? s[e * THREADS + threadIdx.x] : s[16 * threadIdx.x + e];
    wait_for_inputs();
    load_m1(x + row * N, v);
    release_dependents();
    if (!INVERSE) {
#pragma unroll
        for (int e = 0; e < 16; ++e) v[e] *= sg[e];
    }
    fwht_m1(v);  // now in M2
    u16* out = y + row * N;
#pragma unroll
    for (int j = 0; j < 16; ++j) out[j * THREADS + threadIdx.x] = to_t(INVERSE ? v[j] * sg[j] * scale : v[j] * scale);
}

// h = r + y U and x = rms_norm(h, w, eps) V^T for rows of N (U: signs su, V: signs sv)
__shared__ float warp_sums[WARPS];
extern "C" __global__ void __launch_bounds__(THREADS) residual_norm(const u16* y, const u16* r, const u16* w,
                                                                     const float* su, const float* sv, u16* h,
                                                                     u16* x, float eps, float scale) {
    const long row = blockIdx.x;
    const int t = threadIdx.x;
    float su_j[16], sv_j[16], w_j[16], v[16], r_j[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        su_j[j] = su[j * THREADS + t];
        sv_j[j] = sv[j * THREADS + t];
        w_j[j] = to_f(w[j * THREADS + t]);
    }
    wait_for_inputs();
    load_m1(y + row * N, v);
#pragma unroll
    for (int j = 0; j < 16; ++j) r_j[j] = to_f(r[row * N + j * THREADS + t]);
    release_dependents();
    fwht_m1(v);  // y U: H y (now in M2), then the signs
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        v[j] = round_t(round_t(v[j] * su_j[j] * scale) + r_j[j]);  // h, rounded as its two steps round
        h[row * N + j * THREADS + t] = to_t(v[j]);
        ss += v[j] * v[j];
    }
    const float inv = rsqrtf(block_sum<WARPS>(ss, warp_sums) / (float)N + eps);
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = round_t(w_j[j] * round_t(v[j] * inv)) * sv_j[j];  // s * rms_norm(h)
    fwht_m2(v);  // now in M1
    store_m1(x + row * N, v, scale);
}
