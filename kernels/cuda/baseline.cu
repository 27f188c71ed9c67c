// decodebench: the baseline. A straightforward paged decode in BF16, as the reference script's
// baseline is: BF16 query and cache (fp8 inputs are dequantized to a BF16 copy before the timed
// call), f32 accumulation, BF16 output, one CTA per (qo head, sequence), no split of long
// sequences and no sharing of K/V loads across the query heads of a GQA group.
//
// Each warp walks tokens; a token's head dimension is spread over D/8 lanes that load 16 bytes
// (8 bf16) of K and of V each; the online softmax state lives per lane group and is merged across
// lane groups and warps at the end.

#define BASE_WARPS 4
#define BASE_UNROLL 2

template <int D>
__device__ void baseline_decode(const AttnParams& p) {
    constexpr int LANES = D / 8;        // lanes per token
    constexpr int TPW = 32 / LANES;     // tokens per warp step
    constexpr int STEP = BASE_WARPS * TPW;
    __shared__ float red_m[BASE_WARPS], red_l[BASE_WARPS];
    __shared__ float red_acc[BASE_WARPS][D];

    const int h = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LANES, l = lane % LANES;
    const int kv_head = h / p.group;
    const int seq = p.seq_lens[b];
    const int* bt = p.block_tables + (i64)b * p.max_blocks;
    const u16* cache = (const u16*)p.kv;
    const int slot_mask = (1 << p.block_shift) - 1;

    float q[8];
    bf16x8_to_f32(*(const uint4*)((const u16*)p.q + ((i64)b * p.num_qo_heads + h) * D + l * 8), q);
    const float qk_scale = p.q_scale * p.k_scale * p.sm_scale * DB_LOG2E;
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] *= qk_scale;

    float m = -DB_INF, lsum = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;

    // The loop bound is uniform across the warp, so every lane reaches every shuffle.
    for (int base = warp * TPW; base < seq; base += STEP * BASE_UNROLL) {
        uint4 kw[BASE_UNROLL], vw[BASE_UNROLL];
        bool valid[BASE_UNROLL];
#pragma unroll
        for (int u = 0; u < BASE_UNROLL; ++u) {
            const int t = base + u * STEP + sub;
            valid[u] = t < seq;
            if (valid[u]) {
                const i64 row = kv_row_offset(p, bt[t >> p.block_shift], 0, kv_head, t & slot_mask);
                kw[u] = *(const uint4*)(cache + row + l * 8);
                vw[u] = *(const uint4*)(cache + row + p.half_stride + l * 8);
            } else {
                kw[u].x = kw[u].y = kw[u].z = kw[u].w = 0u;
                vw[u] = kw[u];
            }
        }
#pragma unroll
        for (int u = 0; u < BASE_UNROLL; ++u) {
            float k[8], v[8];
            bf16x8_to_f32(kw[u], k);
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) s += q[i] * k[i];
#pragma unroll
            for (int off = LANES / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (valid[u]) {
                bf16x8_to_f32(vw[u], v);
                const float m_new = fmaxf(m, s);
                const float alpha = exp2f(m - m_new);
                const float pr = exp2f(s - m_new);
                lsum = lsum * alpha + pr;
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i] = acc[i] * alpha + pr * v[i];
                m = m_new;
            }
        }
    }

    // Merge the lane groups of the warp (same l, different tokens).
#pragma unroll
    for (int off = LANES; off < 32; off <<= 1) {
        const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
        const float l_o = __shfl_xor_sync(0xffffffffu, lsum, off);
        const float m_new = fmaxf(m, m_o);
        const float a = (m == -DB_INF) ? 0.0f : exp2f(m - m_new);
        const float c = (m_o == -DB_INF) ? 0.0f : exp2f(m_o - m_new);
        lsum = lsum * a + l_o * c;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float acc_o = __shfl_xor_sync(0xffffffffu, acc[i], off);
            acc[i] = acc[i] * a + acc_o * c;
        }
        m = m_new;
    }
    if (sub == 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) red_acc[warp][l * 8 + i] = acc[i];
        if (l == 0) {
            red_m[warp] = m;
            red_l[warp] = lsum;
        }
    }
    __syncthreads();
    // One thread per output dimension merges the warps.
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float mm = -DB_INF;
        for (int w = 0; w < BASE_WARPS; ++w) mm = fmaxf(mm, red_m[w]);
        float num = 0.0f, den = 0.0f;
        for (int w = 0; w < BASE_WARPS; ++w) {
            const float c = (red_m[w] == -DB_INF) ? 0.0f : exp2f(red_m[w] - mm);
            num += red_acc[w][d] * c;
            den += red_l[w] * c;
        }
        const float o = den > 0.0f ? num / den * p.v_scale : 0.0f;
        ((u16*)p.out)[((i64)b * p.num_qo_heads + h) * D + d] = f32_to_bf16(o);
    }
}

#define DB_BASELINE(D)                                                                             \
    extern "C" __global__ void __launch_bounds__(BASE_WARPS * 32)                                  \
        baseline_d##D##_bf16_bf16_bf16(AttnParams p) {                                             \
        baseline_decode<D>(p);                                                                     \
    }

DB_BASELINE(64)
DB_BASELINE(128)
DB_BASELINE(256)
