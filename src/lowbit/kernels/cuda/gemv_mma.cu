// Packed-weight GEMV on tensor cores: y[M, N] = x[M, K] W[N, K]^T for M <= 8 (decode), W packed 2 or 4 bits per
// weight (affine grids), E8P or IQ2_XXS codes, or llama.cpp's K-quants, fp32 accumulation.
//
// Configured by #defines that cuda_gemv.py puts in front of this file:
//   KIND         0 = affine scalar grid, 1 = E8P, 2 = IQ2_XXS (llama.cpp's sub-blocks, superblock d apart),
//                3 = K-quant (Q2_K, Q3_K with their 2 low code bits; Q4_K, Q5_K, Q6_K with their 4 low ones;
//                cuda_gemv.kquant_layout)
//   BITS         2 or 4 (KIND 0, 3: the low code bits, read as a 2- or 4-bit grid reads its codes)
//   KQ_HB        KIND 0, 3: high code bits per weight beyond the low ones, in a plane of their own (3- and 5-bit grids,
//                Q3_K, Q5_K 1; 6-bit grids, Q6_K 2; cuda_gemv.split_codes)
//   ASYM         1 when the format stores a per-group min (w = L(q) s + m), else w = L(q) s (KIND 3: Q2_K, Q4_K,
//                Q5_K)
//   DQ_A<i>, DQ_B<i>  fp16x2 constants: L(q) = fma(magic(q at bit position i), DQ_A<i>, DQ_B<i>), exact
//   GROUP_SHIFT  log2(columns per scale group); 30 = one scale per row
//   ROW_SCALE    1 = one scale per row applied to the fp32 sums at the end (no per-weight multiply)
//   STEP_SCALE   1 = a scale group spans a whole step (IQ2_XXS's superblock d, int4_g128_sym, e8p_g256): the step's
//                MMAs sum unscaled levels and the sums take the scale once, in fp32 (no per-weight multiply)
//   WARPS        warps per block; they split K, and the block adds their partial sums
//   XS           1: the batch-1 activation row staged once per block in (dynamic) shared memory; 2: all M rows
//   FULL         1: K is a whole number of steps (4 chunks), so no lane's chunk lies past the row's end
//   MIN_BLOCKS   blocks that must fit on one SM at once (__launch_bounds__: caps the registers per thread)
//   GATED        1: W is [gate; up] (2N rows, a fused gate/up projection) and y = silu(x gate^T) * (x up^T), [M, N]
//   NORM         1 (XS 1 only): the staged row is RMSNorm(x) as transformers' Llama computes it (the norm before a
//                layer's q/k/v or gate/up, which then needs no kernel of its own)
//   RESID        1: y = res + x W^T (the residual add after a layer's o or down projection), rounded as fp16 adds
//   RESIDENT     1: the grid is the blocks that stay resident together, each looping over row blocks
//   TILES        row blocks (m16 tiles) a warp multiplies at once: 2 lets each activation fragment feed two MMAs,
//                halving the activation reads per weight byte (batches, whose activations are 2-8x the 2-bit codes)
//
// Layout of the work (TILES 2: a block owns two such row blocks, each warp running both on one activation
// fragment). A block owns 16 rows (GATED: 8 gate rows and the 8 up rows N further on, as its rows g and
// g + 8, so each lane holds a gate sum and the matching up sum and applies the epilogue in fp32). Lane (g, t) of a
// warp (g = lane / 4, t = lane % 4) feeds rows g and g + 8 of an m16n8k16 MMA as its A fragment, and batch column g as its B fragment. The MMA sums over its 16
// k-slots in any order, so each lane decodes whole 16-byte chunks of its two rows (lane t takes chunk 4 s + t of
// step s) and presents the weights as pairs in the order the fp16 magic-number decode produces them; the lane's
// activations are permuted (PRMT) into the same pairs. Batch columns beyond M repeat column M - 1 and are not
// written. Decode per pair: one LOP3 drops two codes into the mantissas of 1024.0 (0x6400), one HFMA2 maps them
// exactly onto the format's levels, one HMUL2 (HFMA2 with a min) applies the fp16 scale, exactly as the torch
// reference's fp16 dequantization rounds.

struct U2 { u32 x, y; };  // not u32[2]: an array inside the Step structs kept them out of registers (NVRTC)
#ifdef LOWBIT_HOST  // the same operations on the CPU (cuda/host.h, cuda_host.py)
DEV u32 lop3_and_or(u32 x, u32 mask, u32 magic) { return lop3(x, mask, magic, 0xEA); }
DEV u32 hfma2(u32 a, u32 b, u32 c) { return hfma2_host(a, b, c); }
DEV u32 hmul2(u32 a, u32 b) { return hmul2_host(a, b); }
DEV u32 prmt(u32 a, u32 b, u32 sel) { return prmt_host(a, b, sel); }
DEV u32 dup_lo(u32 r) { return prmt_host(r, 0u, 0x1010u); }
DEV u32 dup_hi(u32 r) { return prmt_host(r, 0u, 0x3232u); }
DEV void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) { mma_host(d, a0, a1, a2, a3, b0, b1); }
DEV U4 ld_cached(const U4* p) { return *p; }
DEV u32 ld_u16(const u16* p) { return *p; }
DEV u32 ld_u32(const u32* p) { return *p; }
DEV u32 ld_stream_u32(const u32* p) { return *p; }
DEV U2 ld_stream_pair(const u32* p) { return U2{p[0], p[1]}; }
DEV u32 ld_half(const u16* p) { return (u32)*p | ((u32)*p << 16); }
DEV float half_lo_to_float(u32 h2) { return half_to_float((u16)(h2 & 0xffffu)); }
#else
DEV u32 lop3_and_or(u32 x, u32 mask, u32 magic) {  // (x & mask) | magic
    u32 y;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(y) : "r"(x), "r"(mask), "r"(magic));
    return y;
}
DEV u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
DEV u32 hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
DEV u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
// One half of r in both halves, written as PTX moves rather than a PRMT: ptxas folds them into the HFMA2 or HMUL2
// that reads the result, as its .H0_H0 / .H1_H1 operand (the K-quants' scale pairs: Q2_K 16 PRMT a step fewer).
DEV u32 dup_lo(u32 r) {
    u32 d;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; mov.b32 %0, {l, l};}" : "=r"(d) : "r"(r));
    return d;
}
DEV u32 dup_hi(u32 r) {
    u32 d;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; mov.b32 %0, {h, h};}" : "=r"(d) : "r"(r));
    return d;
}
DEV void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
DEV U4 ld_cached(const U4* p) {  // activations: every block reads them (not volatile: free to schedule early)
    U4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
DEV u32 ld_u16(const u16* p) {  // read-only, zero-extended
    u16 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return (u32)v;
}
DEV u32 ld_u32(const u32* p) {
    u32 v;
    asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
DEV u32 ld_stream_u32(const u32* p) {
    u32 v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
DEV U2 ld_stream_pair(const u32* p) {  // 8 bytes, 8-byte aligned
    U2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
DEV u32 ld_half(const u16* p) {  // one fp16, duplicated into both halves (read-only: free to schedule early)
    u16 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return (u32)v | ((u32)v << 16);
}
DEV float half_lo_to_float(u32 h2) {
    float f;
    asm("{ .reg .f16 lo, hi; mov.b32 {lo, hi}, %1; cvt.f32.f16 %0, lo; }" : "=f"(f) : "r"(h2));
    return f;
}
#endif
// Programmatic dependent launch (cuda_gemv.EARLY_LAUNCH; wait_for_inputs and release_dependents in common.cuh):
// before the wait a GEMV reads codes, scales and constant tables only. NO_EARLY_RELEASE (which
// benchmarks/decode_pdl.py sets to measure it) leaves the release to the block's exit.
DEV U4 zero4() { U4 z = {0u, 0u, 0u, 0u}; return z; }
DEV u32 word(const U4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

#define MAGIC 0x64006400u
#ifndef PIN_XS
#define PIN_XS 0
#endif

#if KIND == 0 || KIND == 3
#define CODES_PER_WORD (32 / BITS)
#define HALF_PER_WORD CODES_PER_WORD
#elif KIND == 2
#define CODES_PER_WORD 4  // grid indices in aux32[0]; its sign indices and scale are the next word
#define HALF_PER_WORD 16
#else
#define CODES_PER_WORD 2
#define HALF_PER_WORD 16
#endif
#define HALF_PER_CHUNK (4 * HALF_PER_WORD)  // weights in 16 bytes of codes
#define KQ_HI_WORDS (KQ_HB * HALF_PER_CHUNK / 32)  // words of high code bits per chunk (magic_with_hi)

// Activations, in 16-byte units u of the lane's batch row. The four lanes t of a quad read chunks 4 s + t at the
// same offset; 8-unit chunks 128 bytes apart (4-unit ones 64) would sit in the same shared-memory banks. Batch 1
// (XS 1) stores unit u at u + u / 8, one unit of padding after every 8, so the quad's loads fall on different banks
// and every load of a chunk is an immediate offset from one address per chunk. Several rows (XS 2) swizzle
// instead, unit u at u ^ ((u / 8) % 8) (no padding: batch 8 at K = 4096 stays within 64 KB). Without XS the
// activations come from global memory (L1/L2).
#ifdef LOWBIT_HOST
#define dyn ((U4*)lowbit_host::dyn_ptr)  // the block's dynamic shared memory (cuda/host.h)
#else
extern __shared__ U4 dyn[];
#endif
#define XS_UNITS(K) (((K) / 8 + 7) / 8 * 8)  // 16-byte units of one swizzled row (XS 2), whole swizzle groups
// The activations of batch column g (rows past M repeat row M - 1): staged in shared memory (XS) or in global memory.
DEV const U4* activation_row(const u16* x, int g, int M, int K) {
#if XS == 2
    return dyn + min(g, M - 1) * XS_UNITS(K);
#elif XS
    return dyn;
#else
    return (const U4*)(x + (size_t)min(g, M - 1) * K);
#endif
}
// A chunk's activations start at unit u0 of the row: xchunk() once per chunk, then x_at(xb, u0, v) for its units
// u0 + v (u0 % 8 + v < 8: the unit stays in u0's group of 8).
DEV const U4* xchunk(const U4* xrow, int u0) {
#if XS == 1
    return xrow + u0 + (u0 >> 3);
#elif XS == 2
    return xrow;
#else
    return xrow + u0;
#endif
}
DEV U4 x_at(const U4* xb, int u0, int v) {
#if XS == 1 && PIN_XS && !defined(LOWBIT_HOST)
    U4 q;  // xb holds the row's 32-bit shared-memory address (PIN_XS)
    asm("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(q.x), "=r"(q.y), "=r"(q.z), "=r"(q.w)
        : "r"((u32)(size_t)(xb + v)));
    return q;
#elif XS == 1
    return xb[v];
#elif XS == 2
    const int u = u0 + v;
    return xb[u ^ ((u >> 3) & 7)];
#else
    return ld_cached(xb + v);
#endif
}
// The MMA's B fragment pairs activation k with k + G / 2 within each group of G (16 for 2-bit grids, 8 for 4-bit
// grids and E8P: the order the fp16 magic-number decode yields weights in). Staged rows (XS) are stored in that
// order (stage_block), so the fragments are plain words: b0 = word 2m, b1 = word 2m + 1 of the group. Rows read
// from global memory are permuted here, two PRMTs per MMA.
#define PREPERM (XS && KIND != 2)
DEV void b_frag(const u32* xr, int m, int half, u32& b0, u32& b1) {
#if PREPERM
    b0 = xr[2 * m];
    b1 = xr[2 * m + 1];
#else
    b0 = prmt(xr[m], xr[m + half], 0x5410u);  // (x_2m, x_2m+G/2)
    b1 = prmt(xr[m], xr[m + half], 0x7632u);  // (x_2m+1, x_2m+1+G/2)
#endif
}
#define LOG2_HALF_PER_CHUNK (HALF_PER_CHUNK == 64 ? 6 : 5)
// scale (and min) of a pair: group scales per weight, or none when the row scale multiplies the fp32 sums
// Where every 16-byte chunk lies inside one scale group (IQ2_XXS: d per 256 weights), the chunk's scales are
// loaded with its codes, a step ahead, instead of when the chunk is decoded (a load waited for in every step).
#if KIND >= 2 || STEP_SCALE || (KIND == 0 && !ROW_SCALE && GROUP_SHIFT >= LOG2_HALF_PER_CHUNK)
#define CHUNK_SCALE 1
#else
#define CHUNK_SCALE 0
#endif
#if KIND == 2 && !STEP_SCALE
#error "IQ2_XXS is built step-scaled (cuda_gemv.Plan.step_scaled)"
#endif
#if ROW_SCALE || STEP_SCALE
#define APPLY_SCALE(l, s, m) (l)
#elif ASYM
#define APPLY_SCALE(l, s, m) hfma2((l), (s), (m))
#else
#define APPLY_SCALE(l, s, m) hmul2((l), (s))
#endif


#if (KIND == 0 || KIND == 3) && BITS == 2
// Codes i and i + 8 of a word sit at bits 2i and 2i + 16; codes 1..4 are read in place (magic 1024 + 4^i q), code
// 0 after a shift left by 2 and codes 5..7 after a shift right by 8, so that no code sits at bit 0: with a weight of
// at least 4 on q, every B constant of an affine set (q - 1.5 included) is exact in fp16.
#if KQ_HB  // 3-bit codes (Q3_K): code 4 is read after a shift right by 4, so that its third (high) bit still fits
#define DQ_SRC(w, i) ((i) == 0 ? (w) << 2 : (i) == 4 ? (w) >> 4 : (i) < 5 ? (w) : (w) >> 8)
#define DQ_MASK(i) (0x00030003u << ((i) == 0 ? 2 : (i) == 4 ? 4 : (i) < 5 ? 2 * (i) : 2 * ((i) - 4)))
#else
#define DQ_SRC(w, i) ((i) == 0 ? (w) << 2 : (i) < 5 ? (w) : (w) >> 8)
#define DQ_MASK(i) (0x00030003u << ((i) == 0 ? 2 : (i) < 5 ? 2 * (i) : 2 * ((i) - 4)))
#endif
#define DQ_CONSTS_A {DQ_A0, DQ_A1, DQ_A2, DQ_A3, DQ_A4, DQ_A5, DQ_A6, DQ_A7}
#define DQ_CONSTS_B {DQ_B0, DQ_B1, DQ_B2, DQ_B3, DQ_B4, DQ_B5, DQ_B6, DQ_B7}
#elif KIND == 0 || KIND == 3
// codes i and i + 4 at bits 4i and 4i + 16: (w, 0x000f000f) -> (q0, q4), (w, 0x00f000f0) -> 16 (q1, q5), then w >> 8
#define DQ_SRC(w, i) ((i) < 2 ? (w) : (w) >> 8)
#define DQ_MASK(i) ((i) % 2 ? 0x00f000f0u : 0x000f000fu)
#define DQ_CONSTS_A {DQ_A0, DQ_A1, DQ_A0, DQ_A1}
#define DQ_CONSTS_B {DQ_B0, DQ_B1, DQ_B0, DQ_B1}
#endif

#if KIND == 0 || KIND == 3
#if KQ_HB
// The high bits of 3-, 5- and 6-bit codes (cuda_gemv.split_codes), one hi word per chunk (5 bits) or two (3 and 6
// bits: words 2e and 2e + 1 of the chunk in hi word e, KQ_HI_WORDS): the high bits of pair i of word j (codes i and
// i + PAIRS) at bit KQ_HI_AT[PAIRS j + i] and 16 higher (cuda_gemv.hi_positions: placed so that the pairs of a hi
// word need few distinct shifts). Pair i's low bits sit at bit L of each half (DQ_MASK: 4-bit low codes L = 4 (i %
// 2), 2-bit L = 2, 4 or 6), so its high bits go to L + BITS (one shift, shared, and the mask of the LOP3 that also
// sets the magic exponent): the magic number becomes 1024 + 2^L q with the whole code q = low + 2^BITS high (q 2^L
// stays inside the 10-bit mantissa: <= 63 x 16, <= 7 x 64).
#if BITS == 4
#define KQ_LOW_AT(i) (4 * ((i) & 1))
#else
#define KQ_LOW_AT(i) ((i) == 0 || (i) == 1 || (i) == 5 ? 2 : (i) == 3 || (i) == 7 ? 6 : 4)
#endif
DEV u32 magic_with_hi(u32 h, int i, int j) {
    constexpr int at[4 * HALF_PER_WORD / 2] = KQ_HI_AT;
    const int p = KQ_LOW_AT(i) + BITS;
    const int sh = p - at[HALF_PER_WORD / 2 * j + i];
    return lop3_and_or(sh >= 0 ? h << sh : h >> -sh, (((1u << KQ_HB) - 1u) * 0x00010001u) << p, MAGIC);
}
#else
DEV u32 magic_with_hi(u32, int, int) { return MAGIC; }
#endif
#define PAIRS (HALF_PER_WORD / 2)  // code pairs in a word: 8 (2-bit) or 4 (4-bit), two per MMA
// word j of both rows -> PAIRS / 2 MMAs; pair i is (code i, code i + PAIRS), so the activations pair the same way:
// halves m and m + PAIRS / 2 of the word's u32s. ha, hb: the hi words holding word j's high code bits.
DEV void word_mma(float* d, u32 wa, u32 wb, u32 ha, u32 hb, int j, const u32* xr, u32 sa, u32 sb, u32 ma, u32 mb) {
    const u32 A[PAIRS] = DQ_CONSTS_A, B[PAIRS] = DQ_CONSTS_B;
#pragma unroll
    for (int m = 0; m < PAIRS / 2; ++m) {
        u32 a[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) {  // a0, a2: row g, pairs 2m, 2m + 1; a1, a3: row g + 8
            const int i = 2 * m + h / 2;
            const u32 v = hfma2(lop3_and_or(DQ_SRC(h % 2 ? wb : wa, i), DQ_MASK(i), magic_with_hi(h % 2 ? hb : ha, i, j)),
                                A[i], B[i]);
            a[h] = h % 2 ? APPLY_SCALE(v, sb, mb) : APPLY_SCALE(v, sa, ma);
        }
        u32 b0, b1;
        b_frag(xr, m, PAIRS / 2, b0, b1);
        mma(d, a[0], a[1], a[2], a[3], b0, b1);
    }
}
#elif KIND == 1
// E8P (stored order: lowbit.formats.e8p.to_stored): code r of a group of four has its 8-bit pattern in byte r of a
// pattern word and its signs in a sign word: the prefix XORs c_j of its negation flags at bits 4 j + r (j < 7) and
// its shift bit t at bit 28 + r. e = E2[t][pattern] ^ 14 f per nibble holds coordinate i as a nibble n = 2 k + b
// at bits 4i: k = 4 + floor(+-|a_i|) (the XOR with 14 flips k around 3.5, negating a_i), b = 1 for the shift +1/4
// (in every nibble), so the coordinate is n / 2 - 3.75. The flags are f_j = c_j ^ c_j-1: the sign word XORed with
// itself a nibble up (nibble 7 gets c_6 ^ t: E2 undoes the t), then 14 f is one multiply. One table read per code:
// the pattern word, at E2[t] through a signed index (the PRMT copies t's bit into bytes 1-3: pattern - 256 t).
// Coordinates i and i + 4 sit at bits 4i and 4i + 16. A LOP3 drops a nibble at bits p..p+3 of each half (p = 1, 4
// or 5) into the mantissa of 1024.0, giving 1024 + 2^p n, and one HFMA2 by 2^-(p+1) and -(512 / 2^p + 3.75) (exact
// in fp16 for these p) gives the coordinate: e << 1 puts coordinate 0 at p = 1, e has coordinate 1 at p = 4,
// e >> 7 puts 2 and 3 at p = 1 and 5.
__shared__ u32 e8p_tab[512];  // E2[1] (shift -1/4), then E2[0]
#ifdef LOWBIT_HOST
DEV u32 e8p_entry(int idx) { return e8p_tab[256 + idx]; }
#else
// e8p_tab[256 + idx], the 256 as the load's immediate offset: written in C, some NVRTC versions (CUDA 12) added it
// in a register, one more instruction per code. Volatile: not moved above the barrier after the table is staged.
DEV u32 e8p_entry(int idx) {
    const u32 at = (u32)__cvta_generic_to_shared(e8p_tab) + 4u * (u32)idx;
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1+1024];" : "=r"(v) : "r"(at));
    return v;
}
#endif
// the coordinates of code r (0..3) of pattern word pw and sign word y, as four fp16 pairs
DEV void code_pairs(u32 pw, u32 y, int r, u32* p) {
    const int idx = (int)prmt(pw, y << (3 - r), 0xFFF0u | (u32)r);  // pattern byte r; t (bit 31 after the shift)
    const u32 lo = r < 2 ? y : y >> 2, hi = r < 2 ? y << 4 : y << 2;  // c_j and c_j-1 at bit 4 j + r % 2
    const u32 f = (lo ^ hi) & (0x11111111u << (r & 1));
    const u32 e = e8p_entry(idx) ^ (f * ((r & 1) ? 7u : 14u));
    const u32 top = e >> 7;
    p[0] = hfma2(lop3_and_or(e << 1, 0x001e001eu, MAGIC), 0x34003400u, 0xDC0FDC0Fu);  // x 1/4 - 259.75
    p[1] = hfma2(lop3_and_or(e, 0x00f000f0u, MAGIC), 0x28002800u, 0xD078D078u);  // x 1/32 - 35.75
    p[2] = hfma2(lop3_and_or(top, 0x001e001eu, MAGIC), 0x34003400u, 0xDC0FDC0Fu);
    p[3] = hfma2(lop3_and_or(top, 0x01e001e0u, MAGIC), 0x24002400u, 0xCCF0CCF0u);  // x 1/64 - 19.75
}
// Word j of a chunk: its codes 2 j and 2 j + 1 (8 weights each), whose pattern bytes are in wa, wb (word j / 2 of
// the chunk) and signs in ya, yb (word 2 + j / 2): step_word passes them.
DEV void word_mma(float* d, u32 wa, u32 wb, u32 ya, u32 yb, int j, const u32* xr, u32 sa, u32 sb, u32 ma, u32 mb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        u32 pa[4], pb[4];
        const int r = 2 * (j & 1) + h;
        code_pairs(wa, ya, r, pa);
        code_pairs(wb, yb, r, pb);
        const u32* xc = xr + 4 * h;
#pragma unroll
        for (int m = 0; m < 2; ++m) {
            u32 b0, b1;
            b_frag(xc, m, 2, b0, b1);
            mma(d, APPLY_SCALE(pa[2 * m], sa, ma), APPLY_SCALE(pb[2 * m], sb, mb),
                APPLY_SCALE(pa[2 * m + 1], sa, ma), APPLY_SCALE(pb[2 * m + 1], sb, mb), b0, b1);
        }
    }
}
#endif

#if KIND == 2
// IQ2_XXS. The kernel layout keeps llama.cpp's 8-byte sub-blocks (aux32[0]: four grid indices; aux32[1]: four
// 7-bit sign indices and the 4-bit scale ls) back to back, and the superblock scales d in their own array, so a
// 16-byte chunk is two sub-blocks (64 weights). iq2_grid[i] holds grid row i as its 8 values (8, 25 or 43) in
// bytes (cuda_gemv.iq2xxs_grid_bytes): one PRMT puts two of them into the mantissas of 1024.0 and one HFMA2
// (x mul + add) gives the fp16 pair. Bytes rather than fp16 pairs halve the shared-memory reads of the grid, which
// bound this kernel (docs/kernels.md). The layout also holds each code's 8 sign bits whole (the 8th, the parity of
// the 7 stored ones, worked out when the layout is built) in the place of the 7-bit indices, and a sub-block's ls in
// a word of eight per superblock, so a code's signs are one PRMT (a byte); one SHF + one LOP3 move sign bits 2p and
// 2p + 1 onto the pair's fp16 sign bits.
// Scale (STEP_SCALE): mul = k = (0.5 + ls) / 4 and add = -1024 k make the HFMA2 give v k in one rounding of an exact
// value (v k = v (2 ls + 1) / 8 has at most 11 significant bits), and d (one per step: a superblock is the quad's
// four chunks) multiplies the step's fp32 sums, so the weights are ggml's fp32 ones exactly.
__shared__ U2 iq2_grid[256];
struct IqScale { u32 mul, add; };  // a sub-block's HFMA2 constants
DEV u32 grid_pair(u32 w, u32 sel, const IqScale& k) { return hfma2(prmt(w, 0x64646464u, sel), k.mul, k.add); }
DEV void iq2_code(u32 gi, u32 s, const IqScale& k, u32* p) {  // s: the code's 8 sign bits
    const U2 b = iq2_grid[gi];
    const U4 g = {grid_pair(b.x, 0x4140u, k), grid_pair(b.x, 0x4342u, k), grid_pair(b.y, 0x4140u, k),
                  grid_pair(b.y, 0x4342u, k)};
    const u32 z = s * 0x8001u;  // bit j at j and j + 15: pair p's two bits land on 15 and 31 after << 15 - 2p
    p[0] = g.x ^ ((z << 15) & 0x80008000u);
    p[1] = g.y ^ ((z << 13) & 0x80008000u);
    p[2] = g.z ^ ((z << 11) & 0x80008000u);
    p[3] = g.w ^ ((z << 9) & 0x80008000u);
}
DEV IqScale iq2_scale(u32 ls) {  // ls: the sub-block's 4-bit scale
    // ls into both halves of 1024.0, then (1024 + ls) / 4 - 255.875 = (0.5 + ls) / 4, exact
    const u32 k = hfma2(ls * 0x00010001u + MAGIC, 0x34003400u, 0xDBFFDBFFu);
    return {k, hmul2(k, 0xE400E400u)};  // -1024 k: exact
}
#endif


#if KIND != 2
// the activations of one word of a chunk: units u0 + off, ... of the chunk's (xb = xchunk(xrow, u0)); zeros for a
// lane past the row's end
DEV void word_x(const U4* xb, int u0, int off, bool ok, u32* xr) {
#pragma unroll
    for (int v = 0; v < HALF_PER_WORD / 8; ++v) {
        U4 q = ok ? x_at(xb, u0, off + v) : zero4();
        xr[4 * v] = q.x; xr[4 * v + 1] = q.y; xr[4 * v + 2] = q.z; xr[4 * v + 3] = q.w;
    }
}
// one word of chunk c of both rows: this lane's words wa, wb, times their activations xr (word_x)
DEV void chunk_mma(float* d, u32 wa, u32 wb, u32 ha, u32 hb, int j, const u32* xr, const u16* sa_row,
                   const u16* sb_row, const u16* ma_row, const u16* mb_row, int k, u32 csa, u32 csb, u32 cma,
                   u32 cmb) {
    u32 sa = 0x3C003C00u, sb = 0x3C003C00u, ma = 0u, mb = 0u;  // 1.0, 0.0
#if CHUNK_SCALE
    sa = csa; sb = csb; ma = cma; mb = cmb;
#elif !ROW_SCALE
    sa = ld_half(sa_row + (k >> GROUP_SHIFT));
    sb = ld_half(sb_row + (k >> GROUP_SHIFT));
#if ASYM
    ma = ld_half(ma_row + (k >> GROUP_SHIFT));
    mb = ld_half(mb_row + (k >> GROUP_SHIFT));
#endif
#endif
    word_mma(d, wa, wb, ha, hb, j, xr, sa, sb, ma, mb);
}
#endif

#if KIND == 3
// A chunk's K-quant scales from its raw words: sm holds two 8-bit integers (Q4_K, Q5_K: the sub-block's sc and mn;
// Q6_K: the int8 sc of its two 16-weight sub-blocks, stored plus 128), dm the superblock's fp16 (d, -dmin) (Q6_K:
// (d, d)). One PRMT puts the integers into the mantissas of the magic number's halves (its 0x64 bytes from MAGIC),
// one HFMA2 takes the magic (and the 128) off exactly, one HMUL2 gives (d sc, -dmin mn) rounded once, as
// fp16(d * sc) of ggml's float32 product (the layout stores -dmin: w = s0 q + s1 is one HFMA2). s0, s1: the two
// halves, each in both halves of a word.
DEV void kq_scales(u32 sm, u32 dm, u32& s0, u32& s1) {
    const u32 v = prmt(sm, MAGIC, 0x7150u);  // (1024 + byte 0, 1024 + byte 1)
#if ASYM
    const u32 f = hfma2(v, 0x3C003C00u, 0xE400E400u);  // - 1024
#else
    const u32 f = hfma2(v, 0x3C003C00u, 0xE480E480u);  // int8 + 128 - 1152
#endif
    const u32 r = hmul2(f, dm);
    s0 = dup_lo(r);
    s1 = dup_hi(r);
}
// Q2_K: word j of a 64-weight chunk is 16-weight sub-block j, whose ggml scale byte (sc | mn << 4) is byte j of sm.
// One PRMT puts it in both halves, one LOP3 keeps sc in the low half and 16 mn in the high one inside the magic
// number, one HFMA2 makes (sc, mn) exactly, one HMUL2 by (d, -dmin) as kq_scales.
// Q3_K: byte j is sub-block j's int8 sc plus 128 (the layout's), put into both halves of the magic number by one
// PRMT (as kq_scales), made fp16 by one HFMA2 and times (d, d): no PRMT after.
DEV void kq_sub_scales(u32 sm, u32 dm, int j, u32& s, u32& m) {
#if ASYM
    const u32 t = prmt(sm, 0u, 0x4040u | (u32)j | ((u32)j << 8));  // byte j -> bytes 0 and 2
    const u32 f = hfma2(lop3_and_or(t, 0x00F0000Fu, MAGIC), 0x2C003C00u, 0xD400E400u);  // (x - 1024) / (1, 16)
    const u32 r = hmul2(f, dm);
    s = dup_lo(r);
    m = dup_hi(r);
#else
    const u32 t = prmt(sm, MAGIC, 0x7050u | (u32)j | ((u32)j << 8));  // (1024 + byte j) in both halves
    s = hmul2(hfma2(t, 0x3C003C00u, 0xE480E480u), dm);  // int8 + 128 - 1152
    m = 0u;
#endif
}
#endif
// the hi word that holds word j's high code bits (magic_with_hi; zero but in codes with high bits)
DEV u32 kq_hi(const U2& h, int j) { return KQ_HI_WORDS == 2 && j >= 2 ? h.y : h.x; }

// One step of a lane: 16 bytes of codes of both rows (chunk c) and, with CHUNK_SCALE, the chunk's scales and mins.
// KIND 3: sa, sb the raw scale integers, ma, mb the raw (d, -dmin). ha, hb: the high code bits (KQ_HB, kq_hi).
struct Step { U4 a, b; u32 sa, sb, ma, mb; U2 ha, hb; };

#if KIND == 2
// Sub-block h (0 or 1: 32 weights) of a step's chunk: words 2h and 2h + 1 of w.a (w.b) are row g's (g + 8's) aux32
// words; units 4 h .. 4 h + 3 of the chunk's activations (xb = xchunk(xrow, u0)). TILES 2: the second row block's
// (w1, d1) is multiplied by the same activations.
DEV void iq2_tile(float* d, const Step& w, int h, int c, const U4& xq, const IqScale& sa, const IqScale& sb) {
    u32 pa[4], pb[4];
    const u32 qa0 = word(w.a, 2 * h), qa1 = word(w.a, 2 * h + 1), qb0 = word(w.b, 2 * h), qb1 = word(w.b, 2 * h + 1);
    iq2_code(prmt(qa0, 0u, 0x4440u + c), prmt(qa1, 0u, 0x4440u + c), sa, pa);  // grid index, signs: byte c
    iq2_code(prmt(qb0, 0u, 0x4440u + c), prmt(qb1, 0u, 0x4440u + c), sb, pb);
    mma(d, pa[0], pb[0], pa[1], pb[1], xq.x, xq.y);
    mma(d, pa[2], pb[2], pa[3], pb[3], xq.z, xq.w);
}
// The 4-bit scale of sub-block h of a step's chunk in row a (b): nibble 2 t + h of the superblock's ls word (the
// chunk is sub-blocks 2 t, 2 t + 1 of it), which load_step put at bit 16 + 4 h of the scale word
#define IQ2_LS(w, row, h) (((w).s##row >> (16 + 4 * (h))) & 15u)
DEV void iq2_sub(float* d, const Step& w, float* d1, const Step& w1, int h, const U4* xb, int u0, bool ok) {
    const IqScale sa = iq2_scale(IQ2_LS(w, a, h)), sb = iq2_scale(IQ2_LS(w, b, h));
#if TILES == 2
    const IqScale sa1 = iq2_scale(IQ2_LS(w1, a, h)), sb1 = iq2_scale(IQ2_LS(w1, b, h));
#endif
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const U4 xq = ok ? x_at(xb, u0, 4 * h + c) : zero4();
        iq2_tile(d, w, h, c, xq, sa, sb);
#if TILES == 2
        iq2_tile(d1, w1, h, c, xq, sa1, sb1);
#endif
    }
}
#endif
// pa, pb point at chunk c of the two code rows. Past the row's end (lanes of a partial last step, and without FULL
// the prefetch after the last step) the caller passes the row's last chunk, a valid address, instead of predicating
// the loads, and zeroes those lanes' activations.
DEV Step load_step(const U4* pa, const U4* pb, const u16* sa_row, const u16* sb_row, const u16* ma_row,
                   const u16* mb_row, const u32* ha_row, const u32* hb_row, int c) {
    Step st;
    st.a = ld_stream(pa);
    st.b = ld_stream(pb);
    st.sa = st.sb = 0x3C003C00u;
    st.ma = st.mb = 0u;
    st.ha = st.hb = U2{0u, 0u};
#if KIND == 3
#if BITS == 2  // Q2_K, Q3_K: 4 scale bytes per chunk
    st.sa = ld_u32((const u32*)sa_row + c);
    st.sb = ld_u32((const u32*)sb_row + c);
#else
    st.sa = ld_u16(sa_row + c);
    st.sb = ld_u16(sb_row + c);
#endif
    st.ma = ld_u32((const u32*)ma_row + c * HALF_PER_CHUNK / 256);  // one (d, -dmin) per 256-weight superblock
    st.mb = ld_u32((const u32*)mb_row + c * HALF_PER_CHUNK / 256);
#elif CHUNK_SCALE
    const int k = c * HALF_PER_CHUNK;
#if KIND == 2  // d in the low half (add_step uses its fp32 value) and the chunk's two ls (byte t of the superblock's
               // ls word) in the high half: no register more
    st.sa = ld_u16(sa_row + (k >> 8));
    st.sb = ld_u16(sb_row + (k >> 8));
    const int at = 8 * (threadIdx.x & 3);
    st.sa |= ((ld_u32((const u32*)ma_row + (k >> 8)) >> at) & 0xffu) << 16;
    st.sb |= ((ld_u32((const u32*)mb_row + (k >> 8)) >> at) & 0xffu) << 16;
#elif STEP_SCALE
    st.sa = ld_u16(sa_row + (k >> GROUP_SHIFT));
    st.sb = ld_u16(sb_row + (k >> GROUP_SHIFT));
#else
    st.sa = ld_half(sa_row + (k >> GROUP_SHIFT));
    st.sb = ld_half(sb_row + (k >> GROUP_SHIFT));
#if ASYM
    st.ma = ld_half(ma_row + (k >> GROUP_SHIFT));
    st.mb = ld_half(mb_row + (k >> GROUP_SHIFT));
#endif
#endif
#endif
#if KQ_HI_WORDS == 2
    st.ha = ld_stream_pair(ha_row + 2 * c);
    st.hb = ld_stream_pair(hb_row + 2 * c);
#elif KQ_HI_WORDS == 1
    st.ha.x = ld_stream_u32(ha_row + c);
    st.hb.x = ld_stream_u32(hb_row + c);
#endif
    return st;
}

// Set-up of a block: the decode tables and (XS) the activation rows into shared memory. The caller synchronises
// the block before they are read.
// Groups of SG units of activations (the fragment group G, b_frag): permuted into fragment order (PREPERM) and
// stored at their staged places.
#define SG (((KIND == 0 || KIND == 3) && BITS == 2) ? 2 : 1)
// Where unit su of staged activation row ``row`` lies: XS 1 one unit of padding after every 8, XS 2 swizzled
DEV U4* staged_at(int row, int su, int K) {
#if XS == 2
    return dyn + row * XS_UNITS(K) + (su ^ ((su >> 3) & 7));
#else
    return dyn + su + (su >> 3);
#endif
}
DEV void store_units(const u32* w, int row, int u, int K) {
#if PREPERM
    u32 o[4 * SG];
#pragma unroll
    for (int m = 0; m < 2 * SG; ++m) {
        o[2 * m] = prmt(w[m], w[m + 2 * SG], 0x5410u);
        o[2 * m + 1] = prmt(w[m], w[m + 2 * SG], 0x7632u);
    }
#else
    const u32* o = w;
#endif
#pragma unroll
    for (int i = 0; i < SG; ++i) *staged_at(row, u + i, K) = U4{o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]};
}

#if NORM
#if XS != 1
#error "NORM normalizes the one staged activation row (XS 1)"
#endif
// two normalized activations: fp16(x r), then times the fp16 norm weights (transformers: weight * x.to(fp16))
DEV u32 norm_pair(u32 x2, u32 w2, float r) {
    const u32 lo = float_to_half(half_to_float((u16)(x2 & 0xffffu)) * r);
    const u32 hi = float_to_half(half_to_float((u16)(x2 >> 16)) * r);
    return hmul2(lo | (hi << 16), w2);
}
DEV float sum_squares(const U4& v, float ss) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 h2 = word(v, j);
        const float lo = half_to_float((u16)(h2 & 0xffffu)), hi = half_to_float((u16)(h2 >> 16));
        ss = fmaf(lo, lo, ss);
        ss = fmaf(hi, hi, ss);
    }
    return ss;
}
// The batch-1 row staged as RMSNorm(x) (transformers' Llama: the fp32 mean of squares, x / sqrt(. + eps) rounded
// to fp16, times the fp16 weights). Each thread holds its NORM_QS groups of units in registers: the norm weights
// are requested before the wait (they do not come from the kernel before), x once after it; the block sums the
// squares in a fixed order. One barrier more than plain staging and no second read of x.
DEV void stage_normalized(const u16* x, const u16* nw, int K, float eps) {
    __shared__ float warp_sums[WARPS];
    const int groups = K / 8 / SG;
    U4 wv[NORM_QS][SG], xv[NORM_QS][SG];
#pragma unroll
    for (int j = 0; j < NORM_QS; ++j) {
        const int q = threadIdx.x + j * WARPS * 32;
#pragma unroll
        for (int i = 0; i < SG; ++i) wv[j][i] = q < groups ? ld_cached((const U4*)nw + q * SG + i) : zero4();
    }
    wait_for_inputs();  // x is the output of the kernel before
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_QS; ++j) {
        const int q = threadIdx.x + j * WARPS * 32;
#pragma unroll
        for (int i = 0; i < SG; ++i) {
            xv[j][i] = q < groups ? ld_cached((const U4*)x + q * SG + i) : zero4();
            ss = sum_squares(xv[j][i], ss);
        }
    }
    const float r = rsqrtf(block_sum<WARPS>(ss, warp_sums) / (float)K + eps);
#pragma unroll
    for (int j = 0; j < NORM_QS; ++j) {
        const int q = threadIdx.x + j * WARPS * 32;
        if (q >= groups) continue;
        u32 w[4 * SG];
#pragma unroll
        for (int i = 0; i < SG; ++i) {
            const U4& v = xv[j][i];
            const U4& n = wv[j][i];
            w[4 * i] = norm_pair(v.x, n.x, r); w[4 * i + 1] = norm_pair(v.y, n.y, r);
            w[4 * i + 2] = norm_pair(v.z, n.z, r); w[4 * i + 3] = norm_pair(v.w, n.w, r);
        }
        store_units(w, 0, q * SG, K);
    }
}
#endif

DEV void stage_block(const u32* tables, const u16* x, int K, int M, const u16* nw, float eps) {
#if KIND == 1
    for (int i = threadIdx.x; i < 512; i += WARPS * 32) e8p_tab[i] = tables[i];
#elif KIND == 2
    for (int i = threadIdx.x; i < 256; i += WARPS * 32) iq2_grid[i] = ((const U2*)tables)[i];
#endif
#if NORM
    stage_normalized(x, nw, K, eps);
#else
    wait_for_inputs();  // x is the output of the kernel before
#if XS
    const int units = K / 8, total = M * (units / SG);
    for (int q = threadIdx.x; q < total; q += WARPS * 32) {
        const int row = XS == 1 ? 0 : q / (units / SG), u = (q - row * (units / SG)) * SG;
        u32 w[4 * SG];
#pragma unroll
        for (int i = 0; i < SG; ++i) {
            const U4 v = ld_cached((const U4*)x + (size_t)row * units + u + i);
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
        store_units(w, row, u, K);
    }
#endif
#endif
}

#if RESID && GATED
#error "RESID adds a residual to plain projections (o, down), not to a gated [gate; up] product"
#endif
// Warp 0 of a block: the other warps' partial sums added, the epilogue applied, y written. d[0], d[1]: row g,
// batch columns 2t, 2t + 1; d[2], d[3]: row g + 8 (GATED: the up row of gate row g). rv: the residuals (RESID).
DEV void finish_rows(float* d, float (*part)[32][4], int row0, u16* y, const float* rv, int N, int M) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int w = 1; w < WARPS; ++w)
#pragma unroll
        for (int e = 0; e < 4; ++e) d[e] += part[w][lane][e];
#if GATED
#pragma unroll
    for (int e = 0; e < 2; ++e) {  // silu(gate) * up, from the fp32 sums
        const int col = 2 * t + e, row = row0 + g;
        if (col < M && row < N) y[(size_t)col * N + row] = float_to_half(d[e] / (1.f + __expf(-d[e])) * d[e + 2]);
    }
#else
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int col = 2 * t + (e & 1), row = row0 + g + 8 * (e >> 1);
#if RESID
        // transformers adds the projection's fp16 output to the fp16 residual: two roundings
        if (col < M && row < N) y[(size_t)col * N + row] = float_to_half(half_to_float(float_to_half(d[e])) + rv[e]);
#else
        if (col < M && row < N) y[(size_t)col * N + row] = float_to_half(d[e]);
#endif
    }
#endif
}

// The warps' partial sums of one row block added in shared memory; warp 0 applies the epilogue and writes y.
DEV void store_rows(float* d, float (*part)[32][4], int row0, u16* y, const u16* res, int N, int M) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float rv[4] = {};  // warp 0's residuals (RESID), requested before the block's barrier
#if RESID
    if (warp == 0) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = 2 * t + (e & 1), row = row0 + g + 8 * (e >> 1);
            if (col < M && row < N) rv[e] = half_to_float(res[(size_t)col * N + row]);
        }
    }
#endif
#pragma unroll
    for (int e = 0; e < 4; ++e) part[warp][lane][e] = d[e];
    __syncthreads();
    if (warp == 0) finish_rows(d, part, row0, y, rv, N, M);
}

// A block's rows: row block `tile` (16 rows; GATED: 8 gate rows and their 8 up rows N further on). Ragged N: the
// last rows are clamped into the matrix and not written.
struct Rows { int row0, ra, rb; };
DEV Rows rows_of(int tile, int N) {
    const int g = (threadIdx.x & 31) >> 2;
#if GATED
    const int row0 = tile * 8, ra = min(row0 + g, N - 1);
    return {row0, ra, ra + N};
#else
    const int row0 = tile * 16;
    return {row0, min(row0 + g, N - 1), min(row0 + g + 8, N - 1)};
#endif
}

// Where the rows r start: their codes (16-byte chunks), scales and mins.
// KIND 3: scales are the chunks' integer scales (groups = K / 32 u16 per row), mins the superblocks' (d, -dmin)
// words. hi: the high code bits (KQ_HI_WORDS words per chunk; the decode tables' argument).
struct RowPtrs { const U4 *ca, *cb; const u16 *sa, *sb, *ma, *mb; const u32 *ha, *hb; };
DEV RowPtrs row_ptrs(const u32* codes, const u16* scales, const u16* mins, const u32* hi, Rows r, int chunks,
                     int groups) {
    // u16 units; KIND 3: a u32 (d, -dmin) per 256 weights; KIND 2: a u32 ls word per superblock
    const int min_stride = KIND == 3 ? groups / 4 : KIND == 2 ? 2 * groups : groups;
    return {(const U4*)codes + (size_t)r.ra * chunks, (const U4*)codes + (size_t)r.rb * chunks,
            scales + (size_t)r.ra * groups, scales + (size_t)r.rb * groups, mins + (size_t)r.ra * min_stride,
            mins + (size_t)r.rb * min_stride, hi + (size_t)r.ra * chunks * KQ_HI_WORDS,
            hi + (size_t)r.rb * chunks * KQ_HI_WORDS};
}
// The first step of a lane in rows p: chunk c0 of both rows, with its scales.
DEV Step first_step(const RowPtrs& p, int c0) {
    return load_step(p.ca + c0, p.cb + c0, p.sa, p.sb, p.ma, p.mb, p.ha, p.hb, c0);
}

#if KIND != 2
// The chunk scales of word j of a step (KIND 3: from its raw integers; ks: Q4_K-Q6_K's kq_scales of the chunk).
struct KScales { u32 sa0, sa1, sb0, sb1; };
DEV KScales chunk_kscales(const Step& w) {
    KScales k = {0u, 0u, 0u, 0u};
#if KIND == 3 && BITS == 4
    kq_scales(w.sa, w.ma, k.sa0, k.sa1);
    kq_scales(w.sb, w.mb, k.sb0, k.sb1);
#endif
    return k;
}
DEV void word_scales(const Step& w, const KScales& ks, int j, u32& csa, u32& csb, u32& cma, u32& cmb) {
#if KIND == 3
#if BITS == 2  // Q2_K, Q3_K: word j is sub-block j
    kq_sub_scales(w.sa, w.ma, j, csa, cma);
    kq_sub_scales(w.sb, w.mb, j, csb, cmb);
#else  // Q4_K, Q5_K: one sub-block (s0, -m) per chunk; Q6_K: words 0, 1 and 2, 3 are two sub-blocks
    csa = ASYM || j < 2 ? ks.sa0 : ks.sa1;
    csb = ASYM || j < 2 ? ks.sb0 : ks.sb1;
    cma = ASYM ? ks.sa1 : 0u;
    cmb = ASYM ? ks.sb1 : 0u;
#endif
#else
    csa = w.sa; csb = w.sb; cma = w.ma; cmb = w.mb;
#endif
}
// Word j of both rows of a step times its activations xr (word_x): the scales, then the MMAs.
DEV void step_word(float* d, const Step& w, const KScales& ks, int j, const u32* xr, const RowPtrs& rp, int k) {
    u32 csa, csb, cma, cmb;
    word_scales(w, ks, j, csa, csb, cma, cmb);
#if KIND == 1  // E8P: word j's codes have their patterns in word j / 2 and their signs in word 2 + j / 2
    chunk_mma(d, word(w.a, j >> 1), word(w.b, j >> 1), word(w.a, 2 + (j >> 1)), word(w.b, 2 + (j >> 1)), j, xr,
              rp.sa, rp.sb, rp.ma, rp.mb, k, csa, csb, cma, cmb);
#else
    chunk_mma(d, word(w.a, j), word(w.b, j), kq_hi(w.ha, j), kq_hi(w.hb, j), j, xr, rp.sa, rp.sb, rp.ma, rp.mb, k,
              csa, csb, cma, cmb);
#endif
}
#endif
// PAIRED: the step loop runs two steps per pass, each prefetching into its own registers, which drops the copy of
// the prefetched step at the end of every pass (NVRTC 12.8 and 13.5, sm_90: 3-9% fewer loop instructions). Not for
// the grids whose mins come in groups smaller than a chunk (spills at 64 registers), nor IQ2_XXS and the K-quants
// (measured no faster on an H100: the K-quants faster at 4096 rows, 7-17% slower at 11008 and 14336, Q3_K spilling).
#ifndef PAIRED
#define PAIRED (KIND == 1 || (KIND == 0 && !(ASYM && GROUP_SHIFT < LOG2_HALF_PER_CHUNK)))
#endif
// The lane's step after step s (its chunk c) of rows rp, requested a step ahead (FULL: running pointers pa, pb,
// and no prefetch past the last step, a warp-uniform branch; else the chunk clamped into the row). A macro: as a
// function, returning the step or assigning it through a reference, it changed the registers of the TILES 1
// kernels (NVRTC).
#if FULL
#define PREFETCH(next, pa, pb, rp, s, c)                                                                   \
    if ((s) + WARPS < steps) {                                                                             \
        pa += 4 * WARPS;                                                                                   \
        pb += 4 * WARPS;                                                                                   \
        next = load_step(pa, pb, rp.sa, rp.sb, rp.ma, rp.mb, rp.ha, rp.hb, (c) + 4 * WARPS);               \
    }
#else
#define PREFETCH(next, pa, pb, rp, s, c)                                                                   \
    next = load_step(rp.ca + min((c) + 4 * WARPS, chunks - 1), rp.cb + min((c) + 4 * WARPS, chunks - 1), rp.sa, \
                     rp.sb, rp.ma, rp.mb, rp.ha, rp.hb, min((c) + 4 * WARPS, chunks - 1));
#endif
#if STEP_SCALE
// A step's sums e (its MMAs over unscaled levels) into the row block's d, times the scale of the step's group: the
// same for the quad's four chunks, so each lane applies its own (rows g and g + 8), in fp32.
DEV void add_step(float* d, const float* e, const Step& w) {
    const float fa = half_lo_to_float(w.sa), fb = half_lo_to_float(w.sb);
    d[0] = fmaf(fa, e[0], d[0]); d[1] = fmaf(fa, e[1], d[1]);
    d[2] = fmaf(fb, e[2], d[2]); d[3] = fmaf(fb, e[3], d[3]);
}
#endif
// A row block's sums: the row scale (ROW_SCALE), the warps' partial sums added, y written.
DEV void finish_tile(float* d, const RowPtrs& rp, float (*part)[32][4], int row0, u16* y, const u16* res, int N,
                     int M) {
#if ROW_SCALE
    const float fa = half_lo_to_float(ld_half(rp.sa)), fb = half_lo_to_float(ld_half(rp.sb));
    d[0] *= fa; d[1] *= fa; d[2] *= fb; d[3] *= fb;
#endif
    store_rows(d, part, row0, y, res, N, M);
}

// Blocks loop over row blocks (tile, tile + gridDim.x, ...): cuda_gemv launches as many as stay resident, so each
// stages (and normalizes) the activations once for all its row blocks, and the next row block's first weights are
// requested before this one's partial sums are added. TILES 2: a tile is two row blocks (variables ...1 for the
// second; separate variables rather than arrays: arrays of steps changed the TILES 1 kernels' registers).
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
gemv_mma(const u32* __restrict__ codes, const u16* __restrict__ scales, const u16* __restrict__ mins,
         const u16* __restrict__ x, u16* __restrict__ y, const u32* __restrict__ tables, int N, int K, int M,
         int groups, const u16* __restrict__ nw, const u16* __restrict__ res, float eps, int tiles) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunks = K / HALF_PER_CHUNK;  // 16-byte chunks per row
    // Lane t reads all 16 bytes of chunk 4 s + t (one 128-bit load); its 4 words are 4 consecutive k-ranges. The
    // next step's weights are requested before this step is decoded (software pipelining: loads overlap math).
    // Lanes past the row's end (K not a multiple of 4 chunks) add zeros.
#if XS == 1 && PIN_XS && !defined(LOWBIT_HOST)
    // the staged row's shared-memory address, computed once and opaque to the compiler: at the register cap ptxas
    // otherwise recomputes it (S2R SR_CgaCtaId, LEA) on every pass (cuda_gemv.PIN_XS)
    u32 xs_addr = (u32)__cvta_generic_to_shared(dyn);
    asm volatile("" : "+r"(xs_addr));
    const U4* xc = (const U4*)(size_t)xs_addr;
#else
    const U4* xc = activation_row(x, g, M, K);
#endif
    const int steps = (chunks + 3) / 4;
    // FULL: running pointers to the lane's next chunk; else each step's chunk clamped into the row. Warps with no
    // step at all (K of few chunks) read the last chunk here and never use it.
    const int c0 = min(warp * 4 + t, chunks - 1);
    Rows r = rows_of(blockIdx.x * TILES, N);
    Step next = first_step(row_ptrs(codes, scales, mins, tables, r, chunks, groups), c0);  // in flight during set-up
#if TILES == 2
    Rows r1 = rows_of(blockIdx.x * TILES + 1, N);
    Step next1 = first_step(row_ptrs(codes, scales, mins, tables, r1, chunks, groups), c0);
#endif
    stage_block(tables, x, K, M, nw, eps);
#if KIND != 0 || XS
    __syncthreads();
#endif
#if XS == 2
    // The warps' partial sums in the dynamic shared memory: after the staged rows where a block loops (the next
    // tile reads them again), else over them, once every warp is done with them (the barrier before finish_tile):
    // 8 rows of 14336 fill all but 3 KB of the 227 KB a Hopper block may have.
    float(*part)[32][4] = (float(*)[32][4])(dyn + (RESIDENT ? M * XS_UNITS(K) : 0));
#else
    __shared__ float part[WARPS][32][4];
#endif
#if RESIDENT
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
#else
    {  // one tile per block: the kernel as it was before RESIDENT
        const int tile = blockIdx.x;
#endif
        // derived from r in each pass (only r is kept across passes: the pointers would cost registers)
        const RowPtrs rp = row_ptrs(codes, scales, mins, tables, r, chunks, groups);
        const U4 *pa = rp.ca + c0, *pb = rp.cb + c0;
        float d[4] = {};
#if TILES == 2
        const RowPtrs rp1 = row_ptrs(codes, scales, mins, tables, r1, chunks, groups);
        const U4 *pa1 = rp1.ca + c0, *pb1 = rp1.cb + c0;
        float d1[4] = {};
#endif
        // One step of the lane: chunk c of the row block's rows, codes w (TILES 2: and w1 of the second row block).
        auto run_step = [&](const Step& w, const Step& w1, int c) {
#if TILES != 2
            float* d1 = d;
#endif
#if STEP_SCALE
            float e[4] = {}, e1[4] = {};  // the step's sums (add_step; e1: TILES 2's second row block)
            float *sd = e, *sd1 = e1;
#else
            float *sd = d, *sd1 = d1;
#endif
            const bool ok = FULL || c < chunks;  // FULL: K fills whole steps, every lane's chunk is in the row
            const int u0 = c * HALF_PER_CHUNK / 8;
            const U4* xb = xchunk(xc, u0);
#if KIND == 2
            iq2_sub(sd, w, sd1, w1, 0, xb, u0, ok);
            iq2_sub(sd, w, sd1, w1, 1, xb, u0, ok);
#else
            // idle lanes: scale reads stay in the row
            const int k0 = (FULL ? c : min(c, chunks - 1)) * HALF_PER_CHUNK;
            const KScales ks = chunk_kscales(w);
#if TILES == 2
            const KScales ks1 = chunk_kscales(w1);
#endif
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                u32 xr[HALF_PER_WORD / 2];  // read once for every row block of the tile
                word_x(xb, u0, j * HALF_PER_WORD / 8, ok, xr);
                step_word(sd, w, ks, j, xr, rp, k0 + j * HALF_PER_WORD);
#if TILES == 2
                step_word(sd1, w1, ks1, j, xr, rp1, k0 + j * HALF_PER_WORD);
#endif
            }
#endif
#if STEP_SCALE
            add_step(d, e, w);
#if TILES == 2
            add_step(d1, e1, w1);
#endif
#endif
        };
        // Measured on an H200: loading 2-4 steps ahead (a ring of registers) was slower at every large shape, the
        // registers it takes cost residency or spill (docs/kernel-measurements.md).
        int c = warp * 4 + t;
#if PAIRED
        // Two steps per pass, each requesting the next one into the other's registers (software pipelining: the
        // loads overlap the math), so that no pass copies a prefetched step into the registers it decodes from.
        Step alt;
#if TILES == 2
        Step alt1;
#else
        const Step& next1 = next;
        const Step& alt1 = alt;
#endif
        for (int s = warp; s < steps; s += 2 * WARPS, c += 8 * WARPS) {
            PREFETCH(alt, pa, pb, rp, s, c)
#if TILES == 2
            PREFETCH(alt1, pa1, pb1, rp1, s, c)
#endif
            run_step(next, next1, c);
            if (s + WARPS >= steps) break;
            PREFETCH(next, pa, pb, rp, s + WARPS, c + 4 * WARPS)
#if TILES == 2
            PREFETCH(next1, pa1, pb1, rp1, s + WARPS, c + 4 * WARPS)
#endif
            run_step(alt, alt1, c + 4 * WARPS);
        }
#else
        for (int s = warp; s < steps; s += WARPS, c += 4 * WARPS) {
            const Step w = next;
            PREFETCH(next, pa, pb, rp, s, c)
#if TILES == 2
            const Step w1 = next1;
            PREFETCH(next1, pa1, pb1, rp1, s, c)
            run_step(w, w1, c);
#else
            run_step(w, w, c);
#endif
        }
#endif
        const int row0 = r.row0;
#if TILES == 2
        const int row1 = r1.row0;
#endif
        const bool more = RESIDENT && tile + (int)gridDim.x < tiles;
        if (more) {  // the next tile's first steps, in flight while this one's sums are added
            r = rows_of((tile + gridDim.x) * TILES, N);
            next = first_step(row_ptrs(codes, scales, mins, tables, r, chunks, groups), c0);
#if TILES == 2
            r1 = rows_of((tile + gridDim.x) * TILES + 1, N);
            next1 = first_step(row_ptrs(codes, scales, mins, tables, r1, chunks, groups), c0);
#endif
        }
#ifndef NO_EARLY_RELEASE
        else {
            release_dependents();  // every weight of this block is read
        }
#endif
#if XS == 2 && !RESIDENT
        __syncthreads();  // every warp has read the staged rows that `part` overwrites
#endif
        finish_tile(d, rp, part, row0, y, res, N, M);
#if TILES == 2
        __syncthreads();  // warp 0 has read `part` before the warps write it again
        finish_tile(d1, rp1, part, row1, y, res, N, M);
#endif
        if (more) __syncthreads();  // warp 0 has read `part` before the warps write it again
    }
}
