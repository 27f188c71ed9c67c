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
