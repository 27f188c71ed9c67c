// decodebench: definitions shared by every kernel file.
//
// The sources are compiled at run time by NVRTC. They include no CUDA header, so a machine
// needs only the driver and libnvrtc; every conversion is written out here (Hopper has no e2m1
// conversion instruction anyway, and software rounding keeps older GPUs correct too).
//
// The Rust side concatenates this file with each .cu file (with #line markers, so compiler
// errors name the right file and line).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// The dynamic shared memory, declared here and nowhere else. Every `extern __shared__` array of a
// program names the same memory, and where two declarations ask for different alignments the
// compiler may keep either: nvcc kept the first (16, in decode.cu) where decode_mma.cu asked for
// 128, so in kbench's build the tensor-core kernel's swizzled stages started 16 bytes past a
// 128-byte boundary behind its 16 bytes of static shared memory (the fused merge's ticket). Its
// copies then conflicted in shared memory and took twice the L2 requests: 16 % slower at b1
// s65536 than NVRTC's build of the same source, which kept 128 (bench/gpu/NOTES.md, run 47).
// 128: the swizzle's row of 8 16-byte chunks.
#define DB_DYNAMIC_SMEM_ALIGN 128
__device__ __forceinline__ u8* dynamic_smem() {
    extern __shared__ __align__(DB_DYNAMIC_SMEM_ALIGN) u8 db_dynamic_smem[];
    return db_dynamic_smem;
}

#define DB_INF __int_as_float(0x7f800000)
#define DB_LOG2E 1.4426950408889634f

// Parameters of every attention kernel (reference, baseline, optimized, merge). The layout must
// match `AttnParams` in kernels/src/cuda/launch.rs: 8-byte fields first, then 4-byte fields.
// A work item's w field with this bit set: its sequence is not split, so its CTA writes the final
// output rows itself, even in a split plan (see kernels/src/cuda/plan.rs DIRECT_ITEM).
#define DB_DIRECT_ITEM (1 << 30)

struct AttnParams {
    const void* q;            // [batch, qo_heads, head] in the q dtype
    const void* kv;           // paged cache, [pages, 2, ...] in the kv dtype
    const int* block_tables;  // [batch, max_blocks]
    const int* seq_lens;      // [batch]
    void* out;                // [batch, qo_heads, head] (nvfp4: head/2 bytes per row); f32 for the reference
    u8* out_sf;               // nvfp4 scale factors, 128x4 swizzled
    float* partial_o;         // [items, qo_heads, head] split-KV partial outputs
    float* partial_lse;       // [qo_heads, lse_stride] base-2 log-sum-exp of each partial
    const int4* work;         // [ctas] {batch, token_begin, token_end, partial row * kv heads + kv head}
    const int* split_offsets; // [batch + 1] first work item of each sequence
    u32* merge_counters;      // [batch, kv_heads] fused merge: partials written so far (0 between launches)
    i64 page_stride;          // elements per page (both halves)
    i64 half_stride;          // elements from K to V inside a page
    i64 head_stride;          // elements between kv heads at one slot
    i64 slot_stride;          // elements between slots of one kv head
    int batch;
    int num_qo_heads;
    int num_kv_heads;
    int head_size;
    int max_blocks;
    int block_shift;          // log2(block size)
    int group;                // qo heads per kv head
    int sf_cols;              // nvfp4 scale-factor columns before padding: qo_heads*head/16
    int direct;               // optimized kernel: 1 = write final outputs, 0 = write partials
    int direct_items;         // 1: work items flagged DB_DIRECT_ITEM write final outputs and the
                              // merge skips their (unsplit) sequences
    int fused_merge;          // tensor-core kernel, split plans: the last CTA of each (sequence, kv
                              // head) merges its partials (no merge kernel; merge_counters)
    float q_scale;
    float k_scale;
    float v_scale;
    float o_scale;
    float o_sf_scale;
    float sm_scale;
    int partial_evict_last;   // tensor-core kernel: 1 = split partials stored with an L2 evict-last
                              // policy, 0 = evict-normal (decode_mma.cu store_partial; timed per case)
    int lse_stride;           // partial rows (work items): qo head h's log-sum-exps are
                              // partial_lse[h * lse_stride + row], a row's splits side by side
};

enum OutKind { OUT_BF16 = 0, OUT_FP8 = 1, OUT_NVFP4 = 2 };

// ---------------------------------------------------------------------------------------------
// Number formats
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u32 rounding = 0x7fffu + ((u >> 16) & 1u);
    return (u16)((u + rounding) >> 16);
}

// 2^120: an e4m3 bit pattern moved into the f32 exponent/mantissa fields reads as value * 2^-120.
#define DB_E4M3_BITS_SCALE __uint_as_float(0x7b800000u)

// Exact e4m3 (fn variant: no infinities, S.1111.111 is NaN) to f32.
__device__ __forceinline__ float e4m3_to_f32(u8 x) {
    u32 mag = x & 0x7fu;
    if (mag == 0x7fu) return __uint_as_float(0x7fc00000u);
    float v = __uint_as_float(mag << 20) * DB_E4M3_BITS_SCALE;
    return (x & 0x80u) ? -v : v;
}

// f32 to e4m3, saturating to +-448, round to nearest even; NaN gives sign | 0x7f. Written out in
// integer and f32 arithmetic (the rounding the CPU reference defines, kernels/src/formats.rs).
__device__ __forceinline__ u8 f32_to_e4m3_soft(float x) {
    u8 sign = (u8)((__float_as_uint(x) >> 24) & 0x80u);
    float a = fabsf(x);
    if (a != a) return sign | 0x7f;
    if (a >= 448.0f) return sign | 0x7e;
    if (a < 0.015625f) {
        // Subnormal range: multiples of 2^-9. q == 8 encodes 2^-6, the smallest normal.
        int q = (int)rintf(a * 512.0f);
        return sign | (u8)q;
    }
    int e = (int)((__float_as_uint(a) >> 23) & 0xffu) - 127;  // -6 ..= 8
    float m = a * __uint_as_float((u32)(127 - e) << 23);      // [1, 2), exact
    int q = (int)rintf((m - 1.0f) * 8.0f);                     // exact before rounding
    if (q == 8) {
        e += 1;
        q = 0;
    }
    int code = ((e + 7) << 3) | q;
    if (code > 0x7e) code = 0x7e;
    return sign | (u8)code;
}

// The conversion the kernels use. sm_89 and later convert two at a time in hardware
// (`cvt.rn.satfinite.e4m3x2.f32`: round to nearest even, saturating to the largest finite value,
// as the software above; the self-test compares the two on every f32 bit pattern,
// `check_e4m3_conversion` in reference.cu). DB_SOFT_E4M3 forces the software path (kbench A/B).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(DB_SOFT_E4M3)
#define DB_HW_E4M3 1
// lo in bits 0-7, hi in bits 8-15.
__device__ __forceinline__ u32 f32x2_to_e4m3x2(float lo, float hi) {
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return (u32)r;
}
__device__ __forceinline__ u8 f32_to_e4m3(float x) { return (u8)f32x2_to_e4m3x2(x, 0.0f); }
#else
#define DB_HW_E4M3 0
__device__ __forceinline__ u32 f32x2_to_e4m3x2(float lo, float hi) {
    return (u32)f32_to_e4m3_soft(lo) | ((u32)f32_to_e4m3_soft(hi) << 8);
}
__device__ __forceinline__ u8 f32_to_e4m3(float x) { return f32_to_e4m3_soft(x); }
#endif

// e2m1 magnitude code (index into {0, .5, 1, 1.5, 2, 3, 4, 6}) of a >= 0 (or NaN), saturating
// to 6, round to nearest even (ties go to the even code). From 1 up, e2m1 is an f32 with one
// mantissa bit: round the bits to one mantissa bit (nearest even, the carry may bump the
// exponent) and read exponent and bit as the code (1.0 = 0x3f800000 gives 254 - 252 = 2). Below 1
// the codes are the multiples of 1/2: rint(2a). NaN takes the second path and gives 0.
__device__ __forceinline__ u32 e2m1_magnitude(float a) {
    const u32 b = __float_as_uint(a);
    const int hi = min((int)((b + 0x1fffffu + ((b >> 22) & 1u)) >> 22) - 252, 7);
    const int lo = __float2int_rn(a * 2.0f);
    return (u32)(a >= 1.0f ? hi : lo);
}

// f32 to an e2m1 code: bit 3 the sign, the low bits e2m1_magnitude(|x|).
__device__ __forceinline__ u8 f32_to_e2m1(float x) {
    return (u8)(((__float_as_uint(x) >> 28) & 0x8u) | e2m1_magnitude(fabsf(x)));
}

// Offset of scale factor (row m, column k) in the 128x4 swizzled layout with `cols` columns
// before padding.
__device__ __forceinline__ i64 nvfp4_sf_offset(int m, int k, int cols) {
    i64 col_tiles = (cols + 3) / 4;
    return (i64)(m / 128) * (col_tiles * 512) + (i64)(k / 4) * 512 + (m % 32) * 16 +
           ((m % 128) / 32) * 4 + (k % 4);
}

// Eight consecutive cache or query elements, widened to f32.
//
// bf16: exact. e4m3: sm_89 and later have a two-at-a-time conversion to f16 (exact for every
// e4m3 value); older GPUs move the bits into an f32 and read value * 2^-120 (exact too, kept
// as denormals: these sources are compiled without flush-to-zero). KV_RAW_SCALE is the factor
// that turns what `load8_e4m3_raw` returns into the value.
__device__ __forceinline__ void bf16x8_to_f32(uint4 w, float* f) {
    u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(ws[i] << 16);
        f[2 * i + 1] = __uint_as_float(ws[i] & 0xffff0000u);
    }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define DB_KV_RAW_SCALE 1.0f
__device__ __forceinline__ void e4m3x8_to_f32_raw(uint2 w, float* f) {
    u32 ws[2] = {w.x, w.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        u32 lo, hi;
        u16 a = (u16)(ws[i] & 0xffffu), b = (u16)(ws[i] >> 16);
        asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(lo) : "h"(a));
        asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hi) : "h"(b));
        float x0, x1, x2, x3;
        asm("{.reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}"
            : "=f"(x0), "=f"(x1) : "r"(lo));
        asm("{.reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}"
            : "=f"(x2), "=f"(x3) : "r"(hi));
        f[4 * i] = x0;
        f[4 * i + 1] = x1;
        f[4 * i + 2] = x2;
        f[4 * i + 3] = x3;
    }
}
#else
#define DB_KV_RAW_SCALE DB_E4M3_BITS_SCALE
__device__ __forceinline__ void e4m3x8_to_f32_raw(uint2 w, float* f) {
    u32 ws[2] = {w.x, w.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            u32 x = (ws[i] >> (8 * j)) & 0xffu;
            f[4 * i + j] = __uint_as_float(((x & 0x80u) << 24) | ((x & 0x7fu) << 20));
        }
    }
}
#endif

// ---------------------------------------------------------------------------------------------
// Deterministic normal numbers: a counter-based hash, so element i gets the same value
// whatever the launch shape.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ u64 db_mix64(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Standard normal (Box-Muller on two 24-bit uniforms) for (seed, stream, index).
__device__ __forceinline__ float db_normal(u64 seed, u64 stream, u64 index) {
    u64 h = db_mix64(db_mix64(seed ^ db_mix64(stream)) + index);
    u32 a = (u32)(h >> 32), b = (u32)h;
    float u1 = (float)((a >> 8) + 1u) * 5.9604644775390625e-8f;  // (0, 1]
    float u2 = (float)(b >> 8) * 5.9604644775390625e-8f;         // [0, 1)
    return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

// ---------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (sm_80+).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
    u32 dst;
    asm("{.reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a;}" : "=r"(dst) : "l"(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem_src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// NVFP4 pieces shared by every store layout below. A group of 16 elements gets the scale factor
// SF = e4m3(g * amax / 6) (g: the global scale); each element is e2m1(x * g / SF) (the f32
// quotient, correctly rounded), 0 when SF is 0.
//
// The scale factor's code without a division: t / 6 correctly rounded is q0 = RN(t RN(1/6))
// (within an ulp of t / 6, since RN(1/6) is within 2^-25 of 1/6 relatively) corrected by the exact
// remainder (Markstein's theorem, as for the element codes below). |t| is clamped to 4096 first,
// which keeps overflow out and changes no code (t / 6 >= 448 saturates), and the quotient is taken
// of |t| with t's sign put back on the code, so that a quotient that underflows keeps its sign (any
// quotient below 2^-10 has code 0 however it rounds). NaN stays NaN. The self-test compares this
// with e4m3(t / 6) for every f32 t (check_conversions in reference.cu). Branch-free, unlike the
// IEEE division it replaces, whose slow-path test sat on the epilogue's critical path.
#define DB_RCP6 __uint_as_float(0x3e2aaaabu)  // RN(1 / 6)
__device__ __forceinline__ u8 nvfp4_sf_code(float amax, float g) {
    const float t = g * amax;
    const float a = fabsf(t) > 4096.0f ? 4096.0f : fabsf(t);
    const float q0 = a * DB_RCP6;
    const float q = fmaf(fmaf(-q0, 6.0f, a), DB_RCP6, q0);
    return f32_to_e4m3(q) | (u8)((__float_as_uint(t) >> 24) & 0x80u);
}

// 1 / d correctly rounded for every f32 d from 2^-126 to 2^125, branch-free: the hardware
// approximation (relative error below 2^-22) and one Newton step, which is what the IEEE
// reciprocal computes in that range; the compiler's division adds a test for operands outside it
// and a slow path, a branch that nothing is scheduled across. For the merge's sum of weights
// (from 1 up, or 0) and for the e4m3 scale factors (1 / SF is 8 / (8 + k) times a power of two,
// k = 0..7). The self-test compares it with __frcp_rn for every d in the range
// (check_conversions) and for every e4m3 code (check_nvfp4_codes). In two halves, so that a
// caller can issue the approximation early and refine it later.
__device__ __forceinline__ float rcp_approx(float d) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
    return r;
}
__device__ __forceinline__ float rcp_refine(float d, float r) { return fmaf(r, fmaf(-d, r, 1.0f), r); }
__device__ __forceinline__ float rcp_rn_normal(float d) { return rcp_refine(d, rcp_approx(d)); }

// A group's scale factor, its correctly rounded reciprocal and 8 SF (both 0 unless SF > 0), and
// the sign bit kept in its codes (none unless SF > 0: then every code is 0).
struct Nvfp4Scale {
    float sf, rcp, cap;
    u32 sign;
};

__device__ __forceinline__ Nvfp4Scale nvfp4_scale(u8 sf_code) {
#if DB_HW_E4M3
    // Two instructions on sm_89+ (e4m3 -> f16 -> f32, both exact; the NaN code gives NaN).
    u32 h;
    float sf;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((u16)sf_code));
    asm("{.reg .f16 l, u; mov.b32 {l, u}, %1; cvt.f32.f16 %0, l;}" : "=f"(sf) : "r"(h));
#else
    const float sf = e4m3_to_f32(sf_code);
#endif
    const bool ok = sf > 0.0f;
    return {sf, ok ? rcp_rn_normal(sf) : 0.0f, ok ? 8.0f * sf : 0.0f, ok ? 0x8u : 0u};
}

// The element's code without a division per element: with r = RN(1 / SF), q0 = RN(y r) is within
// an ulp of y / SF, and q0 corrected by the exact remainder y - q0 SF (one fma) is the correctly
// rounded quotient (Markstein's theorem; overflow and underflow cannot interfere: |y| is clamped
// to 8 SF first, which changes no code since everything from 8 SF up saturates to 6, and
// quotients below 2^-126 give code 0 however they round). Branch-free: when SF is not positive,
// cap = r = 0 makes q 0 or NaN, both code 0, and the sign is dropped. The self-test compares this
// with e2m1(y / SF) for every scale factor and every y from SF / 16 to 16 SF (check_nvfp4_codes
// in reference.cu). (Comparing |y| with the seven rounding boundaries times SF gives the same
// codes, checked exhaustively, but its 14 more instructions per element made the decode kernel's
// direct NVFP4 stores slower, and the merge no faster: bench/gpu/NOTES.md, run 78.)
__device__ __forceinline__ u32 nvfp4_code(float x, float g, Nvfp4Scale s) {
    const float y = x * g;
    const float a = fabsf(y) > s.cap ? s.cap : fabsf(y);  // NaN stays NaN
    const float q0 = a * s.rcp;
    const float q = fmaf(fmaf(-q0, s.sf, a), s.rcp, q0);
    return ((__float_as_uint(y) >> 28) & s.sign) | e2m1_magnitude(q);
}

// N consecutive elements (N = 2, 4 or 8) of a final output row in the output dtype, as
// store_output_vec writes them: the dtype's words and, for NVFP4, the group's scale-factor code.
template <int OUT, int N>
struct OutputVec {
    static_assert(N == 2 || N == 4 || N == 8, "2, 4 or 8 elements per lane");
    static constexpr int WORDS = OUT == OUT_BF16 ? N / 2 : OUT == OUT_FP8 ? (N + 3) / 4 : 1;
    u32 w[WORDS];
    u8 sf;
};

// The conversion half of store_output_vec: N consecutive elements x[i] / den in f32 before the
// output dtype's scale, taken as x[i] * RN(1 / den) (the merge's sum of weights, which is 0 or from
// 1 up: its largest weight is 1; 0 makes every element 0; callers whose elements are final take the
// form without den below), columns col .. col + N - 1 of a row (col a multiple of N). Arithmetic
// only (and, for NVFP4, the shuffles that find a scale-factor group's amax: the 16 / N lanes that
// hold a group must be consecutive lanes of one warp, and every lane of the warp must call this
// together; lanes with nothing to store pass zeros). No branch, so that a caller converting several
// vectors before writing them gets their chains overlapped, and so that NVFP4's shuffles overlap
// the reciprocal (the shuffles' divergence check is a branch: the reciprocal's approximation is
// issued ahead of it, its refinement after the shuffles, or the compiler waits for it in front of
// them): the amax is taken of the unscaled |x| and scaled once, which is the amax of the scaled
// elements exactly (rounding is monotonic, and fmaxf drops NaNs either way).
// DIV false: den is 1 and not taken (the elements are final): no reciprocal and no scaling on the
// chain, and the same bits, since RN(1 / 1) = 1 and x * 1 = x (callers: convert_output_vec and
// store_output_vec without den).
template <int OUT, int N, bool DIV>
__device__ __forceinline__ OutputVec<OUT, N> convert_output_vec_impl(const AttnParams& p, const float* x_in,
                                                                     float den) {
    OutputVec<OUT, N> v{};
    float x[N];  // x_in / den; NVFP4 scales them after its shuffles (below)
    if constexpr (OUT != OUT_NVFP4) {
        const float s = !DIV ? 1.0f : den > 0.0f ? rcp_rn_normal(den) : 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) x[i] = x_in[i] * s;
    }
    if constexpr (OUT == OUT_BF16) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) v.w[i] = (u32)f32_to_bf16(x[2 * i]) | ((u32)f32_to_bf16(x[2 * i + 1]) << 16);
    } else if constexpr (OUT == OUT_FP8) {
        const float inv = 1.0f / p.o_scale;
#pragma unroll
        for (int i = 0; i < N; i += 2) v.w[i / 4] |= f32x2_to_e4m3x2(x[i] * inv, x[i + 1] * inv) << (8 * (i % 4));
    } else {
        constexpr int LANES = 16 / N;  // lanes per scale-factor group
        const float r = DIV ? rcp_approx(den) : 1.0f;  // issued ahead of the shuffles, refined after them
        float m[N];  // a tree: its depth, not N, is on the way to the shuffles
#pragma unroll
        for (int i = 0; i < N; ++i) m[i] = fabsf(x_in[i]);
#pragma unroll
        for (int w = 1; w < N; w <<= 1)
#pragma unroll
            for (int i = 0; i + w < N; i += 2 * w) m[i] = fmaxf(m[i], m[i + w]);
        float amax = m[0];
#pragma unroll
        for (int off = 1; off < LANES; off <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const float s = !DIV ? 1.0f : den > 0.0f ? rcp_refine(den, r) : 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) x[i] = x_in[i] * s;
        v.sf = nvfp4_sf_code(amax * s, p.o_sf_scale);
        const Nvfp4Scale sf = nvfp4_scale(v.sf);
#pragma unroll
        for (int i = 0; i < N; ++i) v.w[0] |= nvfp4_code(x[i], p.o_sf_scale, sf) << (4 * i);
    }
    return v;
}

// Final elements (no den to divide by).
template <int OUT, int N>
__device__ __forceinline__ OutputVec<OUT, N> convert_output_vec(const AttnParams& p, const float* x) {
    return convert_output_vec_impl<OUT, N, false>(p, x, 1.0f);
}

template <int OUT, int N>
__device__ __forceinline__ OutputVec<OUT, N> convert_output_vec(const AttnParams& p, const float* x, float den) {
    return convert_output_vec_impl<OUT, N, true>(p, x, den);
}

// Where write_output_vec puts elements of final output row b * qo_heads + h (h that row's qo
// head) from column col: byte offsets into p.out and, for NVFP4 on the lane that holds a group's
// first column, into p.out_sf (else -1). Arithmetic only, with no memory access, so that a caller
// can work it out ahead of the conversion and not after it (the scale factor's swizzled offset
// alone is some 40 instructions).
struct OutputDst {
    i64 out, sf;
};

template <int OUT>
__device__ __forceinline__ OutputDst output_dst(const AttnParams& p, int b, int h, int col) {
    const int D = p.head_size;
    const i64 row = (i64)b * p.num_qo_heads + h;
    if constexpr (OUT == OUT_BF16) return {(row * D + col) * 2, -1};
    else if constexpr (OUT == OUT_FP8) return {row * D + col, -1};
    else
        return {row * (D / 2) + col / 2,
                col % 16 == 0 ? nvfp4_sf_offset(b, h * (D / 16) + col / 16, p.sf_cols) : (i64)-1};
}

// The store half: v where dst says.
template <int OUT, int N>
__device__ __forceinline__ void write_output_vec(const AttnParams& p, const OutputVec<OUT, N>& v, OutputDst dst) {
    u8* out = (u8*)p.out + dst.out;
    if constexpr (OUT == OUT_BF16) {
        if constexpr (N == 2) *(u32*)out = v.w[0];
        else if constexpr (N == 4) *(uint2*)out = make_uint2(v.w[0], v.w[1]);
        else *(uint4*)out = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
    } else if constexpr (OUT == OUT_FP8) {
        if constexpr (N == 2) *(u16*)out = (u16)v.w[0];
        else if constexpr (N == 4) *(u32*)out = v.w[0];
        else *(uint2*)out = make_uint2(v.w[0], v.w[1]);
    } else {
        if constexpr (N == 2) *out = (u8)v.w[0];
        else if constexpr (N == 4) *(u16*)out = (u16)v.w[0];
        else *(u32*)out = v.w[0];
        if (dst.sf >= 0) p.out_sf[dst.sf] = v.sf;
    }
}

template <int OUT, int N>
__device__ __forceinline__ void write_output_vec(const AttnParams& p, const OutputVec<OUT, N>& v, int b, int h,
                                                 int col) {
    write_output_vec<OUT, N>(p, v, output_dst<OUT>(p, b, h, col));
}

// N consecutive elements (N = 2, 4 or 8) x[i] / den (as convert_output_vec takes them) of final
// output row b * qo_heads + h, columns col .. col + N - 1, in f32 before the output dtype's scale,
// stored straight from registers (every output store goes through convert_output_vec and
// write_output_vec, so every kernel writes the same bits). Every lane of the warp must call this
// together (NVFP4's shuffles); lanes with `active` false take part in the shuffles only, and their
// groups must be inactive as a whole. The destination is worked out ahead of the conversion, in
// the same block, so that its arithmetic fills the conversion chain's latencies; earlier than
// that (the merge, before its wait) it cost registers and the compiler sank it after the wait
// anyway (bench/gpu/NOTES.md, run 78).
template <int OUT, int N, bool DIV>
__device__ __forceinline__ void store_output_vec_impl(const AttnParams& p, const float* x, int b, int h, int col,
                                                      bool active, float den) {
    const OutputDst dst = output_dst<OUT>(p, b, h, col);
    const OutputVec<OUT, N> v = convert_output_vec_impl<OUT, N, DIV>(p, x, den);
    if (active) write_output_vec<OUT, N>(p, v, dst);
}

template <int OUT, int N>
__device__ __forceinline__ void store_output_vec(const AttnParams& p, const float* x, int b, int h, int col,
                                                 bool active, float den) {
    store_output_vec_impl<OUT, N, true>(p, x, b, h, col, active, den);
}

// Final elements (no den to divide by), as convert_output_vec without den.
template <int OUT, int N>
__device__ __forceinline__ void store_output_vec(const AttnParams& p, const float* x, int b, int h, int col,
                                                 bool active) {
    store_output_vec_impl<OUT, N, false>(p, x, b, h, col, active, 1.0f);
}

// ---------------------------------------------------------------------------------------------
// Split-KV merge of one output row: the partials of items begin, begin + stride, .. < last of qo
// head h, folded into a running (max, sum, weighted row) - an online softmax over splits, with
// weights 2^(lse_i - max). Each lane holds D / 32 consecutive columns (lane * D / 32 ..), and
// MERGE_UNROLL whole partial rows are loaded at once. The loads bypass L1 (ld.global.cg): in the
// fused merge the partials were written by other CTAs of the same kernel, and a line another CTA
// on this SM read earlier (a head's log-sum-exps of neighbouring splits share lines) may be stale
// there.
// merge_accumulate is used by the merge kernel's rows of one warp (decode.cu) and the fused merge
// below; load_partial_rows also by the merge kernel's rows of several warps (merge_row_share).
// ---------------------------------------------------------------------------------------------

#define MERGE_UNROLL 8

// Qo head h's log-sum-exps, one per partial row (split) side by side: the `[qo head, lse_stride]`
// layout of AttnParams::partial_lse, which every split epilogue writes and the merge reads.
// (load_partial_rows works the same base out through an opaque asm, below.)
__device__ __forceinline__ float* partial_lse_row(const AttnParams& p, int h) {
    return p.partial_lse + (i64)h * p.lse_stride;
}

// The partial rows (and, with LSE, log-sum-exps) of items i0, i0 + stride, .. (MERGE_UNROLL of
// them, those < last), lane's VEC columns; items past `last` read as empty (-inf, zeros).
template <int D, bool LSE = true>
__device__ __forceinline__ void load_partial_rows(const AttnParams& p, int h, int i0, int last, int stride,
                                                  int lane, float* lse, float (*x)[D / 32]) {
    constexpr int VEC = D / 32;
    // The row's log-sum-exps, from a base the compiler cannot see through (an empty asm): folded
    // into the rows' addresses, it reshuffled the decode kernels' main loops (this loader is
    // inlined into the fused merge there) and made the e4m3 ones 1-3 % slower
    // (bench/gpu/NOTES.md, calls 136-137).
    u64 lse_row = 0;
    if (LSE) {
        lse_row = (u64)(p.partial_lse + (u32)(h * p.lse_stride));
        asm volatile("" : "+l"(lse_row));
    }
#pragma unroll
    for (int u = 0; u < MERGE_UNROLL; ++u) {
        const int i = i0 + u * stride;
        lse[u] = -DB_INF;
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[u][k] = 0.0f;
        if (i < last) {
            const i64 prow = (i64)i * p.num_qo_heads + h;
            if (LSE) lse[u] = __ldcg((const float*)lse_row + i);
            const float* src = p.partial_o + prow * D + lane * VEC;
            if (VEC % 4 == 0) {
#pragma unroll
                for (int k = 0; k < VEC; k += 4) {
                    const float4 v = __ldcg((const float4*)(src + k));
                    x[u][k] = v.x, x[u][k + 1] = v.y, x[u][k + 2] = v.z, x[u][k + 3] = v.w;
                }
            } else {
#pragma unroll
                for (int k = 0; k < VEC; k += 2) {
                    const float2 v = __ldcg((const float2*)(src + k));
                    x[u][k] = v.x, x[u][k + 1] = v.y;
                }
            }
        }
    }
}

template <int D>
__device__ __forceinline__ void merge_accumulate(const AttnParams& p, int h, int begin, int last, int stride,
                                                 int lane, float& m, float& den, float* num) {
    constexpr int VEC = D / 32;
    for (int i0 = begin; i0 < last; i0 += stride * MERGE_UNROLL) {
        float lse[MERGE_UNROLL], x[MERGE_UNROLL][VEC];
        load_partial_rows<D>(p, h, i0, last, stride, lane, lse, x);
        float mu = m;
#pragma unroll
        for (int u = 0; u < MERGE_UNROLL; ++u) mu = fmaxf(mu, lse[u]);
        if (mu == -DB_INF) continue;  // nothing but empty partials so far
        const float c = (m == -DB_INF) ? 0.0f : exp2f(m - mu);
        den *= c;
#pragma unroll
        for (int k = 0; k < VEC; ++k) num[k] *= c;
#pragma unroll
        for (int u = 0; u < MERGE_UNROLL; ++u) {
            const float w = (lse[u] == -DB_INF) ? 0.0f : exp2f(lse[u] - mu);
            den += w;
#pragma unroll
            for (int k = 0; k < VEC; ++k) num[k] += w * x[u][k];
        }
        m = mu;
    }
}

// The fused merge (p.fused_merge), called by every thread of a CTA that has just written its
// partial rows for (sequence b, kv head kv_head): the CTA takes a ticket, and the one that takes
// the last (every split of the group written) merges the group's G rows, a warp per row, and
// writes them in the output dtype. So the merge costs neither a second kernel nor the wait for the
// whole grid that a dependent kernel has: each group is finished as soon as its own splits are.
// The usual pattern (each CTA fences its writes before its ticket; the last fences again before
// reading, and reads past L1). The last CTA sets the counter back to 0 for the next launch.
template <int D, int OUT, int WARPS>
__device__ void merge_group_if_last(const AttnParams& p, int b, int kv_head, int tid) {
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    const int first = p.split_offsets[b], last = p.split_offsets[b + 1];
    if (tid == 0) {
        u32* count = p.merge_counters + (i64)b * p.num_kv_heads + kv_head;
        const u32 ticket = atomicAdd(count, 1u);
        const int is_last = ticket == (u32)(last - first - 1);
        if (is_last) *count = 0u;
        s_last = is_last;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    constexpr int VEC = D / 32;
    const int lane = tid & 31, warp = tid >> 5, G = p.group;
    for (int r = warp; r < G; r += WARPS) {  // whole warps: NVFP4's shuffles
        const int h = kv_head * G + r;
        float m = -DB_INF, den = 0.0f, num[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) num[k] = 0.0f;
        merge_accumulate<D>(p, h, first, last, 1, lane, m, den, num);
        store_output_vec<OUT, VEC>(p, num, b, h, lane * VEC, true, den);
    }
}

// Programmatic dependent launch (sm_90+). A kernel launched with the programmatic-serialization
// attribute may start before the kernel ahead of it in the stream has finished;
// grid_dependency_wait() blocks until that kernel has completed and its writes are visible, and
// grid_dependency_launch() (in the kernel ahead) lets the dependent start once every CTA has
// called it or exited. Both are no-ops when the launch did not ask for PDL, and compile to
// nothing before sm_90.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dependency_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Output stores: rows of final attention output (already scaled, f32 in shared memory) written
// in the output dtype. Rows are consecutive qo heads h0.. of sequence b. The FMA kernel's, whose
// threads do not hold whole output chunks in registers; the tensor-core kernel and the merge call
// store_output_vec directly.
// ---------------------------------------------------------------------------------------------

template <int OUT>
__device__ void store_output_rows(const AttnParams& p, const float* rows, int nrows, int b, int h0,
                                  int tid, int nthreads) {
    // Four elements per thread and step, through store_output_vec; nthreads is a multiple of 32
    // (whole warps, for NVFP4's shuffles) and every thread runs every step.
    const int D = p.head_size, n = nrows * D;
    for (int base = 0; base < n; base += nthreads * 4) {
        const int i = base + tid * 4;
        const bool active = i < n;
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (active) {
#pragma unroll
            for (int k = 0; k < 4; ++k) x[k] = rows[i + k];
        }
        store_output_vec<OUT, 4>(p, x, b, h0 + (active ? i / D : 0), active ? i % D : 0, active);
    }
}

// Element offset of (page, kv_sel, kv_head, slot) row start in the paged cache.
__device__ __forceinline__ i64 kv_row_offset(const AttnParams& p, int page, int kv_sel, int kv_head,
                                             int slot) {
    return (i64)page * p.page_stride + (i64)kv_sel * p.half_stride + (i64)kv_head * p.head_stride +
           (i64)slot * p.slot_stride;
}
