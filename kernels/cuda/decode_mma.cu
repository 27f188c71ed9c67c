// decodebench: the optimized decode kernel on tensor cores (mma.sync, sm_80+), for head sizes 64
// and 128 and GQA groups up to 16. Same planner, partial outputs and output formats as decode.cu
// (whose FMA kernel stays the fallback for head 256 and larger groups).
//
// One CTA = 4 warps handles one work item (a token range of one sequence) for one kv head and all
// its qo heads. Tokens are the M dimension of the MMAs (m16n8k16) and the group's heads the N
// dimension (8 per n-tile, so a group of 8 wastes nothing): per 16-token tile a warp computes
// S^T = K Q^T with the K tile as the A operand (ldmatrix) and the query as B (registers), then
// O^T += V^T P^T with a 16-dim slice of the V tile as A (ldmatrix.trans) and P^T as B, which
// movmatrix transposes out of S's accumulators. bf16 caches use bf16 MMAs; e4m3 caches are widened
// to f16 (exact) in registers and use f16 MMAs, the query converted to f16 too. Accumulation is f32
// throughout.
//
// Loads: K and V go through shared memory with 16-byte cp.async (rows XOR-swizzled so ldmatrix is
// conflict-free). Each warp copies the rows it computes on itself (coalesced, the block-table
// entries of a tile loaded two iterations ahead), so the warps of a CTA never synchronize inside
// the main loop; bf16 stages are double-buffered, e4m3 stages (half the bytes) four deep. A stage's
// buffer is refilled as soon as the warp has consumed it, so all of them are in flight at the start
// (a 128-token range of a bf16 cache costs one DRAM round trip, not two). The query is loaded in 16-byte
// pieces, converted once per element into shared memory and read back as fragments, and the
// epilogue weighs each row once: before that, scalar query loads and per-element divisions made
// up 6 of a short CTA's 9 us (bench/gpu/NOTES.md). The epilogue then stores each thread's four
// columns from registers in the output dtype (store_output_vec in common.cuh), with no second
// pass over shared memory: in the issue-bound e4m3 path every instruction there is time.
//
// For e4m3, the MMA's k index need not follow the head dimension in order (Q and K just have to
// agree), which lets one ldmatrix feed four consecutive bytes per thread; likewise the output rows
// of the fp8 V path come out permuted (even dims, then odd) and are un-permuted when written.
//
// The work list is in launch order (longest first); each entry's w field is its partial-output
// row times the kv-head count plus its kv head, see kernels/src/cuda/plan.rs.

#define MMA_WARPS 4
#define MMA_THREADS (MMA_WARPS * 32)
#define MMA_TILE 16
#define MMA_STAGE_TOKENS (MMA_WARPS * MMA_TILE)
// Pipeline depth (stages of MMA_STAGE_TOKENS tokens; each warp has MMA_TILE rows of each). The best
// depth depends on the case: fewer stages fit more CTAs per SM, which hides more of short CTAs'
// prologues (e4m3, 3 stages: 4 CTAs/SM, b256 s1024 10 % faster on an H200), more keep more bytes in
// flight per CTA on long ones (e4m3, 2 stages lost 10 % at b64 s65536; bench/gpu/NOTES.md run 34).
// So several are compiled (each name ends in _s<stages>) and the backend times them on the case:
// bf16 stages are 32 KiB (head 128), so 2 (3 CTAs per SM) and 3 (2 CTAs per SM, for batch 1);
// e4m3 stages are half as big, so 2, 3 and 4.
#define MMA_STAGES_BF16_MIN 2
#define MMA_STAGES_BF16_MAX 3
#define MMA_STAGES_FP8_MIN 2
#define MMA_STAGES_FP8_MAX 4
#define MMA_MAX_GROUP 16

// Phase trace points: bench/gpu/kbench.cu defines DB_TRACE to time the phases of a CTA (point,
// and a value the time must wait for); decodebench's build compiles them to nothing.
#ifndef DB_TRACE
#define DB_TRACE(point, dep)
#endif
// Progress trace (kbench's traced build): the time warp 0 passes each stage of the main loop, to
// see how fast a CTA reads over its life; nothing in decodebench's build.
#ifndef DB_PROGRESS
#define DB_PROGRESS(it, n_iter)
#endif

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

// 16-byte async copy to a shared-memory address.
__device__ __forceinline__ void cp_async16_to(u32 smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_dst), "l"(gmem_src));
}

// A value the compiler must keep in a register: it cannot see how it was computed, so it cannot
// recompute it inside the main loop (which it otherwise does, trading issue slots for registers
// in a loop that is short of the former and has plenty of the latter).
__device__ __forceinline__ u32 pinned(u32 x) {
    asm volatile("" : "+r"(x));
    return x;
}
__device__ __forceinline__ u64 pinned64(u64 x) {
    asm volatile("" : "+l"(x));
    return x;
}
// a * b + c with a 64-bit c. For the fixed copy bases below: written as C (`base + (u64)page *
// bytes`), ptxas copies each base into the multiply-add's destination pair first (two moves per
// copy; the e4m3 loop 13 instructions longer than this way, where it multiplies once and adds
// each base in two instructions).
__device__ __forceinline__ u64 mad_wide(u32 a, u32 b, u64 c) {
    u64 r;
    asm("mad.wide.u32 %0, %1, %2, %3;" : "=l"(r) : "r"(a), "r"(b), "l"(c));
    return r;
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

// Two e4m3 pairs, the low and high 16 bits of x, as two f16x2 (lo, hi). sm_89+: the conversion
// reads the high half in place (F2FP ... R.H1), so no shift or byte select is spent on it.
__device__ __forceinline__ void e4m3x2x2_to_f16x2(u32 x, u32& lo, u32& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.rn.f16x2.e4m3x2 %0, l;\n\tcvt.rn.f16x2.e4m3x2 %1, h;}"
        : "=r"(lo), "=r"(hi)
        : "r"(x));
#else
    lo = e4m3x2_to_f16x2(x & 0xffffu);
    hi = e4m3x2_to_f16x2(x >> 16);
#endif
}

// 2^x flushing a subnormal result to zero: one MUFU.EX2, where exp2f (the module is compiled
// with --ftz=false) adds a range test and a rescale around it. exp2(-inf) is +0. For the main
// loop's weights, which are at most 1 and whose sum is at least 1, a weight under 2^-126 is
// below a float's resolution of that sum anyway.
__device__ __forceinline__ float exp2_ftz(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

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

// Transpose of an 8x8 b16 matrix held as one fragment (row r0, columns 2q..2q+1 per thread).
__device__ __forceinline__ u32 movmatrix_trans(u32 x) {
    u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

// The split CTAs' partial rows and log-sum-exps are stored with an L2 cache policy the host picks
// per case (AttnParams::partial_evict_last, timed both ways). They are scratch that every call
// writes and the merge reads back at once. Evict-last is 1-2.5 % faster on the long split cells
// (b1 s65536 BF16 0.981, FP8 KV 0.975, b64 s4096 FP8 KV 0.976), where the same stores with an
// evict-normal or evict-first policy are level with plain ones. The gain is the write-back saved:
// kept in the L2, the lines are overwritten there by the next call's stores, where with the
// default policy they are pushed out, dirty, by the cache pages the next call streams in, and
// written to DRAM in the middle of its reads (Nsight Compute, application replay, b1 s65536: the
// decode kernel writes 2.21 MB to DRAM with evict-normal, 0.45 MB with evict-last, and the merge
// reads a tenth of the partials back from DRAM against none). But the lines it keeps are L2 that
// the cache's pages cannot use, and where a call re-reads pages from the L2 (b64 s16384)
// evict-last is 1 % slower (bench/gpu/NOTES.md, runs 99-103). Both policies are constants
// (uniform registers); the predicate goes into the asm so that ptxas predicates the store rather
// than branching around it.
__device__ __forceinline__ u64 partial_store_policy(const AttnParams& p) {
    u64 last, normal;
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(last));
    asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(normal));
    return p.partial_evict_last ? last : normal;
}
__device__ __forceinline__ void store_partial(bool ok, float4* dst, float4 v, u64 pol) {
    asm volatile(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %0, 0;\n\t"
        "@p st.global.L2::cache_hint.v4.f32 [%1], {%2, %3, %4, %5}, %6;\n\t}" ::"r"((int)ok),
        "l"(dst), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "l"(pol)
        : "memory");
}
__device__ __forceinline__ void store_partial(bool ok, float* dst, float v, u64 pol) {
    asm volatile(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %0, 0;\n\t@p st.global.L2::cache_hint.f32 [%1], %2, %3;\n\t}" ::"r"(
            (int)ok),
        "l"(dst), "f"(v), "l"(pol)
        : "memory");
}

template <int D, int NH, bool Q_FP8, bool KV_FP8, int OUT, int WARPS, int TPW, int STAGES>
__device__ void decode_mma(const AttnParams& p) {
    constexpr bool F16 = KV_FP8;
    constexpr int ESIZE = KV_FP8 ? 1 : 2;
    constexpr int RB = D * ESIZE;
    constexpr int NC = RB / 16;
    constexpr int KSTEPS = D / 16;
    constexpr int MT = D / 16;
    constexpr int THREADS = WARPS * 32;
    constexpr int WTOK = 16 * TPW;
    constexpr int ST = WARPS * WTOK;
    constexpr int STAGE_BYTES = 2 * ST * RB;
    static_assert(WTOK <= 32, "a lane holds the page of each token of its warp's tile");
    static_assert(NC <= 32 && WTOK % (32 / NC) == 0, "whole rows per copy instruction");
    constexpr int ROWS_PER_COPY = 32 / NC;       // cache rows one warp-wide copy instruction covers
    constexpr int COPIES = WTOK / ROWS_PER_COPY;  // per stage, of K and of V
    static_assert(STAGES >= 2, "at least double buffering");

    u8* const smem = dynamic_smem();
    // The merge kernel (split plans without the fused merge) may launch as soon as every CTA of
    // this grid is running. Otherwise the next kernel is the next call's decode kernel, which may
    // be a programmatic dependent too: it is placed when this grid's CTAs have exited (the
    // implicit trigger), not beside them.
    if (!p.direct && !p.fused_merge) grid_dependency_launch();
    DB_TRACE(0, 0u);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tq = lane & 3, g = lane >> 2;
    const int mi = lane >> 3, mr = lane & 7;
    const int G = p.group;
    const int4 item = p.work[blockIdx.x];
    // Launched as a programmatic dependent of the kernel before it (chained calls, sm_90+), the CTA
    // has come up while that kernel finished; only the plan (written by the host) is read before
    // that kernel's writes are visible. Everything a previous kernel of a model step could have
    // written (query, cache, block tables) and everything this one writes comes after.
    grid_dependency_wait();
    const int b = item.x, t_begin = item.y, t_end = item.z;
    const bool direct = p.direct || (item.w & DB_DIRECT_ITEM);
    const int slot = item.w & ~DB_DIRECT_ITEM;
    const int kv_head = slot % p.num_kv_heads, prow0 = slot / p.num_kv_heads;
    const int* bt = p.block_tables + (i64)b * p.max_blocks;
    DB_TRACE(1, (u32)b);
    const int slot_mask = (1 << p.block_shift) - 1;
    const u8* cache = (const u8*)p.kv;
    const float kv_raw = KV_FP8 ? MMA_E4M3_F16_SCALE : 1.0f;

    const int n_tokens = t_end - t_begin;
    const int n_iter = (n_tokens + ST - 1) / ST;

    // Each warp loads its own rows of every stage (the rows it computes on), so warps never wait
    // for each other inside the loop. Lane l holds the page of token l of the warp's next tile;
    // a copy instruction covers ROWS_PER_COPY whole rows (coalesced 16-byte chunks).
    //
    // Addresses: everything but the page and the slot is fixed for the CTA, so it is computed once
    // here, in 32 bits where it fits (a page of every kv head's K and V is far below 4 GiB), and
    // the page enters as one 32x32->64-bit multiply-add. Shared-memory offsets (copies and
    // ldmatrix) are fixed per stage too. The main loop is issue-bound for e4m3 caches, so this
    // arithmetic is what it saves.
    const int wrow = warp * WTOK;
    const int lrow = lane / NC, lcol = lane % NC;
    const u32 page_bytes = (u32)(p.page_stride * ESIZE);
    const u32 slot_bytes = (u32)(p.slot_stride * ESIZE);
    const u32 half_bytes = (u32)(p.half_stride * ESIZE);
    const u32 lane_bytes = pinned((u32)(kv_head * p.head_stride * ESIZE) + (u32)lcol * 16u);
    const u32 smem_base = smem_u32(smem);
    u32 copy_dst[COPIES];
#pragma unroll
    for (int k = 0; k < COPIES; ++k)
        copy_dst[k] = pinned(smem_base + (u32)mma_swz(wrow + k * ROWS_PER_COPY + lrow, lcol, NC));
    // Rows past the end of the range (the last tile's tail) load the range's first page instead:
    // real cache data, so finite, and the softmax masks those tokens to exactly zero weight.
    const int first_page = __ldg(bt + (t_begin >> p.block_shift));
    DB_TRACE(2, (u32)first_page);
    auto page_of = [&](int it) -> int {
        const int t = t_begin + it * ST + wrow + lane;
        return (lane < WTOK && t < t_end) ? __ldg(bt + (t >> p.block_shift)) : first_page;
    };
    // When a stage spans whole pages (block size <= ST tokens), a copy row's slot in its page is
    // the same in every stage, so for e4m3 caches (whose loop is issue-bound) the row's K and V
    // addresses but for the page are fixed 64-bit bases, added to the page's offset (5 address
    // instructions per copied row, where the general path spends 10). The bases
    // take 16 registers: with 3 or 4 stages (at most 4 CTAs per SM by shared memory) there are
    // enough; with 2 (5 CTAs per SM, at most 102 registers) there are not.
    constexpr bool BASES = KV_FP8 && STAGES >= 3;
    const u32 fixed_slots = pinned(BASES && (1 << p.block_shift) <= ST ? 1u : 0u);
    u64 k_base[BASES ? COPIES : 1], v_base[BASES ? COPIES : 1];
    if (BASES) {
#pragma unroll
        for (int k = 0; k < COPIES; ++k) {
            const int r = k * ROWS_PER_COPY + lrow;
            k_base[k] = pinned64((u64)cache + (lane_bytes + (u32)((t_begin + wrow + r) & slot_mask) * slot_bytes));
            v_base[k] = pinned64(k_base[k] + half_bytes);
        }
    }
    auto issue = [&](int it, int pages) {
        const u32 dst = (u32)((it % STAGES) * STAGE_BYTES);
        if (BASES && fixed_slots) {
#pragma unroll
            for (int k = 0; k < COPIES; ++k) {
                const u32 page = (u32)__shfl_sync(0xffffffffu, pages, k * ROWS_PER_COPY + lrow);
                cp_async16_to(copy_dst[k] + dst, (const u8*)mad_wide(page, page_bytes, k_base[BASES ? k : 0]));
                cp_async16_to(copy_dst[k] + dst + (u32)(ST * RB), (const u8*)mad_wide(page, page_bytes, v_base[BASES ? k : 0]));
            }
            return;
        }
        const int tw = t_begin + it * ST + wrow;
#pragma unroll
        for (int k = 0; k < COPIES; ++k) {
            const int r = k * ROWS_PER_COPY + lrow;
            const int page = __shfl_sync(0xffffffffu, pages, r);
            const u8* src = cache + (u64)(u32)page * page_bytes + (lane_bytes + (u32)((tw + r) & slot_mask) * slot_bytes);
            cp_async16_to(copy_dst[k] + dst, src);
            cp_async16_to(copy_dst[k] + dst + (u32)(ST * RB), src + half_bytes);
        }
    };

    // The CTA's critical path is the chain work item -> block table -> first copies, then the
    // epilogue. The query rows of the group (G x D, contiguous) are loaded right after the work
    // item, 16 bytes per thread (read element by element by each thread, they took 4 us:
    // bench/gpu/NOTES.md), and converted to the MMA's type below, once per element.
    constexpr int QE = Q_FP8 ? 1 : 2;
    constexpr int QS = D + 8;  // row stride of the converted rows, in halves (conflict-free reads)
    constexpr int QK = (MMA_MAX_GROUP * D * QE / 16 + THREADS - 1) / THREADS;  // chunks per thread
    const int q_chunks = G * D * QE / 16;
    uint4 q_raw[QK];
    {
        const uint4* q_src = (const uint4*)((const u8*)p.q + ((i64)b * p.num_qo_heads + (i64)kv_head * G) * (D * QE));
#pragma unroll
        for (int k = 0; k < QK; ++k)
            if (tid + k * THREADS < q_chunks) q_raw[k] = __ldg(q_src + tid + k * THREADS);
    }
    // Block-table entries are read two stages before their copies are issued: at one, an e4m3
    // iteration is shorter than the entry's trip from DRAM, and the warps stalled on it.
    int pgs[STAGES + 2];
#pragma unroll
    for (int st = 0; st < STAGES + 2; ++st) pgs[st] = page_of(st);
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
        if (st < n_iter) issue(st, pgs[st]);
        cp_async_commit();
    }
    int pg = pgs[STAGES], pg_next = pgs[STAGES + 1];
    DB_TRACE(3, (u32)pg);

    // The query rows in the MMA's 16-bit type (f16 for e4m3 caches, exact for an e4m3 query),
    // behind the pipeline's stages: each thread converts its chunks (16 e4m3 or 8 bf16 elements).
    u16* q16 = (u16*)(smem + STAGES * STAGE_BYTES);
#pragma unroll
    for (int k = 0; k < QK; ++k) {
        const int c = tid + k * THREADS;
        if (c < q_chunks) {
            constexpr int EL = 16 / QE;  // elements per chunk
            const int row = c / (D / EL), dim = (c % (D / EL)) * EL;
            const u32 w[4] = {q_raw[k].x, q_raw[k].y, q_raw[k].z, q_raw[k].w};
            u32 packed[EL / 2];
#pragma unroll
            for (int i = 0; i < EL / 2; ++i) {
                float lo, hi;
                if (Q_FP8 && MMA_E4M3_F16_SCALE == 1.0f) {
                    // sm_89+: two elements per instruction, exact (every e4m3 value is an f16).
                    packed[i] = e4m3x2_to_f16x2(w[i / 2] >> (16 * (i % 2)));
                    continue;
                } else if (Q_FP8) {
                    const u32 pair = w[i / 2] >> (16 * (i % 2));
                    lo = e4m3_to_f32((u8)pair);
                    hi = e4m3_to_f32((u8)(pair >> 8));
                } else {
                    lo = bf16_to_f32((u16)w[i]);
                    hi = bf16_to_f32((u16)(w[i] >> 16));
                }
                packed[i] = pack2<F16>(lo, hi);
            }
#pragma unroll
            for (int i = 0; i < EL / 2; i += 4)
                *(uint4*)&q16[row * QS + dim + 2 * i] = make_uint4(packed[i], packed[i + 1], packed[i + 2], packed[i + 3]);
        }
    }
    __syncthreads();
    // Query as B fragments: b0 = (k 2t, 2t+1; head g), b1 = (k 2t+8, 2t+9; head g). For e4m3
    // caches the k order within a 16-dim step is dims 4t..4t+3 (see the K loads); padding heads
    // (past the group) are zero.
    u32 qb[KSTEPS][NH][2];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
        for (int nh = 0; nh < NH; ++nh) {
            const int h = nh * 8 + g;
            qb[kk][nh][0] = qb[kk][nh][1] = 0u;
            if (h < G) {
                if (KV_FP8) {
                    const uint2 v = *(const uint2*)&q16[h * QS + kk * 16 + 4 * tq];
                    qb[kk][nh][0] = v.x;
                    qb[kk][nh][1] = v.y;
                } else {
                    qb[kk][nh][0] = *(const u32*)&q16[h * QS + kk * 16 + 2 * tq];
                    qb[kk][nh][1] = *(const u32*)&q16[h * QS + kk * 16 + 2 * tq + 8];
                }
            }
        }
    }
    DB_TRACE(4, qb[KSTEPS - 1][NH - 1][1]);
    const float qk_scale = p.q_scale * p.k_scale * p.sm_scale * DB_LOG2E * kv_raw;

    // ldmatrix addresses in stage 0: K fragments (per pair of e4m3 k-steps, or per bf16
    // k-step) and V fragments (per pair of e4m3 16-byte chunks, or per bf16 16-dim slice).
    constexpr int KFRAGS = KV_FP8 ? (KSTEPS + 1) / 2 : KSTEPS;
    constexpr int VFRAGS = KV_FP8 ? NC / 2 : MT;
    u32 k_off[TPW][KFRAGS], v_off[TPW][VFRAGS];
#pragma unroll
    for (int j = 0; j < TPW; ++j) {
#pragma unroll
        for (int f = 0; f < KFRAGS; ++f) {
            const int row = wrow + j * 16 + (mi & 1) * 8 + mr;
            k_off[j][f] = pinned(smem_base + (u32)mma_swz(row, 2 * f + (mi >> 1), NC));
        }
#pragma unroll
        for (int f = 0; f < VFRAGS; ++f) {
            const int row = KV_FP8 ? wrow + j * 16 + (mi & 1) * 8 + mr : wrow + j * 16 + (mi >> 1) * 8 + mr;
            v_off[j][f] = pinned(smem_base + (u32)mma_swz(row, KV_FP8 ? 2 * f + (mi >> 1) : 2 * f + (mi & 1), NC) + (u32)(ST * RB));
        }
    }

    float m[NH][2], lsum[NH][2];
    float o[MT][NH][4];
#pragma unroll
    for (int nh = 0; nh < NH; ++nh) {
        m[nh][0] = m[nh][1] = -DB_INF;
        lsum[nh][0] = lsum[nh][1] = 0.0f;
#pragma unroll
        for (int i = 0; i < MT; ++i) o[i][nh][0] = o[i][nh][1] = o[i][nh][2] = o[i][nh][3] = 0.0f;
    }

    for (int it = 0; it < n_iter; ++it) {
        const int valid = t_end - (t_begin + it * ST + wrow);  // tokens of this warp's rows in range
        if (valid <= 0) break;  // and in every later stage: this warp is done
        cp_async_wait<STAGES - 1>();
        __syncwarp();
        if (it == 0) DB_TRACE(5, 0u);
        DB_PROGRESS(it, n_iter);
        const u32 stage = (u32)((it % STAGES) * STAGE_BYTES);

        // S^T for TPW tiles of 16 tokens: s[j][nh][c], c0/c1 = token g, c2/c3 = token g+8.
        float s[TPW][NH][4];
#pragma unroll
        for (int j = 0; j < TPW; ++j)
#pragma unroll
            for (int nh = 0; nh < NH; ++nh) s[j][nh][0] = s[j][nh][1] = s[j][nh][2] = s[j][nh][3] = 0.0f;
        if (KV_FP8) {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk += 2) {
#pragma unroll
                for (int j = 0; j < TPW; ++j) {
                    u32 r[4];
                    ldsm_x4(k_off[j][kk / 2] + stage, r);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        if (kk + h < KSTEPS) {
                            u32 a[4];
                            e4m3x2x2_to_f16x2(r[2 * h], a[0], a[2]);
                            e4m3x2x2_to_f16x2(r[2 * h + 1], a[1], a[3]);
#pragma unroll
                            for (int nh = 0; nh < NH; ++nh) mma16816<F16>(s[j][nh], a, qb[kk + h][nh][0], qb[kk + h][nh][1]);
                        }
                    }
                }
            }
        } else {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
                for (int j = 0; j < TPW; ++j) {
                    u32 a[4];
                    ldsm_x4(k_off[j][kk] + stage, a);
#pragma unroll
                    for (int nh = 0; nh < NH; ++nh) mma16816<F16>(s[j][nh], a, qb[kk][nh][0], qb[kk][nh][1]);
                }
            }
        }

        // Online softmax per head column (2t, 2t+1 of each n-tile), log2 units.
        float mx[NH][2];
#pragma unroll
        for (int nh = 0; nh < NH; ++nh) {
            mx[nh][0] = mx[nh][1] = -DB_INF;
#pragma unroll
            for (int j = 0; j < TPW; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int tok = j * 16 + g + (i >> 1) * 8;
                    const float v = tok < valid ? s[j][nh][i] * qk_scale : -DB_INF;
                    s[j][nh][i] = v;
                    mx[nh][i & 1] = fmaxf(mx[nh][i & 1], v);
                }
        }
        bool grew = false;
#pragma unroll
        for (int nh = 0; nh < NH; ++nh)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                float v = mx[nh][c];
                v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
                v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
                v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
                if (v > m[nh][c]) {
                    const float alpha = (m[nh][c] == -DB_INF) ? 0.0f : exp2f(m[nh][c] - v);
                    lsum[nh][c] *= alpha;
                    mx[nh][c] = alpha;
                    m[nh][c] = v;
                    grew = true;
                } else {
                    mx[nh][c] = 1.0f;
                }
            }
        if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int nh = 0; nh < NH; ++nh) {
                    o[i][nh][0] *= mx[nh][0];
                    o[i][nh][1] *= mx[nh][1];
                    o[i][nh][2] *= mx[nh][0];
                    o[i][nh][3] *= mx[nh][1];
                }
        }
        // P^T as B fragments through movmatrix.
        u32 pb[TPW][NH][2];
#pragma unroll
        for (int j = 0; j < TPW; ++j)
#pragma unroll
            for (int nh = 0; nh < NH; ++nh) {
                float pr[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    // m is finite here (every warp tile has a valid token, and the max runs
                    // over the tile's tokens); a masked token's -inf gives exp2 = 0.
                    pr[i] = exp2_ftz(s[j][nh][i] - m[nh][i & 1]);
                    lsum[nh][i & 1] += pr[i];
                }
                pb[j][nh][0] = movmatrix_trans(pack2<F16>(pr[0], pr[1]));
                pb[j][nh][1] = movmatrix_trans(pack2<F16>(pr[2], pr[3]));
            }

        // O^T += V^T P^T.
        if (KV_FP8) {
#pragma unroll
            for (int c = 0; c < NC; c += 2) {
#pragma unroll
                for (int j = 0; j < TPW; ++j) {
                    u32 r[4];
                    ldsm_x4_trans(v_off[j][c / 2] + stage, r);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        // Bytes 0, 2 | 1, 3 of each register: one byte select, then both halves.
                        u32 a[4];
                        e4m3x2x2_to_f16x2(prmt(r[2 * h], 0x3120u), a[0], a[1]);
                        e4m3x2x2_to_f16x2(prmt(r[2 * h + 1], 0x3120u), a[2], a[3]);
#pragma unroll
                        for (int nh = 0; nh < NH; ++nh) mma16816<F16>(o[c + h][nh], a, pb[j][nh][0], pb[j][nh][1]);
                    }
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < MT; ++i) {
#pragma unroll
                for (int j = 0; j < TPW; ++j) {
                    u32 a[4];
                    ldsm_x4_trans(v_off[j][i] + stage, a);
#pragma unroll
                    for (int nh = 0; nh < NH; ++nh) mma16816<F16>(o[i][nh], a, pb[j][nh][0], pb[j][nh][1]);
                }
            }
        }
        // The stage is consumed (every lane's ldmatrix of it has returned): refill its buffer
        // with the stage STAGES ahead.
        __syncwarp();
        {
            const int nxt = it + STAGES;
            const int pn = page_of(nxt + 2);
            if (nxt < n_iter) issue(nxt, pg);
            cp_async_commit();
            pg = pg_next;
            pg_next = pn;
        }
    }
    DB_TRACE(6, __float_as_uint(o[0][0][0]));
    cp_async_wait<0>();
    __syncthreads();
    DB_TRACE(7, 0u);

    // Row sums over the 8 token lanes of a column, then the warps merge through shared memory.
#pragma unroll
    for (int nh = 0; nh < NH; ++nh)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            lsum[nh][c] += __shfl_xor_sync(0xffffffffu, lsum[nh][c], 4);
            lsum[nh][c] += __shfl_xor_sync(0xffffffffu, lsum[nh][c], 8);
            lsum[nh][c] += __shfl_xor_sync(0xffffffffu, lsum[nh][c], 16);
        }
    // red_o's rows are padded to RS floats. A thread's values are heads 2t and 2t + 1 at dims
    // g and g + 8 (bf16 path) or 2g and 2g + 1 (e4m3 path): with rows of D floats the four t of a
    // column hit one bank (4-way conflicts, 512 shared-memory wavefronts per CTA). With D + 4 the
    // bf16 path's 4-byte stores are conflict-free, and so are the e4m3 path's 8-byte ones (both
    // dims at once; each half-warp covers 16 distinct bank pairs). The float4 reads below stay
    // aligned.
    constexpr int RS = D + 4;
    float* red_o = (float*)smem;
    float* red_m = red_o + WARPS * G * RS;
    float* red_l = red_m + WARPS * G;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int nh = 0; nh < NH; ++nh) {
            if (KV_FP8) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int head = nh * 8 + 2 * tq + c;
                    if (head < G)
                        *(float2*)&red_o[(warp * G + head) * RS + i * 16 + 2 * g] = make_float2(o[i][nh][c], o[i][nh][c + 2]);
                }
            } else {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int head = nh * 8 + 2 * tq + (k & 1);
                    if (head < G) red_o[(warp * G + head) * RS + i * 16 + g + (k >> 1) * 8] = o[i][nh][k];
                }
            }
        }
    if (g == 0) {
#pragma unroll
        for (int nh = 0; nh < NH; ++nh)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int head = nh * 8 + 2 * tq + c;
                if (head < G) {
                    red_m[warp * G + head] = m[nh][c];
                    red_l[warp * G + head] = lsum[nh][c];
                }
            }
    }
    __syncthreads();
    DB_TRACE(8, 0u);
    // Each row's weights, once per row: warp w's share is exp2(m_w - max) / den, with the output
    // scale folded in (one division per row, not per element). They replace red_m in place (a
    // row's entries belong to its thread alone).
    const float out_scale = p.v_scale * kv_raw;
    const i64 prow_base = (i64)prow0 * p.num_qo_heads + (i64)kv_head * G;
    if (tid < G) {
        float mm = -DB_INF;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mm = fmaxf(mm, red_m[w * G + tid]);
        float c[WARPS], den = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float mw = red_m[w * G + tid];
            c[w] = (mw == -DB_INF) ? 0.0f : exp2f(mw - mm);
            den += red_l[w * G + tid] * c[w];
        }
        const float inv = den > 0.0f ? out_scale / den : 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) red_m[w * G + tid] = c[w] * inv;
        if (!direct)
            store_partial(true, partial_lse_row(p, kv_head * G + tid) + prow0,
                          den > 0.0f ? mm + log2f(den) : -DB_INF,
                          partial_store_policy(p));
    }
    __syncthreads();
    // The rows, four elements per thread and step (rows are contiguous, D a multiple of 4), written
    // straight from registers: the final output in its dtype (store_output_vec), or the partial.
    // Every thread runs every step (NVFP4's scale-factor groups are found by shuffles); a step's
    // tail is whole 16-element groups, since G * D is a multiple of 16. All steps' rows are
    // weighed and converted first and stored after, so that the steps' conversion chains (NVFP4's
    // amax -> scale factor -> reciprocal -> codes is a long one) overlap.
    constexpr int STEP = THREADS * 4;
    constexpr int STEPS = (NH * 8 * D + STEP - 1) / STEP;
    float4 acc[STEPS];
#pragma unroll
    for (int st = 0; st < STEPS; ++st) {
        const int e = st * STEP + tid * 4;
        const int row = e < G * D ? e / D : 0, col = e % D;
        acc[st] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (e < G * D) {
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const float wt = red_m[w * G + row];
                const float4 x = *(const float4*)&red_o[(w * G + row) * RS + col];
                acc[st].x += x.x * wt;
                acc[st].y += x.y * wt;
                acc[st].z += x.z * wt;
                acc[st].w += x.w * wt;
            }
        }
    }
    if (direct) {
        OutputVec<OUT, 4> v[STEPS];
#pragma unroll
        for (int st = 0; st < STEPS; ++st) {
            const float x[4] = {acc[st].x, acc[st].y, acc[st].z, acc[st].w};
            v[st] = convert_output_vec<OUT, 4>(p, x);
        }
#pragma unroll
        for (int st = 0; st < STEPS; ++st) {
            const int e = st * STEP + tid * 4;
            if (e < G * D) write_output_vec<OUT, 4>(p, v[st], b, kv_head * G + e / D, e % D);
        }
    } else {
#pragma unroll
        for (int st = 0; st < STEPS; ++st) {
            const int e = st * STEP + tid * 4;
            store_partial(e < G * D, (float4*)&p.partial_o[prow_base * D + e], acc[st], partial_store_policy(p));
        }
        // The fused merge: the group's last CTA merges it here (the same for the whole CTA).
        if (p.fused_merge) merge_group_if_last<D, OUT, WARPS>(p, b, kv_head, tid);
    }
    DB_TRACE(9, 0u);
    DB_TRACE(10, 0u);
}

// Group up to 8 (one n-tile of heads) and up to 16 (two); S pipeline stages.
#define DB_DECODE_MMA(D, GN, NH, QN, QF, KN, KF, ON, OV, S)                                        \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS)                                      \
        decode_mma_d##D##_g##GN##_##QN##_##KN##_##ON##_s##S(AttnParams p) {                        \
        static_assert(KF ? (S >= MMA_STAGES_FP8_MIN && S <= MMA_STAGES_FP8_MAX)                    \
                         : (S >= MMA_STAGES_BF16_MIN && S <= MMA_STAGES_BF16_MAX),                 \
                      "a stage count the host does not know");                                     \
        decode_mma<D, NH, QF, KF, OV, MMA_WARPS, 1, S>(p);                                         \
    }

#define DB_DECODE_MMA_OUTS(D, GN, NH, QN, QF, KN, KF, S)                                           \
    DB_DECODE_MMA(D, GN, NH, QN, QF, KN, KF, bf16, OUT_BF16, S)                                    \
    DB_DECODE_MMA(D, GN, NH, QN, QF, KN, KF, fp8, OUT_FP8, S)                                      \
    DB_DECODE_MMA(D, GN, NH, QN, QF, KN, KF, nvfp4, OUT_NVFP4, S)

// Every e4m3 depth from MMA_STAGES_FP8_MIN to MMA_STAGES_FP8_MAX.
#define DB_DECODE_MMA_FP8_STAGES(D, GN, NH, QN, QF)                                                \
    DB_DECODE_MMA_OUTS(D, GN, NH, QN, QF, fp8, true, 2)                                            \
    DB_DECODE_MMA_OUTS(D, GN, NH, QN, QF, fp8, true, 3)                                            \
    DB_DECODE_MMA_OUTS(D, GN, NH, QN, QF, fp8, true, 4)

#define DB_DECODE_MMA_GROUP(D, GN, NH)                                                             \
    DB_DECODE_MMA_OUTS(D, GN, NH, bf16, false, bf16, false, 2)                                     \
    DB_DECODE_MMA_OUTS(D, GN, NH, bf16, false, bf16, false, 3)                                     \
    DB_DECODE_MMA_FP8_STAGES(D, GN, NH, bf16, false)                                               \
    DB_DECODE_MMA_FP8_STAGES(D, GN, NH, fp8, true)

#ifndef DB_NO_KERNEL_EXPORTS
DB_DECODE_MMA_GROUP(64, 8, 1)
DB_DECODE_MMA_GROUP(64, 16, 2)
DB_DECODE_MMA_GROUP(128, 8, 1)
DB_DECODE_MMA_GROUP(128, 16, 2)
#endif
