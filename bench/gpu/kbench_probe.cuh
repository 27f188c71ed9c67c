// Read-rate probes for kbench (`kbench probe [modes]`): what the card delivers for the decode
// kernel's own access pattern, with nothing else in the way. For the long, small-batch cells
// (target 4) they separate the decode kernel's time into what any kernel reading those pages
// pays (the gather of 4 KB page slices through the block table, the ramp and the tail of one
// wave) and what the attention adds (MMA, softmax, epilogue, merge).
//
// - probe_gather: the decode kernel's grid and work list (one CTA per chunk and kv head), each
//   CTA reading its chunk's K and V page slices with 16-byte loads into registers, U pages in
//   flight per CTA (U x 8 KB for bf16, the decode kernel's 2 stages of 4 pages are 64 KB).
// - probe_stream: the same bytes, contiguous, over the same number of CTAs.
// - an empty kernel: the per-launch floor of a graph of 10 launches.
//
// Included by kbench.cu after its cases, plans and timing helpers.

// A CTA of 128 threads reading vecs 16-byte vectors from base, 8 loads in flight per thread,
// folded into acc (so the loads are kept): the probes' contiguous reads.
__device__ __forceinline__ void fold_read(const uint4* base, i64 vecs, uint4& acc) {
    for (i64 i = threadIdx.x; i < vecs; i += 128 * 8) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = i + u * 128 < vecs ? __ldcg(base + i + u * 128) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < 8; ++u) acc.x ^= v[u].x, acc.y ^= v[u].y, acc.z ^= v[u].z, acc.w ^= v[u].w;
    }
}

template <int U, bool KF>
__global__ void __launch_bounds__(128) probe_gather(AttnParams p, u32* sink) {
    const int4 w = p.work[blockIdx.x];
    const int kv_head = (w.w & ~DB_DIRECT_ITEM) % p.num_kv_heads;
    constexpr int ELEM = KF ? 1 : 2;
    constexpr int SLICE_VECS = 16 * 128 * ELEM / 16;  // one kv head's K (or V) slice of a page
    constexpr int PER_THREAD = 2 * SLICE_VECS / 128;  // K and V, over 128 threads
    const char* kv = (const char*)p.kv;
    const int* table = p.block_tables + (i64)w.x * p.max_blocks;
    const int first = w.y >> 4, last = (w.z + 15) >> 4;
    uint4 acc = make_uint4(0, 0, 0, 0);
    for (int pg = first; pg < last; pg += U) {
        uint4 v[U][PER_THREAD];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (pg + u < last) {
                const i64 page = table[pg + u];
                const char* k = kv + (page * p.page_stride + (i64)kv_head * p.head_stride) * ELEM;
#pragma unroll
                for (int j = 0; j < PER_THREAD; ++j) {
                    const int vec = j * 128 + threadIdx.x;  // K slice, then V slice
                    const char* src = vec < SLICE_VECS ? k + (i64)vec * 16
                                                       : k + p.half_stride * ELEM + (i64)(vec - SLICE_VECS) * 16;
                    v[u][j] = __ldcg((const uint4*)src);
                }
            } else {
#pragma unroll
                for (int j = 0; j < PER_THREAD; ++j) v[u][j] = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int j = 0; j < PER_THREAD; ++j)
                acc.x ^= v[u][j].x, acc.y ^= v[u][j].y, acc.z ^= v[u][j].z, acc.w ^= v[u][j].w;
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) sink[threadIdx.x] = acc.x;  // keeps the loads
}

// The same bytes as probe_gather, but each CTA reads whole pages (every kv head's K and V slices,
// two contiguous halves) of an eighth of its item's pages: what reading a page all at once, as a
// CTA that served every kv head would, gains over eight CTAs reading 4 KB slices of it.
template <bool KF>
__global__ void __launch_bounds__(128) probe_gather_pages(AttnParams p, u32* sink) {
    const int4 w = p.work[blockIdx.x];
    const int part = (w.w & ~DB_DIRECT_ITEM) % p.num_kv_heads, parts = p.num_kv_heads;
    constexpr int ELEM = KF ? 1 : 2;
    const int half_vecs = (int)(p.half_stride * ELEM / 16);
    const char* kv = (const char*)p.kv;
    const int* table = p.block_tables + (i64)w.x * p.max_blocks;
    const int first = w.y >> 4, last = (w.z + 15) >> 4;
    const int per = (last - first + parts - 1) / parts;
    const int lo = first + part * per, hi = min(last, lo + per);
    uint4 acc = make_uint4(0, 0, 0, 0);
    for (int pg = lo; pg < hi; ++pg) {
        fold_read((const uint4*)(kv + (i64)table[pg] * p.page_stride * ELEM), 2 * half_vecs, acc);
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) sink[threadIdx.x] = acc.x;
}

// Whole pages (every kv head's K and V: one contiguous page_bytes block) from a flat list of the
// batch's pages, in claims of CLAIM consecutive entries. DYN: claimed from a global counter (the
// next claim taken while the current one loads), so that CTAs that read faster take more and
// the wave ends together; otherwise CTA c takes claims c, c + grid, .. (the same code, balanced
// statically). What balancing by claims would gain over static chunks if a CTA served every kv
// head of a page (target 4: equal chunks end 2.9 us apart at b1 s65536, bench/gpu/NOTES.md).
// ctr[0] (next claim) and ctr[1] (CTAs done) are reset by the last CTA to finish.
template <bool DYN, int CLAIM>
__global__ void __launch_bounds__(128) probe_gather_claims(const char* kv, i64 page_bytes, const int* pages, int n,
                                                           u32* ctr, u32* sink) {
    __shared__ int s_next;
    const int vecs = (int)(page_bytes / 16), claims = (n + CLAIM - 1) / CLAIM;
    uint4 acc = make_uint4(0, 0, 0, 0);
    if (DYN && threadIdx.x == 0) s_next = (int)atomicAdd(&ctr[0], 1u);
    __syncthreads();
    int cur = DYN ? s_next : (int)blockIdx.x;
    while (cur < claims) {
        __syncthreads();  // every thread has read s_next
        if (DYN && threadIdx.x == 0) s_next = (int)atomicAdd(&ctr[0], 1u);
        for (int c = cur * CLAIM; c < min(cur * CLAIM + CLAIM, n); ++c) {
            fold_read((const uint4*)(kv + (i64)pages[c] * page_bytes), vecs, acc);
        }
        __syncthreads();
        cur = DYN ? s_next : cur + (int)gridDim.x;
    }
    if (DYN && threadIdx.x == 0 && atomicAdd(&ctr[1], 1u) == gridDim.x - 1) ctr[0] = ctr[1] = 0u;
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) sink[threadIdx.x] = acc.x;
}

__global__ void __launch_bounds__(128) probe_stream(const uint4* buf, i64 vecs_per_cta, u32* sink) {
    const uint4* base = buf + (i64)blockIdx.x * vecs_per_cta;
    uint4 acc = make_uint4(0, 0, 0, 0);
    fold_read(base, vecs_per_cta, acc);
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) sink[threadIdx.x] = acc.x;
}

__global__ void probe_empty() {}

// Median ms per launch of `launch` in kbench's graph timing (time_graph in kbench.cu).
static double probe_ms(cudaStream_t s, const std::function<void()>& launch) {
    GraphTiming g = time_graph(s, launch, 50);
    CK(cudaGraphExecDestroy(g.exec));
    CK(cudaGraphDestroy(g.graph));
    return g.ms;
}

// `kbench probe [modes]`: the long small-batch cells, the production decode (with and without
// its merge) beside the probes, all in one process.
static void run_probes(const Device& dev, const std::vector<Variant>& variants, const std::vector<int>& modes) {
    u32* sink;
    CK(cudaMalloc(&sink, 128 * 4));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    printf("%-26s %-14s %5s %7s %9s %6s %s\n", "probe", "mode", "batch", "seq", "ms", "TB/s", "grid");
    const double empty = probe_ms(s, [&] { probe_empty<<<1, 32, 0, s>>>(); });
    printf("%-26s %-14s %5s %7s %9.4f\n", "empty kernel", "-", "-", "-", empty);
    printf("(decode kernel rows: logical bytes incl. q/o; probes: the K/V bytes they read)\n");
    const int cells[][2] = {{1, 16384}, {1, 65536}, {1, 131072}, {4, 65536}, {4, 131072}, {16, 16384}};
    for (int mode : modes) {
        if (mode > 1) continue;  // the read pattern depends only on the cache dtype
        const bool kf = MODES[mode].kf;
        for (auto& cell : cells) {
            const int bi = cell[0] == 1 ? 0 : cell[0] == 4 ? 1 : 2;
            const int si = cell[1] == 16384 ? 2 : cell[1] == 65536 ? 3 : 4;
            CaseBufs c = make_case(cell[0], cell[1], 1000 + bi * 10 + si);
            const double kv_bytes = c.bytes[kf] - (double)c.lens.size() * QO * HD * 4;
            auto row = [&](const std::string& name, double ms, size_t grid, double bytes) {
                printf("%-26s %-14s %5d %7d %9.4f %6.2f %zu\n", name.c_str(), MODES[mode].name, cell[0], cell[1], ms,
                       bytes / (ms * 1e-3) / 1e12, grid);
                fflush(stdout);
            };
            for (const Variant& v : variants)
                if (v.name == "cur_lf" || v.name == "nomerge_lf" || v.name == "s2_lf" || v.name == "s2_nomerge") {
                    if (kf == false && v.name.rfind("s2", 0) == 0) continue;  // bf16 has 2 stages already
                    Run r = run_variant(dev, c, mode, v, 20);
                    row(v.name + " (decode kernel)", r.ms, r.items * KVH, c.bytes[kf]);
                }
            // The decode kernel's plan at its occupancy (bf16 2 stages: 3 CTAs/SM; e4m3 4 stages: 3).
            const Variant production;  // the planner's constants as the variants use them
            const int stage = tc<4, 1, 2, 4>(mode).stage_tokens;
            for (int per_sm : {3, 6}) {
                Plan pl = plan(c.lens, KVH, (long)dev.sms * per_sm, stage, production.min_chunk, production.overhead, 1,
                               production.direct_items);
                AttnParams p = base_params(dev, c, mode);
                int4* d_work;
                CK(cudaMalloc(&d_work, pl.launch.size() * sizeof(int4)));
                CK(cudaMemcpy(d_work, pl.launch.data(), pl.launch.size() * sizeof(int4), cudaMemcpyHostToDevice));
                p.work = d_work;
                const unsigned grid = (unsigned)pl.launch.size();
                auto gather = [&](auto kernel, const char* name) {
                    const double ms = probe_ms(s, [&] { kernel<<<grid, 128, 0, s>>>(p, sink); });
                    row(std::string(name) + " plan/" + std::to_string(per_sm), ms, grid, kv_bytes);
                };
                if (kf) {
                    gather(probe_gather_pages<true>, "gather whole pages");
                    gather(probe_gather<4, true>, "gather U4");
                    gather(probe_gather<8, true>, "gather U8");
                    gather(probe_gather<16, true>, "gather U16");
                } else {
                    gather(probe_gather_pages<false>, "gather whole pages");
                    gather(probe_gather<2, false>, "gather U2");
                    gather(probe_gather<4, false>, "gather U4");
                    gather(probe_gather<8, false>, "gather U8");
                }
                cudaFree(d_work);
            }
            // Whole pages in claims, static against dynamic, over 3 and 6 CTAs per SM.
            {
                std::vector<int> table((size_t)c.lens.size() * c.max_blocks), flat;
                CK(cudaMemcpy(table.data(), c.d_tables, table.size() * 4, cudaMemcpyDeviceToHost));
                for (size_t b = 0; b < c.lens.size(); ++b)
                    for (int j = 0; j < (c.lens[b] + BLK - 1) / BLK; ++j) flat.push_back(table[b * c.max_blocks + j]);
                int* d_pages;
                u32* ctr;
                CK(cudaMalloc(&d_pages, flat.size() * 4));
                CK(cudaMemcpy(d_pages, flat.data(), flat.size() * 4, cudaMemcpyHostToDevice));
                CK(cudaMalloc(&ctr, 8));
                CK(cudaMemset(ctr, 0, 8));
                const char* kvp = (const char*)(kf ? (const void*)dev.kv_fp8 : (const void*)dev.kv_bf16);
                const i64 page_bytes = (i64)2 * KVH * BLK * HD * (kf ? 1 : 2);
                const int n = (int)flat.size();
                for (int per_sm : {3, 6}) {
                    const unsigned grid = (unsigned)dev.sms * per_sm;
                    auto claims = [&](auto kernel, const std::string& name) {
                        const double ms = probe_ms(s, [&] { kernel<<<grid, 128, 0, s>>>(kvp, page_bytes, d_pages, n, ctr, sink); });
                        row(name + " x" + std::to_string(per_sm), ms, grid, (double)n * page_bytes);
                    };
                    claims(probe_gather_claims<false, 1>, "pages static 1");
                    claims(probe_gather_claims<true, 1>, "pages dynamic 1");
                    claims(probe_gather_claims<true, 2>, "pages dynamic 2");
                    claims(probe_gather_claims<true, 4>, "pages dynamic 4");
                }
                cudaFree(d_pages);
                cudaFree(ctr);
            }
            // The same bytes, contiguous, from the start of the pool (where they fit in it).
            const double pool_bytes = (double)PAGES * 2 * KVH * BLK * HD * (kf ? 1 : 2);
            for (unsigned grid : {(unsigned)dev.sms * 3, (unsigned)dev.sms * 12}) {
                if (kv_bytes > pool_bytes) break;
                const i64 vecs = (i64)(kv_bytes / 16) / grid;
                const uint4* buf = (const uint4*)(kf ? (const void*)dev.kv_fp8 : (const void*)dev.kv_bf16);
                const double ms = probe_ms(s, [&] { probe_stream<<<grid, 128, 0, s>>>(buf, vecs, sink); });
                row("stream", ms, grid, (double)vecs * grid * 16);
            }
            cudaFree(c.d_tables);
            cudaFree(c.d_lens);
        }
    }
    CK(cudaStreamDestroy(s));
    cudaFree(sink);
}
