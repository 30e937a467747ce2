// One decode step of a Llama-family attention after its fused q/k/v matmul, in one launch: the rotary embedding
// of the query and the new key, the new key and value written to the static cache at its length, and the attention
// over the written part of the cache (triton_decode_attention.rope_cache_attention computes the same; that file's
// reference is what both are tested against).
//
// Configured by #defines that cuda_attention.py puts in front of this file:
//   HEAD_DIM   values per head (64, 128 or 256): lane l of a warp holds dims [l DPL, (l + 1) DPL)
//   SPLITS     programs (CTAs) per (sequence, head), one cluster: program j takes key blocks j, j + SPLITS, ...
//   KPW        keys per warp in a block of 64 (4, 8 or 16): 64 / KPW warps per program
//
// Flash-decoding with the combination inside a cluster of CTAs: each warp of a program takes KPW keys of a 64-key
// block and keeps its online softmax (max, sum, weighted values), the program adds up its warps in shared memory,
// and program 0 reads the other programs' shared memory across the cluster (distributed shared memory) and writes
// the output. The Triton kernel combines through global memory: a store, an atomic count and a read back through
// L2 (~2 µs of a step past one block of keys on an H200, docs/kernels.md).
//
// Programmatic dependent launch: a program reads the cache length and its first block of keys and values (written
// by earlier steps) before it waits for the q/k/v matmul.

#define DPL (HEAD_DIM / 32)  // dims per lane
#define WORDS (DPL / 2)      // fp16 pairs per lane
#define NWARPS (64 / KPW)    // warps per program
#define LPK (32 / KPW)       // lanes per key once the scores are reduced
#define BLOCK_KEYS 64
#define NEG_INF __int_as_float(0xff800000)

struct Dims { u32 w[WORDS]; };

DEV Dims load_dims(const u16* p) {  // DPL fp16 values, 4-16 bytes (plain loads: the kernel writes the caches)
    Dims d;
#if WORDS == 1
    asm volatile("ld.global.u32 %0, [%1];" : "=r"(d.w[0]) : "l"(p));
#elif WORDS == 2
    asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(d.w[0]), "=r"(d.w[1]) : "l"(p));
#else
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(d.w[0]), "=r"(d.w[1]), "=r"(d.w[2]), "=r"(d.w[3]) : "l"(p));
#endif
    return d;
}
DEV void store_dims(u16* p, const Dims& d) {
#if WORDS == 1
    asm volatile("st.global.u32 [%0], %1;" :: "l"(p), "r"(d.w[0]) : "memory");
#elif WORDS == 2
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" :: "l"(p), "r"(d.w[0]), "r"(d.w[1]) : "memory");
#else
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(d.w[0]), "r"(d.w[1]), "r"(d.w[2]), "r"(d.w[3]) : "memory");
#endif
}
DEV float dim_of(const Dims& d, int i) { return half_to_float((u16)(d.w[i / 2] >> (16 * (i % 2)))); }
DEV Dims zero_dims() { Dims d; for (int i = 0; i < WORDS; ++i) d.w[i] = 0u; return d; }

// transformers' rotary embedding of the lane's dims of the head at ``x``: x cos + rotate_half(x) sin in fp32, then
// rounded to fp16 as the unfused step stores it
DEV Dims rotate(const u16* x, const float* c, const float* s, int lane) {
    const int d0 = lane * DPL;
    const Dims a = load_dims(x + d0), o = load_dims(x + (d0 + HEAD_DIM / 2) % HEAD_DIM);
    const float sign = d0 < HEAD_DIM / 2 ? -1.f : 1.f;
    Dims r;
#pragma unroll
    for (int i = 0; i < WORDS; ++i) {
        const float lo = dim_of(a, 2 * i) * c[2 * i] + sign * dim_of(o, 2 * i) * s[2 * i];
        const float hi = dim_of(a, 2 * i + 1) * c[2 * i + 1] + sign * dim_of(o, 2 * i + 1) * s[2 * i + 1];
        r.w[i] = (u32)float_to_half(lo) | ((u32)float_to_half(hi) << 16);
    }
    return r;
}

DEV float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

struct Softmax {  // a warp's online softmax: every lane holds m and l, and its dims of the weighted values
    float m, l, acc[DPL];
};

// The state moved on by ``n`` keys whose scores are ``sc`` (-inf: not attended) and values ``v``.
template <int N> DEV void attend(Softmax& st, const float (&sc)[N], const Dims (&v)[N]) {
    float top = st.m;
#pragma unroll
    for (int i = 0; i < N; ++i) top = fmaxf(top, sc[i]);
    const float ref = top > NEG_INF ? top : 0.f;  // nothing seen yet: exp(-inf) terms, no NaN
    const float alpha = st.m > NEG_INF ? expf(st.m - ref) : 0.f;
    st.l *= alpha;
#pragma unroll
    for (int d = 0; d < DPL; ++d) st.acc[d] *= alpha;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const float p = sc[i] > NEG_INF ? expf(sc[i] - ref) : 0.f;
        st.l += p;
#pragma unroll
        for (int d = 0; d < DPL; ++d) st.acc[d] = fmaf(p, dim_of(v[i], d), st.acc[d]);
    }
    st.m = top;
}

// The warp's 16 keys from cache position s0 (positions >= hi are not read, and not attended).
struct Block { Dims k[KPW], v[KPW]; };
DEV Block load_block(const u16* kb, const u16* vb, long long sk, long long sv, int s0, int hi) {
    Block b;
#pragma unroll
    for (int i = 0; i < KPW; ++i) {
        const bool ok = s0 + i < hi;
        b.k[i] = ok ? load_dims(kb + (s0 + i) * sk) : zero_dims();
        b.v[i] = ok ? load_dims(vb + (s0 + i) * sv) : zero_dims();
    }
    return b;
}
// The warp's KPW scores from its lanes' partial dot products, reduced and scattered at once: with 8 keys,
// 4 + 2 + 1 shuffles leave lane l with a quarter of the sum of key l / 4 and two more complete it (a warp sum per
// key takes 40). Lanes LPK i .. LPK i + LPK - 1 then hold key i.
DEV float key_score(float (&dot)[KPW], int lane) {
#pragma unroll
    for (int n = KPW / 2, o = 16; n >= 1; n /= 2, o /= 2) {
        const bool upper = lane & o;
#pragma unroll
        for (int i = 0; i < n; ++i) {
            const float keep = upper ? dot[i + n] : dot[i], send = upper ? dot[i] : dot[i + n];
            dot[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
    }
    float v = dot[0];
#pragma unroll
    for (int o = LPK / 2; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// over the KPW keys of a warp
DEV float keys_max(float v) {
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
DEV float keys_sum(float v) {
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
DEV void attend_block(Softmax& st, const float* q, const Block& b, int s0, int hi, int lane) {
    float dot[KPW];
#pragma unroll
    for (int i = 0; i < KPW; ++i) {
        dot[i] = 0.f;
#pragma unroll
        for (int d = 0; d < DPL; ++d) dot[i] = fmaf(q[d], dim_of(b.k[i], d), dot[i]);
    }
    const float full = key_score(dot, lane);  // every lane shuffles
    const float sc = s0 + lane / LPK < hi ? full : NEG_INF;
    const float top = fmaxf(st.m, keys_max(sc));
    const float ref = top > NEG_INF ? top : 0.f;  // nothing seen yet: exp(-inf) terms, no NaN
    const float alpha = st.m > NEG_INF ? expf(st.m - ref) : 0.f;
    const float p = sc > NEG_INF ? expf(sc - ref) : 0.f;
    st.l = fmaf(st.l, alpha, keys_sum(p));
#pragma unroll
    for (int d = 0; d < DPL; ++d) st.acc[d] *= alpha;
#pragma unroll
    for (int i = 0; i < KPW; ++i) {
        const float pi = __shfl_sync(0xffffffffu, p, LPK * i);
#pragma unroll
        for (int d = 0; d < DPL; ++d) st.acc[d] = fmaf(pi, dim_of(b.v[i], d), st.acc[d]);
    }
    st.m = top;
}

// Distributed shared memory: the address of ``local`` in the shared memory of cluster CTA ``rank``.
DEV float ld_cluster(const float* local, u32 rank) {
    u32 a, remote;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(local));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(a), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}
DEV void cluster_sync() {  // every thread of every CTA of the cluster; orders shared-memory writes before reads
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// (m, l, acc) of several states weighted onto the largest max: weights exp(m_i - top), 0 for a state with no key
DEV float state_weight(float m, float top) { return m > NEG_INF ? expf(m - (top > NEG_INF ? top : 0.f)) : 0.f; }
// The weights w of N states' maxima m (their largest: top) and the states' sums l weighted by them.
template <int N> DEV float weigh(const float (&m)[N], const float (&l)[N], float (&w)[N], float& top) {
    top = NEG_INF;
#pragma unroll
    for (int i = 0; i < N; ++i) top = fmaxf(top, m[i]);
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) { w[i] = state_weight(m[i], top); total = fmaf(l[i], w[i], total); }
    return total;
}

extern "C" __global__ void __cluster_dims__(SPLITS, 1, 1) __launch_bounds__(NWARPS * 32)
attention_step(const u16* __restrict__ qkv, const u16* __restrict__ cosp, const u16* __restrict__ sinp,
               u16* kc, u16* vc, const long long* __restrict__ length, u16* __restrict__ out, int S, float scale,
               int s_qkv, int s_cos, int s_sin, long long sk_b, long long sk_h, long long sk_s, long long sv_b,
               long long sv_h, long long sv_s, int heads, int kv_heads) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = blockIdx.x % SPLITS, h = blockIdx.x / SPLITS, b = blockIdx.y;
    const int group = heads / kv_heads, kvh = h / group;
    const long long pos = *length;  // where this step's key and value go: written by an earlier kernel
    const int hi = (int)(pos < S ? pos : S);  // only positions written before this step are read
    const int d0 = lane * DPL;
    u16* kb = kc + b * sk_b + kvh * sk_h + d0;
    u16* vb = vc + b * sv_b + kvh * sv_h + d0;
    const int first = j * BLOCK_KEYS + warp * KPW;
    const Block b0 = load_block(kb, vb, sk_s, sv_s, first, hi);  // in flight while the q/k/v matmul finishes
    wait_for_inputs();
    // No early release_dependents(): the o projection's blocks starting beside this step measured slower (TG-128
    // nz2_ch on an H200: 800.9 against 815.9 tok/s released at the kernel's end, docs/kernel-measurements.md).
    const u16* row = qkv + (long long)b * s_qkv;
    float c[DPL], s[DPL];
    {
        const Dims cd = load_dims(cosp + (long long)b * s_cos + d0), sd = load_dims(sinp + (long long)b * s_sin + d0);
#pragma unroll
        for (int d = 0; d < DPL; ++d) { c[d] = dim_of(cd, d); s[d] = dim_of(sd, d); }
    }
    const Dims qh = rotate(row + h * HEAD_DIM, c, s, lane);
    float q[DPL];
#pragma unroll
    for (int d = 0; d < DPL; ++d) q[d] = dim_of(qh, d) * scale;
    Softmax st;
    st.m = NEG_INF;
    st.l = 0.f;
#pragma unroll
    for (int d = 0; d < DPL; ++d) st.acc[d] = 0.f;
    attend_block(st, q, b0, first, hi, lane);
    for (int start = (j + SPLITS) * BLOCK_KEYS; start < hi; start += SPLITS * BLOCK_KEYS) {
        const int s0 = start + warp * KPW;
        attend_block(st, q, load_block(kb, vb, sk_s, sv_s, s0, hi), s0, hi, lane);
    }
    if (j == 0 && warp == 0 && pos < S) {  // the new key: scored from registers, written by one program per kv head
        const Dims kn = rotate(row + (heads + kvh) * HEAD_DIM, c, s, lane);
        const Dims vn = load_dims(row + (heads + kv_heads + kvh) * HEAD_DIM + d0);
        if (h % group == 0) {
            store_dims(kb + pos * sk_s, kn);
            store_dims(vb + pos * sv_s, vn);
        }
        float dot = 0.f;
#pragma unroll
        for (int d = 0; d < DPL; ++d) dot = fmaf(q[d], dim_of(kn, d), dot);
        const float sc[1] = {warp_sum(dot)};
        const Dims vs[1] = {vn};
        attend(st, sc, vs);
    }
    // the block's warps, then the cluster's programs
    __shared__ float wm[NWARPS], wl[NWARPS], wacc[NWARPS][HEAD_DIM];
    __shared__ float cm, cl, cacc[HEAD_DIM];
    if (lane == 0) { wm[warp] = st.m; wl[warp] = st.l; }
#pragma unroll
    for (int d = 0; d < DPL; ++d) wacc[warp][d0 + d] = st.acc[d];
    __syncthreads();
    float ww[NWARPS], top;
    const float total = weigh(wm, wl, ww, top);
    for (int d = threadIdx.x; d < HEAD_DIM; d += NWARPS * 32) {
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) a = fmaf(wacc[w][d], ww[w], a);
        cacc[d] = a;
    }
    if (threadIdx.x == 0) { cm = top; cl = total; }
    // One block of keys (every program's hi alike): program 0 holds the whole softmax and the others nothing, so
    // no program reads another's shared memory and none waits for the cluster.
    const bool alone = SPLITS == 1 || hi <= BLOCK_KEYS;
    if (alone) __syncthreads();
    else cluster_sync();  // every program's (cm, cl, cacc) readable across the cluster
    if (j == 0) {
        float ms[SPLITS], ls[SPLITS], ws[SPLITS], best;
#pragma unroll
        for (int r = 0; r < SPLITS; ++r) {
            ms[r] = r == 0 ? cm : alone ? NEG_INF : ld_cluster(&cm, r);
            ls[r] = r == 0 ? cl : alone ? 0.f : ld_cluster(&cl, r);
        }
        const float sum = weigh(ms, ls, ws, best);
        for (int d = threadIdx.x; d < HEAD_DIM; d += NWARPS * 32) {
            float a = 0.f;
#pragma unroll
            for (int r = 0; r < SPLITS; ++r) {
                a = fmaf(r == 0 ? cacc[d] : alone ? 0.f : ld_cluster(&cacc[d], r), ws[r], a);
            }
            const float o = sum > 0.f ? a / fmaxf(sum, 1e-30f) : 0.f;
            out[((long long)b * heads + h) * HEAD_DIM + d] = float_to_half(o);
        }
    }
    if (!alone) cluster_sync();  // the other programs' shared memory stays until program 0 has read it
}
