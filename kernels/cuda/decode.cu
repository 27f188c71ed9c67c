// decodebench: the optimized, quantization-aware decode kernel and its split-KV merge.
//
// One CTA handles one work item (a token range of one sequence, chosen by the host planner so
// that small batches still fill every SM) for one kv head, and all `group` qo heads that share
// that kv head: K and V are read from memory once per group, in their stored dtype (bf16 or
// e4m3; fp8 is widened in registers, never dequantized to a copy).
//
// Threads are (tx, g, tz): tx splits the head dimension in 8-element vectors (BDX = D/8 lanes,
// inside one warp), g is the qo head of the group, tz splits the tokens of a pipeline stage.
// Stages of STAGE_TOKENS = blockDim.z * TILE tokens of K and V are copied to shared memory with
// 16-byte cp.async, NUM_STAGES deep, so several loads are in flight while a stage is computed.
// Each thread keeps an online-softmax state (max, sum, 8 accumulators) for its (g, tz), rescaled
// once per stage; the tz slices are merged at the end.
//
// When the planner gives a sequence a single work item, the CTA writes the final output (bf16,
// fp8, or nvfp4 with swizzled e4m3 block scales) directly. Otherwise it writes an f32 partial
// output with its base-2 log-sum-exp, and `merge_*` combines the partials of each (sequence, qo
// head) and writes the output.

#define DEC_TILE 4
#define DEC_STAGES 3

template <int D, bool Q_FP8>
__device__ __forceinline__ void load_q8(const AttnParams& p, int b, int h, int d0, float* q) {
    const i64 base = ((i64)b * p.num_qo_heads + h) * D + d0;
    if (Q_FP8) {
        const u8* src = (const u8*)p.q + base;
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = e4m3_to_f32(src[i]);
    } else {
        bf16x8_to_f32(*(const uint4*)((const u16*)p.q + base), q);
    }
}

template <bool KV_FP8>
__device__ __forceinline__ void load_kv8(const u8* src, float* f) {
    if (KV_FP8) {
        e4m3x8_to_f32_raw(*(const uint2*)src, f);
    } else {
        bf16x8_to_f32(*(const uint4*)src, f);
    }
}

template <int D, bool Q_FP8, bool KV_FP8, int OUT>
__device__ void decode_split(const AttnParams& p) {
    constexpr int BDX = D / 8;
    constexpr int ESIZE = KV_FP8 ? 1 : 2;
    constexpr int ROW_BYTES = D * ESIZE;
    constexpr int CHUNKS_PER_ROW = ROW_BYTES / 16;
    const float kv_raw = KV_FP8 ? DB_KV_RAW_SCALE : 1.0f;

    u8* const smem = dynamic_smem();
    const int G = p.group;
    const int BDZ = blockDim.z;
    const int tx = threadIdx.x, g = threadIdx.y, tz = threadIdx.z;
    const int tid = (tz * G + g) * BDX + tx;
    const int nthreads = BDX * G * BDZ;
    const int stage_tokens = BDZ * DEC_TILE;
    const int stage_bytes = 2 * stage_tokens * ROW_BYTES;

    const int4 item = p.work[blockIdx.x];  // w: partial row * kv heads + kv head
    const int b = item.x, t_begin = item.y, t_end = item.z;
    const bool direct = p.direct || (item.w & DB_DIRECT_ITEM);
    const int slot = item.w & ~DB_DIRECT_ITEM;
    const int kv_head = slot % p.num_kv_heads, prow0 = slot / p.num_kv_heads;
    const int h = kv_head * G + g;
    const int* bt = p.block_tables + (i64)b * p.max_blocks;
    const int slot_mask = (1 << p.block_shift) - 1;
    const u8* cache = (const u8*)p.kv;

    // Scores come out in log2 units, with every scale folded into the query once.
    float q[8];
    load_q8<D, Q_FP8>(p, b, h, tx * 8, q);
    const float qk_scale = p.q_scale * p.k_scale * p.sm_scale * DB_LOG2E * kv_raw;
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] *= qk_scale;

    const int n_tokens = t_end - t_begin;
    const int n_iter = (n_tokens + stage_tokens - 1) / stage_tokens;

    auto load_stage = [&](int it) {
        u8* dst = smem + (it % DEC_STAGES) * stage_bytes;
        const int t0 = t_begin + it * stage_tokens;
        for (int c = tid; c < 2 * stage_tokens * CHUNKS_PER_ROW; c += nthreads) {
            const int row = c / CHUNKS_PER_ROW, col = c % CHUNKS_PER_ROW;
            const int kv_sel = row >= stage_tokens ? 1 : 0;
            const int t = t0 + row - kv_sel * stage_tokens;
            if (t < t_end) {
                const i64 off = kv_row_offset(p, bt[t >> p.block_shift], kv_sel, kv_head, t & slot_mask);
                cp_async16(dst + row * ROW_BYTES + col * 16, cache + off * ESIZE + col * 16);
            }
        }
    };

#pragma unroll
    for (int s = 0; s < DEC_STAGES - 1; ++s) {
        if (s < n_iter) load_stage(s);
        cp_async_commit();
    }

    float m = -DB_INF, lsum = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;

    for (int it = 0; it < n_iter; ++it) {
        if (it + DEC_STAGES - 1 < n_iter) load_stage(it + DEC_STAGES - 1);
        cp_async_commit();
        cp_async_wait<DEC_STAGES - 1>();
        __syncthreads();

        const u8* kbuf = smem + (it % DEC_STAGES) * stage_bytes;
        const u8* vbuf = kbuf + stage_tokens * ROW_BYTES;
        const int t0 = t_begin + it * stage_tokens + tz * DEC_TILE;

        float s[DEC_TILE];
#pragma unroll
        for (int j = 0; j < DEC_TILE; ++j) {
            float k[8];
            load_kv8<KV_FP8>(kbuf + (tz * DEC_TILE + j) * ROW_BYTES + tx * 8 * ESIZE, k);
            float acc_s = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc_s += q[i] * k[i];
            s[j] = acc_s;
        }
#pragma unroll
        for (int j = 0; j < DEC_TILE; ++j) {
#pragma unroll
            for (int off = BDX / 2; off > 0; off >>= 1) s[j] += __shfl_xor_sync(0xffffffffu, s[j], off);
        }
        float tile_max = -DB_INF;
#pragma unroll
        for (int j = 0; j < DEC_TILE; ++j) {
            if (t0 + j >= t_end) s[j] = -DB_INF;
            tile_max = fmaxf(tile_max, s[j]);
        }
        if (tile_max != -DB_INF) {
            const float m_new = fmaxf(m, tile_max);
            const float alpha = exp2f(m - m_new);
            lsum *= alpha;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
            for (int j = 0; j < DEC_TILE; ++j) {
                if (t0 + j < t_end) {
                    const float pr = exp2f(s[j] - m_new);
                    float v[8];
                    load_kv8<KV_FP8>(vbuf + (tz * DEC_TILE + j) * ROW_BYTES + tx * 8 * ESIZE, v);
                    lsum += pr;
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += pr * v[i];
                }
            }
            m = m_new;
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();

    // Merge the tz slices: [BDZ][G][D] accumulators, then [BDZ][G] maxima and sums.
    float* red_acc = (float*)smem;
    float* red_m = red_acc + BDZ * G * D;
    float* red_l = red_m + BDZ * G;
    float* rows = red_l + BDZ * G;  // [G][D] final outputs
#pragma unroll
    for (int i = 0; i < 8; ++i) red_acc[(tz * G + g) * D + tx * 8 + i] = acc[i];
    if (tx == 0) {
        red_m[tz * G + g] = m;
        red_l[tz * G + g] = lsum;
    }
    __syncthreads();
    const float out_scale = p.v_scale * kv_raw;
    if (tz == 0) {
        float mm = -DB_INF;
        for (int z = 0; z < BDZ; ++z) mm = fmaxf(mm, red_m[z * G + g]);
        float den = 0.0f, num[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) num[i] = 0.0f;
        for (int z = 0; z < BDZ; ++z) {
            const float mz = red_m[z * G + g];
            const float c = (mz == -DB_INF) ? 0.0f : exp2f(mz - mm);
            den += red_l[z * G + g] * c;
#pragma unroll
            for (int i = 0; i < 8; ++i) num[i] += red_acc[(z * G + g) * D + tx * 8 + i] * c;
        }
        const float inv = den > 0.0f ? out_scale / den : 0.0f;
        if (direct) {
#pragma unroll
            for (int i = 0; i < 8; ++i) rows[g * D + tx * 8 + i] = num[i] * inv;
        } else {
            const i64 prow = (i64)prow0 * p.num_qo_heads + h;
#pragma unroll
            for (int i = 0; i < 8; ++i) p.partial_o[prow * D + tx * 8 + i] = num[i] * inv;
            if (tx == 0) partial_lse_row(p, h)[prow0] = den > 0.0f ? mm + log2f(den) : -DB_INF;
        }
    }
    if (direct) {
        __syncthreads();
        store_output_rows<OUT>(p, rows, G, b, kv_head * G, tid, nthreads);
    }
}

// Phase trace points of the merge kernel, as DB_TRACE in decode_mma.cu (the _DEP form reads the
// timer once `dep` is there): kbench's traced build defines them; decodebench's compiles them to
// nothing.
#ifndef DB_MERGE_TRACE
#define DB_MERGE_TRACE(point)
#endif
#ifndef DB_MERGE_TRACE_DEP
#define DB_MERGE_TRACE_DEP(point, dep)
#endif

// Warps of one merge CTA at most (launch.rs MERGE_WARPS): its rows' warps, together.
#define MERGE_MAX_WARPS 8

// Every value a merge warp's first load round brought in, folded to one word: the dependence of
// the traced build's "all loads in" point (DB_MERGE_TRACE_DEP 5); unused otherwise.
template <int D>
__device__ __forceinline__ unsigned merge_loaded_bits(const float* lse, const float (*x)[D / 32], float l0, float l1) {
    unsigned bits = __float_as_uint(l0) ^ __float_as_uint(l1);
#pragma unroll
    for (int u = 0; u < MERGE_UNROLL; ++u) {
        bits ^= __float_as_uint(lse[u]);
#pragma unroll
        for (int k = 0; k < D / 32; ++k) bits ^= __float_as_uint(x[u][k]);
    }
    return bits;
}

// A row's share for one of its row_warps warps (rw), when several warps share the row: every
// warp first finds the row's statistics over all its splits (the largest log-sum-exp mx and the
// sum of 2^(lse - mx): lanes over splits, then shuffles), with its own splits' partial rows
// already loading, and then sums those rows with their final weights
// 2^(lse_i - mx) / sum. The warps' sums are then added as they are: nothing is exchanged but the
// rows. (The statistics took the place of a (max, sum) exchange after the CTA's barrier: each
// warp's own pair through shared memory, shuffles and a division there, 0.45 us of b=1 s=65536's
// merge, bench/gpu/NOTES.md runs 55-56 and 72.)
template <int D>
__device__ __forceinline__ void merge_row_share(const AttnParams& p, int h, int first, int last, int rw,
                                                int row_warps, int lane, float* num) {
    constexpr int VEC = D / 32;
    float lse[MERGE_UNROLL], x[MERGE_UNROLL][VEC];
    // The first round's rows without their log-sum-exps: every lane loads the row's (below), and
    // a row's weight comes from the lane that holds its split.
    load_partial_rows<D, false>(p, h, first + rw, last, row_warps, lane, lse, x);
    // Two splits per lane loaded at once, beside the rows (one round trip for up to 64 splits, as
    // merge_block sizes rows for), then any further ones folded in online. The layout keeps a
    // row's log-sum-exps side by side: 32 lanes read 4-5 sectors, not one each (bench/gpu/NOTES.md,
    // calls 130-133).
    const float* lse_row = partial_lse_row(p, h);  // the row's splits side by side
    const float l0 = first + lane < last ? __ldcg(lse_row + first + lane) : -DB_INF;
    const float l1 = first + lane + 32 < last ? __ldcg(lse_row + first + lane + 32) : -DB_INF;
    DB_MERGE_TRACE_DEP(3, __float_as_uint(x[0][0]) ^ __float_as_uint(lse[0]) ^ __float_as_uint(l0));
    DB_MERGE_TRACE_DEP(5, merge_loaded_bits<D>(lse, x, l0, l1));
    float lm = fmaxf(l0, l1);
    float ls = (lm == -DB_INF) ? 0.0f : exp2f(l0 - lm) + exp2f(l1 - lm);
    for (int i = first + lane + 64; i < last; i += 32) {
        const float l = __ldcg(lse_row + i);
        const float nm = fmaxf(lm, l);
        if (nm != -DB_INF) {
            ls = ls * exp2f(lm - nm) + exp2f(l - nm);
            lm = nm;
        }
    }
    float mx = lm;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float den = (lm == -DB_INF) ? 0.0f : ls * exp2f(lm - mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    const float inv = den > 0.0f ? 1.0f / den : 0.0f;
    // The final weights of this lane's two splits; the first round's split first + j (j < 64, the
    // same for the whole warp) takes lane j % 32's. Splits past `last` hold -inf: weight 0.
    const float w0 = (l0 == -DB_INF) ? 0.0f : exp2f(l0 - mx) * inv;
    const float w1 = (l1 == -DB_INF) ? 0.0f : exp2f(l1 - mx) * inv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) num[k] = 0.0f;
#pragma unroll
    for (int u = 0; u < MERGE_UNROLL; ++u) {
        static_assert(MERGE_MAX_WARPS * MERGE_UNROLL <= 64, "a first round's splits are l0's and l1's");
        const int j = rw + u * row_warps;  // row_warps <= MERGE_MAX_WARPS (launch.rs merge_block)
        const float w = __shfl_sync(0xffffffffu, j < 32 ? w0 : w1, j & 31);
#pragma unroll
        for (int k = 0; k < VEC; ++k) num[k] += w * x[u][k];
    }
    for (int i0 = first + rw + row_warps * MERGE_UNROLL; i0 < last; i0 += row_warps * MERGE_UNROLL) {
        load_partial_rows<D>(p, h, i0, last, row_warps, lane, lse, x);
#pragma unroll
        for (int u = 0; u < MERGE_UNROLL; ++u) {
            const float w = (lse[u] == -DB_INF) ? 0.0f : exp2f(lse[u] - mx) * inv;
#pragma unroll
            for (int k = 0; k < VEC; ++k) num[k] += w * x[u][k];
        }
    }
}

// Combines the partial outputs of each (qo head, sequence): weights 2^(lse_i - max). A CTA has
// blockDim.y rows (qo heads of one sequence) and blockDim.x / 32 warps per row; the host picks
// the shape from the plan's longest split list (launch.rs merge_block), so that a row's splits
// take one round of loads. A row of one warp is folded into a running (max, sum, weighted row),
// MERGE_UNROLL whole partial rows at a time (merge_accumulate in common.cuh), and written by that
// warp; the warps of a row shared by several sum their splits with final weights
// (merge_row_share), meet in shared memory, and write it four columns per lane (both from
// registers, store_output_vec). Sequences that were not split are skipped (their decode CTA wrote
// the output; DB_DIRECT_ITEM). On sm_90 the kernel may be launched as a programmatic dependent of
// the decode kernel (PDL): it starts while the decode kernel's last CTAs run and waits, after
// reading what the host wrote, until their partials are visible. Once a CTA has loaded its
// partials it lets the next kernel in the stream (the next call's decode kernel, a programmatic
// dependent too) be placed: that kernel waits for this one's completion before it reads or
// writes anything, so what overlaps is its launch and CTA placement with this kernel's combine,
// conversion and stores (NVFP4's are the longest), not its work. Triggered at the merge's start
// instead, the next grid was placed beside CTAs still waiting and packed unevenly (NOTES run 43);
// this late, 3-11 % off the short split cells (run 79).
// Reads the merge's parameters that it uses after its wait (merge_partials). An empty asm with
// them as inputs is not enough: ptxas drops the reads and issues them again after the wait.
__device__ __forceinline__ void touch_params_before_wait(const AttnParams& p) {
    const u64 x = (u64)p.out ^ (u64)p.out_sf ^ (u64)p.partial_o ^ (u64)p.partial_lse ^
                  (u64)(u32)p.num_qo_heads ^ ((u64)(u32)p.head_size << 32) ^ (u64)(u32)p.sf_cols ^
                  ((u64)(u32)p.lse_stride << 32) ^
                  (u64)__float_as_uint(p.o_scale) ^ ((u64)__float_as_uint(p.o_sf_scale) << 32);
    if (x == 1) asm volatile("trap;");
}

template <int D, int OUT>
__device__ void merge_partials(const AttnParams& p) {
    constexpr int VEC = D / 32;
    __shared__ __align__(16) float part_num[MERGE_MAX_WARPS][D];
    const int row_warps = (int)(blockDim.x >> 5), nrows = (int)blockDim.y;
    const int lane = threadIdx.x & 31, rw = threadIdx.x >> 5, r = threadIdx.y;
    const int warp = r * row_warps + rw;
    const int b = blockIdx.y, h0 = blockIdx.x * nrows, h = h0 + r;
    const int first = p.split_offsets[b], last = p.split_offsets[b + 1];  // written by the host
    if (p.direct_items && last - first == 1) return;  // written by its decode CTA
    // The parameter-bank lines read after the wait are read before it too: the wait's release
    // reaches every merge CTA at once, and a line first read after it is a constant-cache miss on
    // the way to the first loads (bench/gpu/NOTES.md, call 56). A branch that depends on them
    // (never taken: no such parameters) and holds a volatile instruction keeps the reads in
    // front of the wait.
    touch_params_before_wait(p);
    grid_dependency_wait();
    DB_MERGE_TRACE(0);
    if (warp < MERGE_MAX_WARPS) {
        float num[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) num[k] = 0.0f;
        if (row_warps == 1) {
            // The row is this warp's alone: finish it and write it from registers (the whole warp
            // calls the store: NVFP4 groups are found by shuffles).
            float m = -DB_INF, den = 0.0f;
            if (h < p.num_qo_heads) merge_accumulate<D>(p, h, first, last, 1, lane, m, den, num);
            grid_dependency_launch();  // the row's partials are loaded (see above)
            DB_MERGE_TRACE(1);
            store_output_vec<OUT, VEC>(p, num, b, h, lane * VEC, h < p.num_qo_heads, den);
        } else {
            if (h < p.num_qo_heads) merge_row_share<D>(p, h, first, last, rw, row_warps, lane, num);
            DB_MERGE_TRACE_DEP(6, __float_as_uint(num[0]));
            grid_dependency_launch();
            DB_MERGE_TRACE(1);
            if (VEC % 4 == 0) {  // 16-byte stores: a warp's 512 bytes in 4 wavefronts
#pragma unroll
                for (int k = 0; k < VEC; k += 4)
                    *(float4*)&part_num[warp][lane * VEC + k] = make_float4(num[k], num[k + 1], num[k + 2], num[k + 3]);
            } else {
#pragma unroll
                for (int k = 0; k < VEC; ++k) part_num[warp][lane * VEC + k] = num[k];
            }
        }
    }
    if (row_warps == 1) return;  // the same for the whole CTA (blockDim)
    // After the barrier, each lane of a row's first warp (D = 256: first two) sums and writes four
    // columns: one step, since a row of two or more warps has lanes for 256 columns. The
    // destination is worked out before the barrier, where the warp would otherwise wait (the
    // compiler keeps it there): after it, NVFP4's scale-factor offset was some 50 instructions in
    // front of the conversion. The sums are final (the weights were applied before the barrier),
    // so the conversion takes no den. Together 0.7-1.5 % off NVFP4's short split cells in kbench
    // (bench/gpu/NOTES.md, run 97).
    static_assert(D <= 2 * 32 * 4, "a row of two or more warps writes its columns in one step");
    const int d = threadIdx.x * 4;
    const bool active = d < D && h < p.num_qo_heads;
    const OutputDst dst = output_dst<OUT>(p, b, h, d);
    __syncthreads();
    DB_MERGE_TRACE(2);
    // Whole warps (NVFP4 groups are found by shuffles); warps with no column to write skip it.
    if (warp < MERGE_MAX_WARPS && rw * 32 * 4 < D) {
        const int rb = r * row_warps;
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (active) {
#pragma unroll
            for (int w = 0; w < MERGE_MAX_WARPS; ++w)
                if (w < row_warps) {
                    const float4 v = *(const float4*)&part_num[rb + w][d];
                    x[0] += v.x, x[1] += v.y, x[2] += v.z, x[3] += v.w;
                }
        }
        const OutputVec<OUT, 4> v = convert_output_vec<OUT, 4>(p, x);
        if (active) write_output_vec<OUT, 4>(p, v, dst);
        DB_MERGE_TRACE(4);
    }
}

#define DB_DECODE(D, QN, QF, KN, KF, ON, OV)                                                       \
    extern "C" __global__ void __launch_bounds__(512) decode_d##D##_##QN##_##KN##_##ON(AttnParams p) { \
        decode_split<D, QF, KF, OV>(p);                                                            \
    }

#define DB_DECODE_OUTS(D, QN, QF, KN, KF)                                                          \
    DB_DECODE(D, QN, QF, KN, KF, bf16, OUT_BF16)                                                   \
    DB_DECODE(D, QN, QF, KN, KF, fp8, OUT_FP8)                                                     \
    DB_DECODE(D, QN, QF, KN, KF, nvfp4, OUT_NVFP4)

#define DB_DECODE_HEAD(D)                                                                          \
    DB_DECODE_OUTS(D, bf16, false, bf16, false)                                                    \
    DB_DECODE_OUTS(D, bf16, false, fp8, true)                                                      \
    DB_DECODE_OUTS(D, fp8, true, fp8, true)

DB_DECODE_HEAD(64)
DB_DECODE_HEAD(128)
DB_DECODE_HEAD(256)

#define DB_MERGE(D, ON, OV)                                                                        \
    extern "C" __global__ void merge_d##D##_##ON(AttnParams p) { merge_partials<D, OV>(p); }

#define DB_MERGE_HEAD(D)                                                                           \
    DB_MERGE(D, bf16, OUT_BF16)                                                                    \
    DB_MERGE(D, fp8, OUT_FP8)                                                                      \
    DB_MERGE(D, nvfp4, OUT_NVFP4)

DB_MERGE_HEAD(64)
DB_MERGE_HEAD(128)
DB_MERGE_HEAD(256)
