// Kernel development bench: the optimized decode kernel's variants on the issue-7 table cells,
// compiled with nvcc on the GPU machine from the same sources the agent compiles with NVRTC.
// This is a developer's tool for trying kernel designs quickly (several variants, 125 cells,
// about a minute); the figures that count come from `decodebench run` (see bench/RESULTS.md).
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -ftz=false -prec-div=true -prec-sqrt=true \
//        -o /tmp/kbench bench/gpu/kbench.cu -lcuda && /tmp/kbench [variant filter] [modes] [batch seq]
//
// Inputs follow the reference script: 64/8 heads, head 128, block 16, HND, a 256,000-token pool,
// lengths uniform in [1, max) with the last one at max, pages drawn uniformly. Every variant's
// output is compared with the fp32 GPU reference (bf16 outputs, b <= 16; maxerr = max |error| /
// max |reference|) and with the first variant (diffB = bytes that differ; different chunkings
// round differently). Times: CUDA-graph replays of 10 launches, median per launch.
//
// `kbench probe [modes]` (kbench_probe.cuh): read-rate probes on the long small-batch cells, the
// decode kernel's own page gather with nothing else in the way, beside the kernel.
// Knobs (environment): KBENCH_LENS and KBENCH_TABLE (a case's lengths, its block table from a
// file), KBENCH_CUBIN + KBENCH_CUBIN_FN (the decode kernel from a cubin, e.g. decodebench's NVRTC
// module out of its compile cache, launched with the same arguments; KBENCH_CUBIN_MERGE_FN the
// merge kernel from it too: NOTES call 112), KBENCH_ALLOC=async (pools
// from cudaMallocAsync, as decodebench allocates), KBENCH_ZERO_POOL (an all-zero cache),
// KBENCH_REVERSE (the variants in the opposite order: at the power cap a cell's later variants
// run at lower clocks, so read a large-cell A/B both ways; bench/gpu/NOTES.md run 54),
// KBENCH_ABBA (both orders in one run: each cell's variants forward, then backward, the faster
// time of each kept; twice the run time), KBENCH_GRAPH_LAUNCHES (calls per timed graph, 10 by
// default as in decodebench's table grid), KBENCH_PREV_PDL (the prev_* kernel launched as a
// programmatic dependent, as production launches the current one: only for kernels from run 59
// on, which wait for the kernel before them before reading their inputs), KBENCH_MERGE_SMEM
// (unused dynamic shared memory on the merge's launch: keeps its CTAs off full SMs, call 129).
//
// A/B against a committed kernel: `bash bench/gpu/kbench_prev.sh [commit]` here writes
// bench/gpu/prev/decode_mma_prev.cu; carried with the call, it adds the prev_* variants, timed
// cell by cell beside the working tree's kernel. That carries the decode kernel only: for a change
// to the merge kernel or the launch code, `bash bench/gpu/kbench_ab_build.sh [commit]` here builds
// kbench from the commit and from the working tree, `bench/gpu/kbench_ab.sh` alternates the two on
// the GPU machine, and `bench/gpu/kbench_ab.py` reads the log.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <queue>
#include <random>
#include <string>
#include <vector>
#include <cuda.h>
#include <cuda_runtime.h>

#include "../../kernels/cuda/common.cuh"
#include "../../kernels/cuda/generate.cu"
#include "../../kernels/cuda/reference.cu"
#define TL_MAX 16384
#define TL_POINTS 11
#define TL_MERGE_POINTS 7
// Progress points per CTA (DB_PROGRESS below): 16 by default; -DTL_PROG=64 gives every stage of a
// CTA of up to 64 stages a point of its own (bench/gpu/steal_bound.py).
#ifndef TL_PROG
#define TL_PROG 16
#endif
// The merge kernel's trace points (DB_MERGE_TRACE in decode.cu), thread (0, 0) of each CTA: after
// its wait for the decode grid (0), after its loads and sums and the trigger (1); for rows of
// several warps also once the warp's first loads are in (3) and all of its first round (5), with
// its weighted sums done, before the trigger (6) (calls 130-132), after the barrier before the
// warps' sums are combined (2), and after the stores (4).
__device__ unsigned long long tl_mphase[TL_MAX][TL_MERGE_POINTS];
__device__ unsigned tl_mdep[TL_MAX];
#ifdef KBENCH_TRACE
// Thread (0, 0) of the CTA reads the timer into point `point`, after `before` (a statement).
#define KBENCH_MERGE_STAMP(point, before)                                                    \
    do {                                                                                     \
        const unsigned i_ = blockIdx.y * gridDim.x + blockIdx.x;                             \
        if (threadIdx.x == 0 && threadIdx.y == 0 && i_ < TL_MAX) {                           \
            before;                                                                          \
            unsigned long long t_;                                                           \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)::"memory");                \
            tl_mphase[i_][point] = t_;                                                       \
        }                                                                                    \
    } while (0)
// The _DEP form stores `dep` first, so that the timer is read once that value is there.
#define DB_MERGE_TRACE_DEP(point, dep) KBENCH_MERGE_STAMP(point, tl_mdep[i_] = (dep))
#define DB_MERGE_TRACE(point) KBENCH_MERGE_STAMP(point, (void)0)
#endif
#include "../../kernels/cuda/decode.cu"
#define DB_NO_KERNEL_EXPORTS  // only the variants below are instantiated from decode_mma.cu
// Phase trace (KBENCH_TIMELINE): the value a point depends on is stored first, so the timer is
// read only once that value is there (a warp issues in order).
__device__ unsigned long long tl_phase[TL_MAX][TL_POINTS];
__device__ unsigned tl_dep[TL_MAX][TL_POINTS];
#ifdef KBENCH_TRACE  // built so by timeline.sh; the timed builds have no trace points
#define DB_TRACE(point, dep)                                                                 \
    do {                                                                                     \
        if (threadIdx.x == 0 && blockIdx.x < TL_MAX) {                                       \
            tl_dep[blockIdx.x][point] = (dep);                                               \
            unsigned long long t_;                                                           \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)::"memory");                \
            tl_phase[blockIdx.x][point] = t_;                                                \
        }                                                                                    \
    } while (0)
// Progress (KBENCH_TRACE): thread 0's time at the last stage of each TL_PROG-th of its CTA's
// main loop (a sixteenth by default), so that a CTA's read rate can be followed over its life.
__device__ unsigned long long tl_prog[TL_MAX][TL_PROG];
#define DB_PROGRESS(it, n_iter)                                                              \
    do {                                                                                     \
        if (threadIdx.x == 0 && blockIdx.x < TL_MAX) {                                       \
            unsigned long long t_;                                                           \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)::"memory");                \
            tl_prog[blockIdx.x][(it) * TL_PROG / (n_iter)] = t_;                             \
        }                                                                                    \
    } while (0)
#endif
#include "../../kernels/cuda/decode_mma.cu"
// The previous version of the kernel for A/B runs, when one was extracted (see kbench.sh).
#if __has_include("prev/decode_mma_prev.cu")
#include "prev/decode_mma_prev.cu"
#define KBENCH_HAVE_PREV 1
#endif

#define CK(x)                                                                               \
    do {                                                                                    \
        cudaError_t e_ = (x);                                                               \
        if (e_ != cudaSuccess) {                                                            \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

// ------------------------------------------------------------------------------------------
// Variants
// ------------------------------------------------------------------------------------------

// Timeline (KBENCH_TIMELINE=1, single-case runs): every CTA of the decode kernel and the merge
// records its SM and its start and end on the global timer (ns); kbench writes them as CSV, with
// the phase trace.
__device__ unsigned long long tl_decode[TL_MAX][3];
__device__ unsigned long long tl_merge[TL_MAX][3];
__device__ __forceinline__ unsigned long long gtimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned smid() {
    unsigned r;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
    return r;
}

// A launch as a programmatic dependent of the kernel before it in the stream (PDL, sm_90+), as
// decodebench launches the merge and, in chained calls, the decode kernel (launch.rs).
static void launch_dependent(const void* fn, dim3 grid, dim3 block, int smem, cudaStream_t s, void** args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelExC(&cfg, fn, args));
}

// The same for a kernel from a cubin (KBENCH_CUBIN), through the driver API; `dependent` false: a
// plain launch.
static void launch_cubin(CUfunction fn, dim3 grid, dim3 block, int smem, cudaStream_t s, void** args, bool dependent) {
    CUlaunchConfig cfg = {};
    cfg.gridDimX = grid.x, cfg.gridDimY = grid.y, cfg.gridDimZ = grid.z;
    cfg.blockDimX = block.x, cfg.blockDimY = block.y, cfg.blockDimZ = block.z;
    cfg.sharedMemBytes = smem;
    cfg.hStream = s;
    CUlaunchAttribute attr[1];
    attr[0].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr[0].value.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = dependent ? 1 : 0;
    if (cuLaunchKernelEx(&cfg, fn, args, nullptr) != CUDA_SUCCESS) {
        fprintf(stderr, "cuLaunchKernelEx failed (a kernel from KBENCH_CUBIN)\n");
        exit(1);
    }
}

// PREV: the previous version of the kernel (prev/decode_mma_prev.cu) instead of the current one.
template <int D, int NH, bool QF, bool KF, int OUT, int W, int TPW, int STG, bool PREV>
__global__ void __launch_bounds__(W * 32) k_tc(AttnParams p) {
    const unsigned long long t0 = gtimer();
#ifdef KBENCH_HAVE_PREV
    if (PREV) {
        decode_mma_prev<D, NH, QF, KF, OUT, W, TPW, STG>(p);
    } else
#endif
        decode_mma<D, NH, QF, KF, OUT, W, TPW, STG>(p);
    if (threadIdx.x == 0 && blockIdx.x < TL_MAX) {
        tl_decode[blockIdx.x][0] = smid();
        tl_decode[blockIdx.x][1] = t0;
        tl_decode[blockIdx.x][2] = gtimer();
    }
}

// The traced build's trace points took the merge from decodebench's 64 registers to 70, and a
// 256-thread merge CTA of 72 no longer fits beside three 128-register BF16 decode CTAs (65536 per
// SM): its CTAs then came up only as decode CTAs left, and the timelines overstated the merge
// (bench/gpu/NOTES.md, calls 128-129). Held at 64 here, as in production.
#ifdef KBENCH_TRACE
#define KBENCH_MERGE_BOUNDS __launch_bounds__(256, 4)
#else
#define KBENCH_MERGE_BOUNDS
#endif
template <int OUT>
__global__ void KBENCH_MERGE_BOUNDS k_merge(AttnParams p) {
    const unsigned long long t0 = gtimer();
    merge_partials<128, OUT>(p);
    const unsigned i = blockIdx.y * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0 && i < TL_MAX) {
        tl_merge[i][0] = smid();
        tl_merge[i][1] = t0;
        tl_merge[i][2] = gtimer();
    }
}

struct Mode {
    const char* name;
    bool qf, kf;
    int out;  // OUT_*
};
static const Mode MODES[5] = {{"bf16/bf16/bf16", false, false, OUT_BF16},
                              {"bf16/fp8/bf16", false, true, OUT_BF16},
                              {"fp8/fp8/bf16", true, true, OUT_BF16},
                              {"fp8/fp8/fp8", true, true, OUT_FP8},
                              {"fp8/fp8/nvfp4", true, true, OUT_NVFP4}};

struct Kernel {
    const void* fn;
    int threads, stage_tokens, smem;
    const void* own_fn = nullptr;  // tc_dec: the mode's own kernel, for plans the decode kernel writes
};

struct Variant {
    std::string name;
    std::function<Kernel(int mode)> get;
    int min_chunk = 128;
    int overhead = 192;
    int order = 2;  // launch order: 0 = sequence order, 1 = longest first, 2 = head by head, longest first,
                    // 3 = longest first with the direct items ahead
    bool merge = true;  // false: the merge is skipped (a timing diagnostic only: the output is wrong)
    bool direct_items = true;  // unsplit sequences written by their decode CTA (DB_DIRECT_ITEM)
    int fused_max = 0;  // fused merge (merge_group_if_last) when no sequence has more splits
    bool pdl_decode = true;  // the decode kernel a programmatic dependent of the previous kernel (launch.rs)
    int merge_cta_warps = 4;  // the merge kernel's warps per CTA unless a row needs 8 (launch.rs merge_block)
    bool merge_nvfp4 = false;  // a timing diagnostic: the NVFP4 merge whatever the mode's output
                               // (it writes fewer bytes than any other; the output is wrong)
};

template <int W, int TPW, int STG_BF16, int STG_FP8, bool PREV = false>
static Kernel tc(int mode) {
    constexpr int ST = W * 16 * TPW;
    const bool kf = MODES[mode].kf;
    const int stages = kf ? STG_FP8 : STG_BF16;
    const int pipe = stages * 2 * ST * 128 * (kf ? 1 : 2) + 8 * (128 + 8) * 2;  // + the query rows
    const int merge = (W * 8 * (128 + 4) + 2 * W * 8 + 8 * 128) * 4;
    const void* f[5] = {(const void*)k_tc<128, 1, false, false, OUT_BF16, W, TPW, STG_BF16, PREV>,
                        (const void*)k_tc<128, 1, false, true, OUT_BF16, W, TPW, STG_FP8, PREV>,
                        (const void*)k_tc<128, 1, true, true, OUT_BF16, W, TPW, STG_FP8, PREV>,
                        (const void*)k_tc<128, 1, true, true, OUT_FP8, W, TPW, STG_FP8, PREV>,
                        (const void*)k_tc<128, 1, true, true, OUT_NVFP4, W, TPW, STG_FP8, PREV>};
    return {f[mode], W * 32, ST, std::max(pipe, merge)};
}

// The FP8-query modes' decode kernel compiled for output OUT whatever the mode's output: with no
// direct items (and no fused merge) the decode kernel writes only f32 partials, and the merge
// alone writes the output dtype; whether the output-dtype epilogue compiled into the decode kernel
// costs its main loop time (NOTES call 62: NVFP4's decode grid ended 0.3 us later at b4 s1024).
template <int OUT, int W, int TPW, int STG_BF16, int STG_FP8>
static Kernel tc_dec(int mode) {
    Kernel k = tc<W, TPW, STG_BF16, STG_FP8>(mode);
    k.own_fn = k.fn;
    if (MODES[mode].qf) k.fn = (const void*)k_tc<128, 1, true, true, OUT, W, TPW, STG_FP8, false>;
    return k;
}

static const void* merge_fn(int mode) {
    const int out = MODES[mode].out;
    return out == OUT_BF16 ? (const void*)k_merge<OUT_BF16>
                           : out == OUT_FP8 ? (const void*)k_merge<OUT_FP8> : (const void*)k_merge<OUT_NVFP4>;
}

// ------------------------------------------------------------------------------------------
// Planner (the same algorithm as kernels/src/cuda/plan.rs, with its two constants as knobs)
// ------------------------------------------------------------------------------------------

struct Plan {
    std::vector<int4> items;
    std::vector<int> offsets;
    bool direct;
    std::vector<int4> launch;  // one per CTA: {batch, begin, end, row * heads + head}
};

static Plan plan_with_chunk(const std::vector<int>& lens, long chunk, int heads, int order, bool direct_items) {
    Plan p;
    for (size_t b = 0; b < lens.size(); ++b) {
        p.offsets.push_back((int)p.items.size());
        long n = std::max(1L, (lens[b] + chunk - 1) / chunk);
        for (long i = 0; i < n; ++i)
            p.items.push_back(make_int4((int)b, (int)std::min(i * chunk, (long)lens[b]),
                                        (int)std::min((i + 1) * chunk, (long)lens[b]), 0));
    }
    p.offsets.push_back((int)p.items.size());
    p.direct = p.items.size() == lens.size();
    // (offsets complete before the launch list reads them)
    for (size_t r = 0; r < p.items.size(); ++r)
        for (int h = 0; h < heads; ++h) {
            int4 w = p.items[r];
            w.w = (int)r * heads + h;
            const int b = p.items[r].x;
            if (direct_items && p.offsets[b + 1] - p.offsets[b] == 1) w.w |= DB_DIRECT_ITEM;
            p.launch.push_back(w);
        }
    if (order == 1)
        std::stable_sort(p.launch.begin(), p.launch.end(), [](int4 a, int4 b) { return a.z - a.y > b.z - b.y; });
    if (order == 3)  // longest first, but the direct items (their epilogue is the output's) ahead of all
        std::stable_sort(p.launch.begin(), p.launch.end(), [](int4 a, int4 b) {
            const bool da = a.w & DB_DIRECT_ITEM, db = b.w & DB_DIRECT_ITEM;
            return da != db ? da : a.z - a.y > b.z - b.y;
        });
    if (order == 2)
        std::stable_sort(p.launch.begin(), p.launch.end(), [heads](int4 a, int4 b) {
            const int ha = (a.w & ~DB_DIRECT_ITEM) % heads, hb = (b.w & ~DB_DIRECT_ITEM) % heads;
            return ha != hb ? ha < hb : a.z - a.y > b.z - b.y;
        });
    return p;
}

static long makespan(const Plan& p, long slots, long overhead) {
    std::priority_queue<long, std::vector<long>, std::greater<long>> q;
    for (long i = 0; i < slots; ++i) q.push(0);
    long end = 0;
    for (auto& it : p.launch) {
        long s = q.top();
        q.pop();
        long f = s + (it.z - it.y) + overhead;
        end = std::max(end, f);
        q.push(f);
    }
    return end;
}

static Plan plan(const std::vector<int>& lens, int heads, long slots, long stage, long min_chunk, long overhead,
                 int order, bool direct_items) {
    long max_len = *std::max_element(lens.begin(), lens.end());
    long total = 0;
    for (int l : lens) total += l;
    total *= heads;
    Plan best;
    long best_cost = -1;
    for (long waves : {1L, 2L, 4L}) {
        long chunk = (total + slots * waves - 1) / (slots * waves);
        chunk = std::max(chunk, min_chunk);
        chunk = (chunk + stage - 1) / stage * stage;
        chunk = std::min(chunk, std::max(1L, max_len));
        Plan p = plan_with_chunk(lens, chunk, heads, order, direct_items);
        long c = makespan(p, slots, overhead);
        if (best_cost < 0 || c < best_cost) best_cost = c, best = p;
    }
    return best;
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

static const int QO = 64, KVH = 8, HD = 128, BLK = 16, POOL_TOKENS = 256000;
static const int PAGES = POOL_TOKENS / BLK;

// FlashInfer 0.7.2 on an H100 (the issue's tables), ms: [kv fp8][batch index][seq index].
static const int BATCHES[5] = {1, 4, 16, 64, 256};
static const int SEQS[5] = {1024, 4096, 16384, 65536, 131072};
static const double FLASHINFER[2][5][5] = {
    {{0.0143, 0.0182, 0.0380, 0.1091, 0.1988},
     {0.0163, 0.0293, 0.0850, 0.2891, 0.5279},
     {0.0227, 0.0648, 0.1645, 0.8358, 1.2954},
     {0.0639, 0.1928, 0.7920, 3.1703, 5.9207},
     {0.1771, 0.6666, 2.5193, 10.455, 20.711}},
    {{0.0138, 0.0160, 0.0262, 0.0729, 0.1304},
     {0.0197, 0.0241, 0.0658, 0.1901, 0.3324},
     {0.0215, 0.0515, 0.1301, 0.6148, 0.9302},
     {0.0380, 0.1148, 0.4309, 1.6403, 3.1274},
     {0.1057, 0.3833, 1.4234, 5.7979, 11.490}}};

struct Device {
    int sms;
    u16* kv_bf16;
    u8* kv_fp8;
    u16* q_bf16;
    u8* q_fp8;
};

struct CaseBufs {
    std::vector<int> lens;
    int* d_tables;
    int* d_lens;
    int max_blocks;
    double bytes[2];  // logical bytes, bf16 kv / fp8 kv (kv part only + q/o approx)
};

static CaseBufs make_case(int batch, int max_seq, unsigned seed) {
    CaseBufs c;
    std::mt19937_64 rng(seed);
    for (int i = 0; i < batch; ++i) c.lens.push_back(max_seq <= 1 ? 1 : 1 + (int)(rng() % (max_seq - 1)));
    c.lens.back() = max_seq;
    // KBENCH_LENS="l0,l1,...": these lengths instead (a batch of their count; e.g. decodebench's
    // own draw of a case, to look at one of its plans).
    if (const char* env = getenv("KBENCH_LENS")) {
        c.lens.clear();
        for (const char* s = env; *s;) {
            c.lens.push_back(atoi(s));
            while (*s && *s != ',') ++s;
            if (*s == ',') ++s;
        }
        batch = (int)c.lens.size();
        max_seq = *std::max_element(c.lens.begin(), c.lens.end());
    }
    c.max_blocks = (max_seq + BLK - 1) / BLK;
    std::vector<int> tables((size_t)batch * c.max_blocks, 0);
    for (int b = 0; b < batch; ++b)
        for (int j = 0; j < (c.lens[b] + BLK - 1) / BLK; ++j) tables[(size_t)b * c.max_blocks + j] = (int)(rng() % PAGES);
    // KBENCH_TABLE=file: the block table from a file (comma-separated page ids, row-major, rows
    // of max_blocks), e.g. decodebench's own draw of the case.
    if (const char* path = getenv("KBENCH_TABLE")) {
        FILE* f = fopen(path, "r");
        size_t i = 0;
        int v;
        while (f && i < tables.size() && fscanf(f, "%d,", &v) == 1) tables[i++] = v;
        if (f) fclose(f);
        fprintf(stderr, "KBENCH_TABLE: %zu of %zu entries from %s\n", i, tables.size(), path);
    }
    CK(cudaMalloc(&c.d_tables, tables.size() * 4));
    CK(cudaMemcpy(c.d_tables, tables.data(), tables.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&c.d_lens, batch * 4));
    CK(cudaMemcpy(c.d_lens, c.lens.data(), batch * 4, cudaMemcpyHostToDevice));
    double tokens = 0;
    for (int l : c.lens) tokens += l;
    for (int kf = 0; kf < 2; ++kf) c.bytes[kf] = tokens * KVH * HD * 2 * (kf ? 1 : 2) + (double)batch * QO * HD * 4;
    return c;
}

static AttnParams base_params(const Device& dev, const CaseBufs& c, int mode) {
    AttnParams p;
    memset(&p, 0, sizeof p);
    // KBENCH_PARTIAL_EVICT_LAST=1: split partials stored with an L2 evict-last policy (decodebench
    // times both per case; 0, evict-normal, by default here).
    p.partial_evict_last = getenv("KBENCH_PARTIAL_EVICT_LAST") ? atoi(getenv("KBENCH_PARTIAL_EVICT_LAST")) : 0;
    const Mode& m = MODES[mode];
    p.q = m.qf ? (const void*)dev.q_fp8 : (const void*)dev.q_bf16;
    p.kv = m.kf ? (const void*)dev.kv_fp8 : (const void*)dev.kv_bf16;
    p.block_tables = c.d_tables;
    p.seq_lens = c.d_lens;
    const long half = (long)KVH * BLK * HD;
    p.page_stride = 2 * half;
    p.half_stride = half;
    p.head_stride = BLK * HD;
    p.slot_stride = HD;
    p.batch = (int)c.lens.size();
    p.num_qo_heads = QO;
    p.num_kv_heads = KVH;
    p.head_size = HD;
    p.max_blocks = c.max_blocks;
    p.block_shift = 4;
    p.group = QO / KVH;
    p.sf_cols = QO * HD / 16;
    p.direct = 1;
    p.q_scale = m.qf ? 0.5f : 1.0f;
    p.k_scale = p.v_scale = m.kf ? 0.5f : 1.0f;
    p.o_scale = m.out == OUT_FP8 ? 0.5f : 1.0f;
    p.o_sf_scale = 500.0f;
    p.sm_scale = 1.0f / sqrtf((float)HD);
    return p;
}

static size_t out_bytes(int mode, int batch) {
    size_t n = (size_t)batch * QO * HD;
    int out = MODES[mode].out;
    return out == OUT_BF16 ? n * 2 : out == OUT_FP8 ? n : n / 2;
}

struct Run {
    double ms;
    std::vector<u8> out, sf;
    int ctas_per_sm;
    size_t items;
};

// A graph of GRAPH_LAUNCHES launches of `launch` (or KBENCH_GRAPH_LAUNCHES) captured on `s`,
// warmed up for at least 25 ms and replayed `trials_hint` times (at least 5, and no more than
// about 300 ms in all): the median ms per launch. The caller destroys the graph and its instance.
static const int GRAPH_LAUNCHES = 10;
struct GraphTiming {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    double ms;
};
static GraphTiming time_graph(cudaStream_t s, const std::function<void()>& launch, int trials_hint) {
    GraphTiming g;
    // KBENCH_GRAPH_LAUNCHES=n: calls per graph (default GRAPH_LAUNCHES, as decodebench's table grid).
    static const int launches = getenv("KBENCH_GRAPH_LAUNCHES") ? std::max(1, atoi(getenv("KBENCH_GRAPH_LAUNCHES"))) : GRAPH_LAUNCHES;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < launches; ++i) launch();
    CK(cudaStreamEndCapture(s, &g.graph));
    CK(cudaGraphInstantiate(&g.exec, g.graph, 0));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    auto replay_ms = [&]() {
        float ms = 0;
        CK(cudaEventRecord(e0, s));
        CK(cudaGraphLaunch(g.exec, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms, e0, e1));
        return ms;
    };
    const float first = std::max(replay_ms(), 0.001f);
    const int warm = std::max(1, (int)(25.0 / first));
    for (int i = 0; i < warm; ++i) CK(cudaGraphLaunch(g.exec, s));
    const int trials = std::max(5, std::min(trials_hint, (int)(300.0 / first)));
    std::vector<double> t;
    for (int i = 0; i < trials; ++i) t.push_back(replay_ms() / launches);
    std::sort(t.begin(), t.end());
    g.ms = t[t.size() / 2];
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return g;
}

static Run run_variant(const Device& dev, const CaseBufs& c, int mode, const Variant& v, int trials_hint) {
    Kernel k = v.get(mode);
    CK(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem));
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k.fn, k.threads, k.smem));
    per_sm = std::max(per_sm, 1);
    Plan pl = plan(c.lens, KVH, (long)dev.sms * per_sm, k.stage_tokens, v.min_chunk, v.overhead, v.order,
                   v.direct_items);
    if (pl.direct && k.own_fn) k.fn = k.own_fn;  // no split: the decode kernel writes the output
    int max_splits = 1;
    for (size_t b = 0; b + 1 < pl.offsets.size(); ++b) max_splits = std::max(max_splits, pl.offsets[b + 1] - pl.offsets[b]);
    // The merge's block as launch.rs merge_block picks it.
    int needed = 1;
    while (needed < 8 && needed * 8 < max_splits) needed *= 2;
    const int cta_warps = std::max(needed, v.merge_cta_warps);
    int per_cta = cta_warps / needed;
    const int merged_rows = QO * (int)c.lens.size();
    while (per_cta > 1 && (merged_rows + per_cta - 1) / per_cta < dev.sms) per_cta /= 2;
    const dim3 merge_block(32 * (cta_warps / per_cta), per_cta);
    AttnParams p = base_params(dev, c, mode);
    const int batch = (int)c.lens.size();
    int4* d_work;
    int* d_off;
    CK(cudaMalloc(&d_work, pl.launch.size() * sizeof(int4)));
    CK(cudaMemcpy(d_work, pl.launch.data(), pl.launch.size() * sizeof(int4), cudaMemcpyHostToDevice));
    CK(cudaMalloc(&d_off, pl.offsets.size() * 4));
    CK(cudaMemcpy(d_off, pl.offsets.data(), pl.offsets.size() * 4, cudaMemcpyHostToDevice));
    float *po = nullptr, *plse = nullptr;
    if (!pl.direct) {
        CK(cudaMalloc(&po, pl.items.size() * QO * HD * 4));
        CK(cudaMalloc(&plse, pl.items.size() * QO * 4));
    }
    size_t ob = out_bytes(mode, batch), sfb = (size_t)((batch + 127) / 128 * 128) * ((QO * HD / 16 + 3) / 4 * 4);
    void* out;
    u8* sf;
    CK(cudaMalloc(&out, ob));
    CK(cudaMalloc(&sf, sfb));
    CK(cudaMemset(out, 0xff, ob));
    CK(cudaMemset(sf, 0, sfb));
    p.out = out;
    p.out_sf = sf;
    p.work = d_work;
    p.split_offsets = d_off;
    p.partial_o = po;
    p.partial_lse = plse;
    p.lse_stride = (int)pl.items.size();
    p.direct = pl.direct ? 1 : 0;
    p.direct_items = v.direct_items ? 1 : 0;
    // The fused merge (launch.rs FUSED_MERGE_MAX_SPLITS): tickets per (sequence, kv head), zero.
    u32* counters = nullptr;
    const bool fused = !pl.direct && max_splits <= v.fused_max;
    if (fused) {
        CK(cudaMalloc(&counters, (size_t)batch * KVH * 4));
        CK(cudaMemset(counters, 0, (size_t)batch * KVH * 4));
        p.merge_counters = counters;
        p.fused_merge = 1;
    }
    void* args[] = {&p};
    const void* mfn = v.merge_nvfp4 ? (const void*)k_merge<OUT_NVFP4> : merge_fn(mode);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    // KBENCH_CUBIN=file KBENCH_CUBIN_FN=name: the decode kernel from a cubin (e.g. decodebench's
    // NVRTC module from its compile cache) instead of this build's, launched with the same
    // arguments: whether a difference between the two programs is the compiler's or the harness's.
    // KBENCH_CUBIN_MERGE_FN=name: the merge kernel from the same cubin too, launched as decodebench
    // launches it (a programmatic dependent of the decode kernel; kbench's block shape).
    CUfunction cubin_fn = nullptr, cubin_merge = nullptr;
    if (getenv("KBENCH_CUBIN") && getenv("KBENCH_CUBIN_FN")) {
        static CUmodule mod = nullptr;
        if (!mod && cuModuleLoad(&mod, getenv("KBENCH_CUBIN")) != CUDA_SUCCESS) {
            fprintf(stderr, "KBENCH_CUBIN: cannot load %s\n", getenv("KBENCH_CUBIN"));
            exit(1);
        }
        if (cuModuleGetFunction(&cubin_fn, mod, getenv("KBENCH_CUBIN_FN")) != CUDA_SUCCESS) {
            fprintf(stderr, "KBENCH_CUBIN_FN: no %s\n", getenv("KBENCH_CUBIN_FN"));
            exit(1);
        }
        cuFuncSetAttribute(cubin_fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k.smem);
        const char* merge_name = getenv("KBENCH_CUBIN_MERGE_FN");
        if (merge_name && cuModuleGetFunction(&cubin_merge, mod, merge_name) != CUDA_SUCCESS) {
            fprintf(stderr, "KBENCH_CUBIN_MERGE_FN: no %s\n", merge_name);
            exit(1);
        }
    }
    const int merge_smem = getenv("KBENCH_MERGE_SMEM") ? atoi(getenv("KBENCH_MERGE_SMEM")) : 0;
    auto launch = [&]() {
        if (cubin_fn) {
            // As the variant launches its own decode kernel: a programmatic dependent unless
            // pdl_decode is off.
            launch_cubin(cubin_fn, dim3((unsigned)pl.launch.size()), dim3(k.threads), k.smem, s, args, v.pdl_decode);
        } else if (v.pdl_decode) {
            launch_dependent(k.fn, dim3((unsigned)pl.launch.size()), dim3(k.threads), k.smem, s, args);
        } else
            CK(cudaLaunchKernel(k.fn, dim3((unsigned)pl.launch.size()), dim3(k.threads), args, k.smem, s));
        if (pl.direct || !v.merge || fused) return;
        // The merge as decodebench launches it on sm_90+: a programmatic dependent of the decode
        // kernel (see launch.rs).
        // KBENCH_MERGE_SMEM=bytes (diagnostic): the merge launched with that much unused dynamic
        // shared memory, so that its CTAs cannot come up beside a full SM's decode CTAs.
        const dim3 mgrid((QO + merge_block.y - 1) / merge_block.y, batch);
        if (cubin_merge)
            launch_cubin(cubin_merge, mgrid, merge_block, merge_smem, s, args, true);
        else
            launch_dependent(mfn, mgrid, merge_block, merge_smem, s, args);
    };
    launch();
    CK(cudaStreamSynchronize(s));
    CK(cudaGetLastError());
    Run r;
    r.out.resize(ob);
    r.sf.resize(sfb);
    CK(cudaMemcpy(r.out.data(), out, ob, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(r.sf.data(), sf, sfb, cudaMemcpyDeviceToHost));
    GraphTiming g = time_graph(s, launch, trials_hint);
    r.ms = g.ms;
    {
        // The timed replays' last call must leave the first call's output: a race between calls
        // (a count or flag seen from the call before) shows here, where the one checked launch
        // above cannot show it. A variant that folds partials in the order they arrive differs
        // in the last bits here too (NOTES run 90).
        std::vector<u8> again(ob);
        CK(cudaStreamSynchronize(s));
        CK(cudaMemcpy(again.data(), out, ob, cudaMemcpyDeviceToHost));
        size_t changed = 0;
        for (size_t i = 0; i < ob; ++i) changed += again[i] != r.out[i];
        if (changed)
            fprintf(stderr, "kbench: %s mode %d b%zu: %zu output bytes changed over the timed replays\n",
                    v.name.c_str(), mode, c.lens.size(), changed);
    }
    cudaGraphExec_t exec = g.exec;
    if (getenv("KBENCH_TIMELINE") && getenv("KBENCH_TIMELINE_FILE")) {
        // One more launch outside the graph, after the timed replays (clocks and L2 as they were).
        CK(cudaDeviceSynchronize());
        std::vector<unsigned long long> zero((size_t)TL_MAX * 3, 0);
        CK(cudaMemcpyToSymbol(tl_decode, zero.data(), zero.size() * 8));
        CK(cudaMemcpyToSymbol(tl_merge, zero.data(), zero.size() * 8));
        std::vector<unsigned long long> zp((size_t)TL_MAX * TL_POINTS, 0);
        CK(cudaMemcpyToSymbol(tl_phase, zp.data(), zp.size() * 8));
        CK(cudaMemcpyToSymbol(tl_mphase, zp.data(), (size_t)TL_MAX * TL_MERGE_POINTS * 8));
#ifdef KBENCH_TRACE
        std::vector<unsigned long long> zprog((size_t)TL_MAX * TL_PROG, 0);
        CK(cudaMemcpyToSymbol(tl_prog, zprog.data(), zprog.size() * 8));
#endif
        CK(cudaGraphLaunch(exec, s));
        CK(cudaStreamSynchronize(s));
        std::vector<unsigned long long> d((size_t)TL_MAX * 3), m((size_t)TL_MAX * 3);
        CK(cudaMemcpyFromSymbol(d.data(), tl_decode, d.size() * 8));
        CK(cudaMemcpyFromSymbol(m.data(), tl_merge, m.size() * 8));
        std::vector<unsigned long long> ph((size_t)TL_MAX * TL_POINTS), mph((size_t)TL_MAX * TL_MERGE_POINTS);
        CK(cudaMemcpyFromSymbol(ph.data(), tl_phase, ph.size() * 8));
        CK(cudaMemcpyFromSymbol(mph.data(), tl_mphase, mph.size() * 8));
        std::vector<unsigned long long> prog((size_t)TL_MAX * TL_PROG, 0);
#ifdef KBENCH_TRACE
        CK(cudaMemcpyFromSymbol(prog.data(), tl_prog, prog.size() * 8));
#endif
        FILE* f = fopen(getenv("KBENCH_TIMELINE_FILE"), "a");
        if (f) {
            // The graph's last launch: each CTA index holds its last run.
            for (size_t i = 0; i < pl.launch.size() && i < TL_MAX; ++i)
                fprintf(f, "%s,%d,%zu,decode,%zu,%llu,%llu,%llu,%d\n", v.name.c_str(), mode, c.lens.size(), i, d[i * 3],
                        d[i * 3 + 1], d[i * 3 + 2], pl.launch[i].z - pl.launch[i].y);
            if (!pl.direct && v.merge)
                for (size_t i = 0; i < (size_t)QO * batch && i < TL_MAX; ++i) {
                    fprintf(f, "%s,%d,%zu,merge,%zu,%llu,%llu,%llu,0\n", v.name.c_str(), mode, c.lens.size(), i, m[i * 3],
                            m[i * 3 + 1], m[i * 3 + 2]);
                    for (int k = 0; k < TL_MERGE_POINTS; ++k)
                        if (mph[i * TL_MERGE_POINTS + k])
                            fprintf(f, "%s,%d,%zu,mphase%d,%zu,%llu,%llu,%llu,0\n", v.name.c_str(), mode, c.lens.size(), k,
                                    i, m[i * 3], m[i * 3 + 1], mph[i * TL_MERGE_POINTS + k]);
                }
            // A decode CTA's recorded points (n per CTA, 0 = not reached) as rows KIND<k>.
            auto cta_points = [&](const char* kind, const std::vector<unsigned long long>& pts, int n) {
                for (size_t i = 0; i < pl.launch.size() && i < TL_MAX; ++i)
                    for (int k = 0; k < n; ++k)
                        if (pts[i * n + k])
                            fprintf(f, "%s,%d,%zu,%s%d,%zu,%llu,%llu,%llu,%d\n", v.name.c_str(), mode, c.lens.size(), kind,
                                    k, i, d[i * 3], d[i * 3 + 1], pts[i * n + k], pl.launch[i].z - pl.launch[i].y);
            };
            cta_points("phase", ph, TL_POINTS);
            cta_points("prog", prog, TL_PROG);
            fprintf(f, "%s,%d,%zu,period_ns,0,0,0,%llu,0\n", v.name.c_str(), mode, c.lens.size(),
                    (unsigned long long)(r.ms * 1e6));
            fclose(f);
        }
    }
    r.ctas_per_sm = per_sm;
    r.items = pl.items.size();
    CK(cudaGraphExecDestroy(g.exec));
    CK(cudaGraphDestroy(g.graph));
    CK(cudaStreamDestroy(s));
    cudaFree(d_work);
    cudaFree(d_off);
    if (po) cudaFree(po), cudaFree(plse);
    if (counters) cudaFree(counters);
    cudaFree(out);
    cudaFree(sf);
    return r;
}

static std::vector<float> reference(const Device& dev, const CaseBufs& c, int mode) {
    AttnParams p = base_params(dev, c, mode);
    const int batch = (int)c.lens.size();
    float* out;
    CK(cudaMalloc(&out, (size_t)batch * QO * HD * 4));
    p.out = out;
    int qf = MODES[mode].qf, kf = MODES[mode].kf;
    void* args[] = {&p, &qf, &kf};
    CK(cudaLaunchKernel((const void*)reference_decode, dim3(QO, batch), dim3(REF_THREADS), args, 0, 0));
    CK(cudaDeviceSynchronize());
    std::vector<float> h((size_t)batch * QO * HD);
    CK(cudaMemcpy(h.data(), out, h.size() * 4, cudaMemcpyDeviceToHost));
    cudaFree(out);
    return h;
}

static float bf16f(u16 h) {
    u32 u = (u32)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// The variants a filter selects: a comma-separated list of whole names; one variant's whole name
// (that variant alone: `cur_lf` as a substring once ran ten variants, 500 s of device time); or
// else every name that contains it (empty: all).
template <class V>
static std::vector<bool> select_variants(const std::string& filter, const std::vector<V>& variants) {
    std::vector<std::string> names;  // the whole names asked for, if any
    if (filter.find(',') != std::string::npos) {
        for (size_t b = 0; b <= filter.size();) {
            const size_t e = std::min(filter.find(',', b), filter.size());
            names.push_back(filter.substr(b, e - b));
            b = e + 1;
        }
    } else {
        for (const auto& v : variants)
            if (v.name == filter) names.push_back(filter);
    }
    const bool exact = !names.empty();
    std::vector<bool> chosen;
    for (const auto& v : variants)
        chosen.push_back(exact ? std::find(names.begin(), names.end(), v.name) != names.end()
                               : v.name.find(filter) != std::string::npos);
    return chosen;
}

#include "kbench_probe.cuh"

int main(int argc, char** argv) {
    // kbench [variant filter] [modes, e.g. 01] [batch seq]: one case only when batch and seq are given.
    const char* filter = argc > 1 ? argv[1] : "";
    const char* mode_arg = argc > 2 ? argv[2] : "01234";
    const int only_batch = argc > 4 ? atoi(argv[3]) : 0, only_seq = argc > 4 ? atoi(argv[4]) : 0;
    Device dev;
    CK(cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, 0));
    const size_t pool_elems = (size_t)PAGES * 2 * KVH * BLK * HD;
    // KBENCH_ALLOC=async: the pools from the stream-ordered allocator (cudaMallocAsync), as
    // decodebench allocates them (cudarc's stream.alloc), instead of cudaMalloc.
    if (getenv("KBENCH_ALLOC") && std::string(getenv("KBENCH_ALLOC")) == "async") {
        CK(cudaMallocAsync((void**)&dev.kv_bf16, pool_elems * 2, 0));
        CK(cudaMallocAsync((void**)&dev.kv_fp8, pool_elems, 0));
        CK(cudaStreamSynchronize(0));
        fprintf(stderr, "KBENCH_ALLOC=async: pools from cudaMallocAsync\n");
    } else {
        CK(cudaMalloc(&dev.kv_bf16, pool_elems * 2));
        CK(cudaMalloc(&dev.kv_fp8, pool_elems));
    }
    // KBENCH_L2_PERSIST=bytes: an L2 set-aside for persisting accesses (the context's limit), with
    // KBENCH_PARTIAL_EVICT_LAST=1 (call 122: the same times with and without one).
    if (const char* env = getenv("KBENCH_L2_PERSIST")) {
        CK(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, (size_t)atoll(env)));
        size_t got = 0;
        CK(cudaDeviceGetLimit(&got, cudaLimitPersistingL2CacheSize));
        fprintf(stderr, "KBENCH_L2_PERSIST: set-aside %zu bytes\n", got);
    }
    const size_t q_elems = (size_t)256 * QO * HD;
    CK(cudaMalloc(&dev.q_bf16, q_elems * 2));
    CK(cudaMalloc(&dev.q_fp8, q_elems));
    generate_kv_bf16<<<4096, 256>>>(dev.kv_bf16, pool_elems, 7, 1, 0, KVH, BLK, HD);
    generate_kv_fp8<<<4096, 256>>>(dev.kv_fp8, pool_elems, 7, 1, 0, KVH, BLK, HD, 0.5f, 0.5f);
    generate_q_bf16<<<1024, 256>>>(dev.q_bf16, q_elems, 7, 2, 1.0f);
    generate_q_fp8<<<1024, 256>>>(dev.q_fp8, q_elems, 7, 2, 0.5f);
    // KBENCH_ZERO_POOL=1: an all-zero cache instead (whether the data's bit patterns change the
    // timing, e.g. through power; the outputs are then not checked against anything meaningful).
    if (getenv("KBENCH_ZERO_POOL")) {
        CK(cudaMemset(dev.kv_bf16, 0, pool_elems * 2));
        CK(cudaMemset(dev.kv_fp8, 0, pool_elems));
    }
    CK(cudaDeviceSynchronize());

    // The production configuration in both launch orders (decodebench times both on each case
    // and keeps the faster), then alternatives.
    std::vector<Variant> variants;
    // Adds a variant and returns it, for the knobs that differ from production.
    auto add = [&](const char* name, std::function<Kernel(int)> get, int order) -> Variant& {
        Variant v{name, get};
        v.order = order;
        variants.push_back(v);
        return variants.back();
    };
    // The previous kernel in both launch orders (decodebench times both on each case and keeps
    // the faster), then the current one.
#ifdef KBENCH_HAVE_PREV
    // (The previous kernel predates DB_DIRECT_ITEM: its plans flag nothing, and the merge covers
    // every sequence.)
    add("prev_lf", tc<4, 1, 2, 4, true>, 1).direct_items = false;
    add("prev_hm", tc<4, 1, 2, 4, true>, 2).direct_items = false;
    // Kernels before run 59 read their inputs without waiting for the kernel before them, so they
    // are launched after its completion; KBENCH_PREV_PDL=1 launches a later one as production does.
    for (Variant& v : variants) v.pdl_decode = getenv("KBENCH_PREV_PDL") != nullptr;
#endif
    add("cur_lf", tc<4, 1, 2, 4>, 1);
    add("cur_hm", tc<4, 1, 2, 4>, 2);
    // Each decode kernel launched after the previous kernel's completion, as before run 59.
    add("nopdl_lf", tc<4, 1, 2, 4>, 1).pdl_decode = false;
    // What the merge costs (bf16 output only; the output is wrong, so diffB counts it).
    add("nomerge_lf", tc<4, 1, 2, 4>, 1).merge = false;
    // Planner constants (production: minimum chunk 128 tokens, per-CTA cost 192).
    add("cur_lf_ov96", tc<4, 1, 2, 4>, 1).overhead = 96;
    add("cur_lf_ov384", tc<4, 1, 2, 4>, 1).overhead = 384;
    // Every sequence through the merge, as before DB_DIRECT_ITEM.
    add("cur_lf_nodi", tc<4, 1, 2, 4>, 1).direct_items = false;
    add("cur_hm_nodi", tc<4, 1, 2, 4>, 2).direct_items = false;
    // FP8-query modes with no direct items through the decode kernel compiled for BF16 / FP8
    // output (it writes partials only; the merge writes the mode's output).
    add("dk16_lf_nodi", tc_dec<OUT_BF16, 4, 1, 2, 4>, 1).direct_items = false;
    add("dk8_lf_nodi", tc_dec<OUT_FP8, 4, 1, 2, 4>, 1).direct_items = false;
    add("dk16_hm_nodi", tc_dec<OUT_BF16, 4, 1, 2, 4>, 2).direct_items = false;
    // The NVFP4 merge in a BF16- or FP8-output mode: whether NVFP4's extra time (NOTES run 78)
    // comes with its merge kernel alone (a timing diagnostic; the output is wrong).
    add("cur_lf_mnv", tc<4, 1, 2, 4>, 1).merge_nvfp4 = true;
    // The fused merge wherever a sequence has at most 8 splits (production) or 64.
    add("cur_lf_fm8", tc<4, 1, 2, 4>, 1).fused_max = 8;
    add("cur_hm_fm8", tc<4, 1, 2, 4>, 2).fused_max = 8;
    add("cur_lf_fm64", tc<4, 1, 2, 4>, 1).fused_max = 64;
    // The merge in 8-warp CTAs (before run 46: placed beside fewer decode CTAs).
    add("cur_lf_m8", tc<4, 1, 2, 4>, 1).merge_cta_warps = 8;
    add("s2_lf_m8", tc<4, 1, 2, 2>, 1).merge_cta_warps = 8;
    // The merge in CTAs of as few warps as a row needs (1 or 2 at up to 8 or 16 splits): rows of
    // one warp, no shared-memory exchange or barrier before the conversion (NOTES run 81).
    add("cur_lf_m1", tc<4, 1, 2, 4>, 1).merge_cta_warps = 1;
    add("cur_hm_m1", tc<4, 1, 2, 4>, 2).merge_cta_warps = 1;
    add("cur_lf_m2", tc<4, 1, 2, 4>, 1).merge_cta_warps = 2;
    add("cur_lf_nodi_m1", tc<4, 1, 2, 4>, 1).merge_cta_warps = 1;
    variants.back().direct_items = false;
    add("cur_lf_df_m1", tc<4, 1, 2, 4>, 3).merge_cta_warps = 1;
    add("cur_lf_df", tc<4, 1, 2, 4>, 3);
    add("s2_nomerge", tc<4, 1, 2, 2>, 1).merge = false;
    add("cur_lf_c64", tc<4, 1, 2, 4>, 1).min_chunk = 64;
    add("cur_lf_c256", tc<4, 1, 2, 4>, 1).min_chunk = 256;
    add("cur_lf_c1024", tc<4, 1, 2, 4>, 1).min_chunk = 1024;
    // Fewer e4m3 stages, more CTAs per SM (3 stages: 4 CTAs/SM on an H100/H200; 2: 5, by registers).
    add("s3_lf", tc<4, 1, 2, 3>, 1);
    add("s3_hm", tc<4, 1, 2, 3>, 2);
    add("s2_lf", tc<4, 1, 2, 2>, 1);
    // Two warps of two 16-token tiles each: same stage (64 tokens) and shared memory, half the warps.
    add("w2t2_lf", tc<2, 2, 2, 4>, 1);
    add("w2t2_hm", tc<2, 2, 2, 4>, 2);
    // KBENCH_REVERSE=1: the variants in the opposite order (each cell runs them back to back, and
    // at the H200's power cap a later one can run at lower clocks: an A/B is read both ways).
    if (getenv("KBENCH_REVERSE")) std::reverse(variants.begin(), variants.end());
    const bool abba = getenv("KBENCH_ABBA") != nullptr;
    std::vector<int> modes;
    for (const char* m = mode_arg; *m; ++m)
        if (*m >= '0' && *m <= '4') modes.push_back(*m - '0');
    if (std::string(filter) == "probe") {
        run_probes(dev, variants, modes);
        return 0;
    }
    const std::vector<bool> chosen = select_variants(filter, variants);
    const size_t n_selected = std::count(chosen.begin(), chosen.end(), true);
    fprintf(stderr, "kbench: %zu of %zu variants selected by \"%s\"\n", n_selected, variants.size(), filter);
    if (n_selected == 0) {
        fprintf(stderr, "kbench: no variant matches; see the add(...) list in main for the names\n");
        return 2;
    }
    printf("%-16s %-14s %5s %7s", "variant", "mode", "batch", "seq");
    printf(" %9s %6s %7s %8s %6s %s\n", "ms", "TB/s", "FI_x", "maxerr", "diffB", "plan");
    std::vector<std::vector<double>> logs(variants.size() * 5);
    for (int mode : modes) {
        for (int bi = 0; bi < 5; ++bi)
            for (int si = 0; si < 5; ++si) {
                const int batch = BATCHES[bi], seq = SEQS[si];
                if (only_batch && (batch != only_batch || seq != only_seq)) continue;
                CaseBufs c = make_case(batch, seq, 1000 + bi * 10 + si);
                std::vector<float> ref;
                if (MODES[mode].out == OUT_BF16 && batch <= 16 && !only_batch) ref = reference(dev, c, mode);
                std::vector<size_t> sel;  // this cell's variants, in run order
                for (size_t vi = 0; vi < variants.size(); ++vi)
                    if (chosen[vi] && (variants[vi].merge || MODES[mode].out == OUT_BF16))
                        sel.push_back(vi);
                std::vector<Run> runs(variants.size());
                for (size_t vi : sel) runs[vi] = run_variant(dev, c, mode, variants[vi], 20);
                // KBENCH_ABBA=1: the cell's variants again in the opposite order, each keeping the
                // faster of its two times, so that no variant always runs last (NOTES run 54).
                if (abba)
                    for (auto it = sel.rbegin(); it != sel.rend(); ++it)
                        runs[*it].ms = std::min(runs[*it].ms, run_variant(dev, c, mode, variants[*it], 20).ms);
                std::vector<u8> base_out;
                for (size_t vi : sel) {
                    const Variant& v = variants[vi];
                    const Run& r = runs[vi];
                    double maxerr = -1, refmax = 0;
                    if (!ref.empty()) {
                        const u16* o = (const u16*)r.out.data();
                        double e = 0;
                        for (size_t i = 0; i < ref.size(); ++i) {
                            refmax = std::max(refmax, (double)fabsf(ref[i]));
                            double x = bf16f(o[i]);
                            e = std::isnan(x) ? 1e30 : std::max(e, fabs(x - ref[i]));
                        }
                        maxerr = e / std::max(refmax, 1e-30);
                    }
                    if (base_out.empty()) base_out = r.out;  // diffB: against the first variant run
                    size_t diff = 0;
                    for (size_t i = 0; i < r.out.size(); ++i) diff += r.out[i] != base_out[i];
                    double tbs = c.bytes[MODES[mode].kf] / (r.ms * 1e-3) / 1e12;
                    double fi = FLASHINFER[MODES[mode].kf ? 1 : 0][bi][si] / r.ms;
                    logs[vi * 5 + mode].push_back(fi);
                    printf("%-16s %-14s %5d %7d %9.5f %6.2f %7.3f %8.1e %6zu items=%zu cta/sm=%d\n", v.name.c_str(),
                           MODES[mode].name, batch, seq, r.ms, tbs, fi, maxerr, diff, r.items, r.ctas_per_sm);
                    fflush(stdout);
                }
                cudaFree(c.d_tables);
                cudaFree(c.d_lens);
            }
    }
    printf("\ngeomean FlashInfer/ours (FP8-Q modes against the FP8-KV FlashInfer figures)\n");
    for (size_t vi = 0; vi < variants.size(); ++vi) {
        printf("%-16s", variants[vi].name.c_str());
        for (int mode : modes) {
            auto& l = logs[vi * 5 + mode];
            if (l.empty()) continue;
            double s = 0, mn = 1e9;
            for (double x : l) s += log(x), mn = std::min(mn, x);
            printf("  %s %.3f (min %.2f)", MODES[mode].name, exp(s / l.size()), mn);
        }
        printf("\n");
    }
    return 0;
}
