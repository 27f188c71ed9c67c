// decodebench: the GPU reference. Plain fp32 paged decode attention, one CTA per
// (qo head, sequence), written for obviousness rather than speed. It verifies the timed kernels
// on cases too big for the CPU reference, and is itself checked against the CPU reference.
//
// Pass 1 finds the score maximum; pass 2 walks the sequence in chunks, writing the softmax
// numerators of a chunk to shared memory and accumulating them against V, one thread per
// output dimension. Output: f32 [batch, qo_heads, head], scaled by v_scale, not quantized.

#define REF_THREADS 256
#define REF_WARPS (REF_THREADS / 32)
#define REF_CHUNK 1024
#define REF_MAX_HEAD 256

__device__ __forceinline__ float ref_load(const void* base, i64 index, int fp8) {
    return fp8 ? e4m3_to_f32(((const u8*)base)[index]) : bf16_to_f32(((const u16*)base)[index]);
}

// Score of token t against the query in shared memory, reduced over the warp (all lanes get it).
__device__ float ref_score(const AttnParams& p, const float* q_s, const int* bt, int kv_head,
                           int t, int kv_fp8, int lane) {
    const int page = bt[t >> p.block_shift];
    const int slot = t & ((1 << p.block_shift) - 1);
    const i64 row = kv_row_offset(p, page, 0, kv_head, slot);
    float s = 0.0f;
    for (int d = lane; d < p.head_size; d += 32) s += q_s[d] * ref_load(p.kv, row + d, kv_fp8);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s * p.k_scale * p.sm_scale;
}

extern "C" __global__ void __launch_bounds__(REF_THREADS)
    reference_decode(AttnParams p, int q_fp8, int kv_fp8) {
    __shared__ float q_s[REF_MAX_HEAD];
    __shared__ float p_s[REF_CHUNK];
    __shared__ float red_s[REF_WARPS];
    const int h = blockIdx.x, b = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int D = p.head_size;
    const int kv_head = h / p.group;
    const int seq = p.seq_lens[b];
    const int* bt = p.block_tables + (i64)b * p.max_blocks;
    for (int d = tid; d < D; d += REF_THREADS)
        q_s[d] = ref_load(p.q, ((i64)b * p.num_qo_heads + h) * D + d, q_fp8) * p.q_scale;
    __syncthreads();

    // Pass 1: maximum score.
    float m = -DB_INF;
    for (int t = warp; t < seq; t += REF_WARPS) m = fmaxf(m, ref_score(p, q_s, bt, kv_head, t, kv_fp8, lane));
    if (lane == 0) red_s[warp] = m;
    __syncthreads();
    float max_score = -DB_INF;
    for (int w = 0; w < REF_WARPS; ++w) max_score = fmaxf(max_score, red_s[w]);

    // Pass 2: numerators chunk by chunk, accumulated against V by one thread per dimension.
    float acc = 0.0f, denom = 0.0f;
    for (int c0 = 0; c0 < seq; c0 += REF_CHUNK) {
        const int n = min(REF_CHUNK, seq - c0);
        __syncthreads();
        for (int j = warp; j < n; j += REF_WARPS) {
            const float s = ref_score(p, q_s, bt, kv_head, c0 + j, kv_fp8, lane);
            if (lane == 0) p_s[j] = expf(s - max_score);
        }
        __syncthreads();
        if (tid < D) {
            for (int j = 0; j < n; ++j) {
                const int t = c0 + j;
                const int page = bt[t >> p.block_shift];
                const int slot = t & ((1 << p.block_shift) - 1);
                const i64 row = kv_row_offset(p, page, 1, kv_head, slot);
                denom += p_s[j];
                acc += p_s[j] * ref_load(p.kv, row + tid, kv_fp8);
            }
        }
    }
    if (tid < D) {
        const float o = denom > 0.0f ? acc / denom * p.v_scale : 0.0f;
        ((float*)p.out)[((i64)b * p.num_qo_heads + h) * D + tid] = o;
    }
}

// The conversions the output stores use, over every f32 bit pattern: f32x2_to_e4m3x2 (hardware
// on sm_89+) against f32_to_e4m3_soft, the software rounding the CPU reference defines, with both
// halves of the pair checked (x = pattern i in the low byte, y = pattern ~i in the high byte);
// f32_to_e2m1 against the nearest of the eight e2m1 magnitudes by distance (ties to the even
// code; saturating at 6, NaN 0), a second formulation of the same rounding; nvfp4_sf_code (no
// division) against e4m3 of the IEEE quotient t / 6. result: [0] e4m3 codes that differ (non-NaN
// inputs), [1] NaN inputs without a NaN code, [2] e2m1 codes that differ, [3] / [4] the smallest
// such e4m3 / e2m1 input pattern (0xffffffff when none; the host fills it so), [5] NVFP4
// scale-factor codes that differ (a NaN t must give a NaN code), [6] the smallest such t, [7]
// inputs from 2^-126 to 2^125 whose rcp_rn_normal differs from __frcp_rn.
__device__ __forceinline__ u8 e2m1_by_distance(float x) {
    const float mags[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const float a = fabsf(x);
    int best = a >= 6.0f ? 7 : 0;  // saturating (and no rounding in the distances below 6)
    if (a < 6.0f) {
        for (int c = 1; c < 8; ++c) {
            const float d = fabsf(a - mags[c]), db = fabsf(a - mags[best]);
            if (d < db || (d == db && (c & 1) == 0)) best = c;
        }
    }
    return (u8)(((__float_as_uint(x) >> 28) & 0x8u) | (u32)best);
}

extern "C" __global__ void check_conversions(u32* result) {
    u32 e4m3_bad = 0, nan_bad = 0, e2m1_bad = 0, sf_bad = 0, rcp_bad = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32); i += (u64)gridDim.x * blockDim.x) {
        const u32 bits = (u32)i;
        const float x = __uint_as_float(bits), y = __uint_as_float(~bits);
        const u32 pair = f32x2_to_e4m3x2(x, y);
        const u32 lo = pair & 0xffu, hi = pair >> 8;
        bool bad = false;
        if (x != x) nan_bad += (lo & 0x7fu) != 0x7fu;
        else bad = lo != f32_to_e4m3_soft(x);
        if (y != y) nan_bad += (hi & 0x7fu) != 0x7fu;
        else bad = bad || hi != f32_to_e4m3_soft(y);
        if (bad) {
            ++e4m3_bad;
            atomicMin(&result[3], bits);
        }
        if (f32_to_e2m1(x) != e2m1_by_distance(x)) {
            ++e2m1_bad;
            atomicMin(&result[4], bits);
        }
        const u32 sf = nvfp4_sf_code(x, 1.0f);
        if (x != x ? (sf & 0x7fu) != 0x7fu : sf != f32_to_e4m3_soft(__fdiv_rn(x, 6.0f))) {
            ++sf_bad;
            atomicMin(&result[6], bits);
        }
        if (x >= 0x1p-126f && x <= 0x1p125f && rcp_rn_normal(x) != __frcp_rn(x)) ++rcp_bad;
    }
    if (rcp_bad) atomicAdd(&result[7], rcp_bad);
    if (sf_bad) atomicAdd(&result[5], sf_bad);
    if (e4m3_bad) atomicAdd(&result[0], e4m3_bad);
    if (nan_bad) atomicAdd(&result[1], nan_bad);
    if (e2m1_bad) atomicAdd(&result[2], e2m1_bad);
}

// The NVFP4 element codes (nvfp4_code: reciprocal and one correction, no division per element)
// against e2m1 of the correctly rounded quotient (0 when SF is not positive), for every e4m3 scale
// factor code (0 and NaN included) and every f32 y from R / 16 to 16 R (8 binades: every code
// boundary and the saturation; R = SF, or 1 for SF 0 and NaN), with the sign checked on one y in
// 64 and the special values (zeros, infinities, NaN, huge and subnormal y) for every SF. result:
// [0] codes that differ, [1] / [2] the first mismatch found (y's bits, SF's code), [3] positive
// scale factors whose reciprocal (rcp_rn_normal) differs from __frcp_rn. Below SF / 16 the
// quotient is under 1/16 however it rounds, and its code 0.
extern "C" __global__ void check_nvfp4_codes(u32* result) {
    const u64 per_sf = 1ull << 26;
    const u64 total = 128 * per_sf;
    u32 bad = 0;
    const float specials[10] = {0.0f, -0.0f, DB_INF, -DB_INF, __uint_as_float(0x7fc00000u), 1e30f, -1e30f,
                                1e-40f, -1e-40f, 3.0e38f};
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u8 code = (u8)(i / per_sf);
        const Nvfp4Scale s = nvfp4_scale(code);
        const bool positive = s.sf > 0.0f;
        const u64 j = i % per_sf;
        if (j == 0 && positive && s.rcp != __frcp_rn(s.sf)) atomicAdd(&result[3], 1u);
        const u32 bits = __float_as_uint((positive ? s.sf : 1.0f) * 0.0625f) + (u32)j;
        float y = __uint_as_float(bits);
        int n_try = (j % 64 == 0) ? 2 : 1;
        if (j < 10) {
            y = specials[j];
            n_try = 1;
        }
        for (int t = 0; t < n_try; ++t, y = -y) {
            const u32 fast = nvfp4_code(y, 1.0f, s);
            const float qr = __fdiv_rn(y, s.sf);
            u32 ref = positive ? f32_to_e2m1(qr) : 0u;
            if (positive && qr != qr) ref = fast & 0x8u;  // NaN: code 0, either sign
            if (fast != ref) {
                ++bad;
                if (atomicCAS(&result[1], 0xffffffffu, __float_as_uint(y)) == 0xffffffffu) result[2] = code;
            }
        }
    }
    if (bad) atomicAdd(&result[0], bad);
}
