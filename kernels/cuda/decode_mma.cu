// decodebench: the optimized decode kernel on tensor cores (mma.sync, sm_80+), for head sizes 64
// and 128 and GQA groups up to 16. Same work split, planner, partial outputs and output formats
// as decode.cu (whose FMA kernel stays the fallback for head 256 and larger groups).
//
// One CTA = 4 warps handles one work item for one kv head and all its qo heads. The group is the
// M dimension of the MMAs (16 rows, rows >= group are zero padding): per 16-token tile a warp
// computes S = Q K^T (m16n8k16, two 8-token column tiles) and O += P V (P reused from S's
// accumulators as the A operand, no shuffles). K and V are staged through shared memory with
// 16-byte cp.async (stages of 64 tokens, 2 deep for bf16 and 4 for e4m3, rows XOR-swizzled so ldmatrix is conflict-free)
// and read with ldmatrix. bf16 caches use bf16 MMAs; e4m3 caches are widened to f16 (exact) in
// registers and use f16 MMAs, the query converted to f16 too. Accumulation is f32 throughout.
//
// For e4m3, the MMA's k index need not follow the head dimension in order (Q and K just have to
// agree), which lets one ldmatrix feed four consecutive bytes per thread; likewise the output
// columns of the fp8 V path come out permuted and are un-permuted when written.

#define MMA_WARPS 4
#define MMA_THREADS (MMA_WARPS * 32)
#define MMA_TILE 16
#define MMA_STAGE_TOKENS (MMA_WARPS * MMA_TILE)
// Pipeline depth: bf16 stages are 32 KiB (head 128) and two keep enough bytes in flight at three
// CTAs per SM; e4m3 stages are half as big, so four.
#define MMA_STAGES_BF16 2
#define MMA_STAGES_FP8 4
#define MMA_MAX_GROUP 16

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{.reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t;}" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16-byte async copy that zero-fills the destination when `valid` is false.
__device__ __forceinline__ void cp_async16_zfill(void* smem_dst, const void* gmem_src, bool valid) {
    u32 dst = smem_u32(smem_dst);
    int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem_src), "r"(src_size));
}

template <bool F16>
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    if (F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two floats packed as f16x2 or bf16x2 (round to nearest), `lo` in the low half.
template <bool F16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (F16) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// Two e4m3 (low byte first) as f16x2. sm_89+: exact hardware conversion. Older: the bits moved
// into f16 fields, which reads as value * 2^-8 (exact, subnormals included); MMA_E4M3_F16_SCALE
// undoes that factor on the f32 results.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define MMA_E4M3_F16_SCALE 1.0f
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 pair) {
    u32 r;
    u16 p = (u16)pair;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(p));
    return r;
}
#else
#define MMA_E4M3_F16_SCALE 256.0f
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 pair) {
    return ((pair & 0x80u) << 8) | ((pair & 0x7fu) << 7) | ((pair & 0x8000u) << 16) |
           ((pair & 0x7f00u) << 15);
}
#endif

__device__ __forceinline__ u32 prmt(u32 a, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(a), "r"(sel));
    return r;
}

// Byte offset of 16-byte chunk `c` of row `r` in a tile of rows of `nc` chunks (XOR swizzle).
__device__ __forceinline__ int mma_swz(int r, int c, int nc) {
    const int mask = (nc >= 8 ? 8 : nc) - 1;
    return (r * nc + (c ^ (r & mask))) * 16;
}

// Query element (row = qo head within the group, dim) in f32, zero for padding rows.
template <bool Q_FP8>
__device__ __forceinline__ float mma_q(const AttnParams& p, int b, int kv_head, int row, int dim) {
    if (row >= p.group) return 0.0f;
    const i64 idx = ((i64)b * p.num_qo_heads + kv_head * p.group + row) * p.head_size + dim;
    return Q_FP8 ? e4m3_to_f32(((const u8*)p.q)[idx]) : bf16_to_f32(((const u16*)p.q)[idx]);
}

template <int D, bool Q_FP8, bool KV_FP8, int OUT>
__device__ void decode_mma(const AttnParams& p) {
    constexpr bool F16 = KV_FP8;          // MMA input type: f16 for e4m3 caches, else bf16
    constexpr int ESIZE = KV_FP8 ? 1 : 2;
    constexpr int RB = D * ESIZE;         // bytes per cache row
    constexpr int NC = RB / 16;           // 16-byte chunks per row
    constexpr int KSTEPS = D / 16;
    constexpr int NT = D / 8;             // output n-tiles
    constexpr int STAGE_BYTES = 2 * MMA_STAGE_TOKENS * RB;
    constexpr int STAGES = KV_FP8 ? MMA_STAGES_FP8 : MMA_STAGES_BF16;

    extern __shared__ __align__(128) u8 smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q4 = lane & 3, r0 = lane >> 2;  // fragment coordinates
    const int G = p.group;
    const int4 item = p.work[blockIdx.x];
    const int b = item.x, t_begin = item.y, t_end = item.z;
    const int kv_head = blockIdx.y;
    const int* bt = p.block_tables + (i64)b * p.max_blocks;
    const int slot_mask = (1 << p.block_shift) - 1;
    const u8* cache = (const u8*)p.kv;
    const float kv_raw = KV_FP8 ? MMA_E4M3_F16_SCALE : 1.0f;

    // Query A fragments (rows = heads r0 and r0+8), in the MMA type, unscaled.
    u32 qa[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        // bf16: natural order. e4m3: k pairs (2q, 2q+1) and (2q+8, 2q+9) are dims 4q..4q+3.
        const int d_lo = KV_FP8 ? kk * 16 + 4 * q4 : kk * 16 + 2 * q4;
        const int d_hi = KV_FP8 ? d_lo + 2 : d_lo + 8;
        qa[kk][0] = pack2<F16>(mma_q<Q_FP8>(p, b, kv_head, r0, d_lo), mma_q<Q_FP8>(p, b, kv_head, r0, d_lo + 1));
        qa[kk][1] = pack2<F16>(mma_q<Q_FP8>(p, b, kv_head, r0 + 8, d_lo), mma_q<Q_FP8>(p, b, kv_head, r0 + 8, d_lo + 1));
        qa[kk][2] = pack2<F16>(mma_q<Q_FP8>(p, b, kv_head, r0, d_hi), mma_q<Q_FP8>(p, b, kv_head, r0, d_hi + 1));
        qa[kk][3] = pack2<F16>(mma_q<Q_FP8>(p, b, kv_head, r0 + 8, d_hi), mma_q<Q_FP8>(p, b, kv_head, r0 + 8, d_hi + 1));
    }
    const float qk_scale = p.q_scale * p.k_scale * p.sm_scale * DB_LOG2E * kv_raw;

    const int n_tokens = t_end - t_begin;
    const int n_iter = (n_tokens + MMA_STAGE_TOKENS - 1) / MMA_STAGE_TOKENS;

    auto load_stage = [&](int it) {
        u8* dst = smem + (it % STAGES) * STAGE_BYTES;
        const int t0 = t_begin + it * MMA_STAGE_TOKENS;
#pragma unroll 4
        for (int c = tid; c < 2 * MMA_STAGE_TOKENS * NC; c += MMA_THREADS) {
            const int row = c / NC, col = c % NC;  // rows 0..63 K, 64..127 V
            const int kv_sel = row >= MMA_STAGE_TOKENS ? 1 : 0;
            const int r = row - kv_sel * MMA_STAGE_TOKENS;
            const int t = t0 + r;
            const bool valid = t < t_end;
            const u8* src = cache;
            if (valid) {
                const i64 off = kv_row_offset(p, bt[t >> p.block_shift], kv_sel, kv_head, t & slot_mask);
                src = cache + off * ESIZE + col * 16;
            }
            cp_async16_zfill(dst + kv_sel * MMA_STAGE_TOKENS * RB + mma_swz(r, col, NC), src, valid);
        }
    };

#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < n_iter) load_stage(st);
        cp_async_commit();
    }

    float m[2] = {-DB_INF, -DB_INF}, lsum[2] = {0.0f, 0.0f};
    float o[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

    const int wrow = warp * MMA_TILE;  // this warp's first token row in a stage
    for (int it = 0; it < n_iter; ++it) {
        if (it + STAGES - 1 < n_iter) load_stage(it + STAGES - 1);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncthreads();

        const u8* kb = smem + (it % STAGES) * STAGE_BYTES;
        const u8* vb = kb + MMA_STAGE_TOKENS * RB;
        const int tok0 = t_begin + it * MMA_STAGE_TOKENS + wrow;

        if (tok0 < t_end) {
            // S = Q K^T for 16 tokens: s[n-tile][c0..c3].
            float s[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            const int mi = lane >> 3, mr = lane & 7;  // ldmatrix: matrix and row of this lane
            if (KV_FP8) {
#pragma unroll
                for (int kk = 0; kk < KSTEPS; kk += 2) {
                    // m0: tokens 0-7 chunk kk, m1: tokens 8-15 chunk kk, m2/m3: chunk kk+1.
                    u32 r[4];
                    const int row = wrow + (mi & 1) * 8 + mr;
                    ldsm_x4(smem_u32(kb + mma_swz(row, kk + (mi >> 1), NC)), r);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        if (kk + h < KSTEPS) {
#pragma unroll
                            for (int j = 0; j < 2; ++j) {
                                const u32 w = r[h * 2 + j];
                                mma16816<F16>(s[j], qa[kk + h], e4m3x2_to_f16x2(w & 0xffffu), e4m3x2_to_f16x2(w >> 16));
                            }
                        }
                    }
                }
            } else {
#pragma unroll
                for (int kk = 0; kk < KSTEPS; ++kk) {
                    // m0: tokens 0-7 dims lo, m1: tokens 0-7 dims hi, m2/m3: tokens 8-15.
                    u32 r[4];
                    const int row = wrow + (mi >> 1) * 8 + mr;
                    ldsm_x4(smem_u32(kb + mma_swz(row, kk * 2 + (mi & 1), NC)), r);
                    mma16816<F16>(s[0], qa[kk], r[0], r[1]);
                    mma16816<F16>(s[1], qa[kk], r[2], r[3]);
                }
            }

            // Online softmax per head row (r0: c0,c1; r0+8: c2,c3), in log2 units.
            float mx[2] = {-DB_INF, -DB_INF};
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = tok0 + j * 8 + 2 * q4 + (i & 1);
                    const float v = (t < t_end) ? s[j][i] * qk_scale : -DB_INF;
                    s[j][i] = v;
                    mx[i >> 1] = fmaxf(mx[i >> 1], v);
                }
            }
            float alpha[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                const float m_new = fmaxf(m[h], mx[h]);
                alpha[h] = (m[h] == -DB_INF) ? 0.0f : exp2f(m[h] - m_new);
                m[h] = m_new;
                lsum[h] *= alpha[h];
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float pr = (s[j][i] == -DB_INF) ? 0.0f : exp2f(s[j][i] - m[i >> 1]);
                    s[j][i] = pr;
                    lsum[i >> 1] += pr;
                }
            }
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                o[n][0] *= alpha[0];
                o[n][1] *= alpha[0];
                o[n][2] *= alpha[1];
                o[n][3] *= alpha[1];
            }
            // P as the A operand (rows = heads, k = the 16 tokens).
            u32 pa[4];
            pa[0] = pack2<F16>(s[0][0], s[0][1]);
            pa[1] = pack2<F16>(s[0][2], s[0][3]);
            pa[2] = pack2<F16>(s[1][0], s[1][1]);
            pa[3] = pack2<F16>(s[1][2], s[1][3]);

            // O += P V.
            if (KV_FP8) {
#pragma unroll
                for (int u = 0; u < D / 32; ++u) {
                    // m0: tokens 0-7 chunk 2u, m1: tokens 8-15 chunk 2u, m2/m3: chunk 2u+1.
                    u32 r[4];
                    const int row = wrow + (mi & 1) * 8 + mr;
                    ldsm_x4_trans(smem_u32(vb + mma_swz(row, 2 * u + (mi >> 1), NC)), r);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const u32 lo = r[h * 2], hi = r[h * 2 + 1];
                        // Bytes 0,2: even dims; bytes 1,3: odd dims.
                        mma16816<F16>(o[4 * u + 2 * h], pa, e4m3x2_to_f16x2(prmt(lo, 0x20u)), e4m3x2_to_f16x2(prmt(hi, 0x20u)));
                        mma16816<F16>(o[4 * u + 2 * h + 1], pa, e4m3x2_to_f16x2(prmt(lo, 0x31u)), e4m3x2_to_f16x2(prmt(hi, 0x31u)));
                    }
                }
            } else {
#pragma unroll
                for (int i = 0; i < D / 16; ++i) {
                    // m0: tokens 0-7 dims 16i.., m1: tokens 8-15, m2/m3: dims 16i+8...
                    u32 r[4];
                    const int row = wrow + (mi & 1) * 8 + mr;
                    ldsm_x4_trans(smem_u32(vb + mma_swz(row, 2 * i + (mi >> 1), NC)), r);
                    mma16816<F16>(o[2 * i], pa, r[0], r[1]);
                    mma16816<F16>(o[2 * i + 1], pa, r[2], r[3]);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();

    // Row sums over the 4 lanes of a row, then the warps are merged through shared memory:
    // red_o[warp][row][dim], red_m/red_l[warp][row], rows[row][dim] for the final values.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        lsum[h] += __shfl_xor_sync(0xffffffffu, lsum[h], 1);
        lsum[h] += __shfl_xor_sync(0xffffffffu, lsum[h], 2);
    }
    float* red_o = (float*)smem;
    float* red_m = red_o + MMA_WARPS * G * D;
    float* red_l = red_m + MMA_WARPS * G;
    float* rows = red_l + MMA_WARPS * G;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = r0 + (i >> 1) * 8;
            int dim;
            if (KV_FP8) {
                const int u = n / 4, w = n % 4;
                dim = 32 * u + (w >= 2 ? 16 : 0) + 4 * q4 + 2 * (i & 1) + (w & 1);
            } else {
                dim = n * 8 + 2 * q4 + (i & 1);
            }
            if (row < G) red_o[(warp * G + row) * D + dim] = o[n][i];
        }
    }
    if (q4 == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = r0 + h * 8;
            if (row < G) {
                red_m[warp * G + row] = m[h];
                red_l[warp * G + row] = lsum[h];
            }
        }
    }
    __syncthreads();
    const float out_scale = p.v_scale * kv_raw;
    for (int e = tid; e < G * D; e += MMA_THREADS) {
        const int row = e / D, dim = e % D;
        float mm = -DB_INF;
#pragma unroll
        for (int w = 0; w < MMA_WARPS; ++w) mm = fmaxf(mm, red_m[w * G + row]);
        float num = 0.0f, den = 0.0f;
#pragma unroll
        for (int w = 0; w < MMA_WARPS; ++w) {
            const float mw = red_m[w * G + row];
            const float c = (mw == -DB_INF) ? 0.0f : exp2f(mw - mm);
            num += red_o[(w * G + row) * D + dim] * c;
            den += red_l[w * G + row] * c;
        }
        const float val = den > 0.0f ? num / den * out_scale : 0.0f;
        if (p.direct) {
            rows[e] = val;
        } else {
            const i64 prow = (i64)blockIdx.x * p.num_qo_heads + kv_head * G + row;
            p.partial_o[prow * D + dim] = val;
            if (dim == 0) p.partial_lse[prow] = den > 0.0f ? mm + log2f(den) : -DB_INF;
        }
    }
    if (p.direct) {
        __syncthreads();
        store_output_rows<OUT>(p, rows, G, b, kv_head * G, tid, MMA_THREADS);
    }
}

#define DB_DECODE_MMA(D, QN, QF, KN, KF, ON, OV)                                                   \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                      \
        decode_mma_d##D##_##QN##_##KN##_##ON(AttnParams p) {                                       \
        decode_mma<D, QF, KF, OV>(p);                                                              \
    }

#define DB_DECODE_MMA_OUTS(D, QN, QF, KN, KF)                                                      \
    DB_DECODE_MMA(D, QN, QF, KN, KF, bf16, OUT_BF16)                                               \
    DB_DECODE_MMA(D, QN, QF, KN, KF, fp8, OUT_FP8)                                                 \
    DB_DECODE_MMA(D, QN, QF, KN, KF, nvfp4, OUT_NVFP4)

#define DB_DECODE_MMA_HEAD(D)                                                                      \
    DB_DECODE_MMA_OUTS(D, bf16, false, bf16, false)                                                \
    DB_DECODE_MMA_OUTS(D, bf16, false, fp8, true)                                                  \
    DB_DECODE_MMA_OUTS(D, fp8, true, fp8, true)

DB_DECODE_MMA_HEAD(64)
DB_DECODE_MMA_HEAD(128)
