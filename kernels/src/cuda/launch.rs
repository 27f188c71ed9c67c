//! Launch wrappers: the parameter block the kernels share, kernel names, launch geometry, and one
//! function per kernel family. Every `unsafe` launch says why its arguments are valid.

use super::device::DeviceSession;
use super::plan::WorkItem;
use super::CudaError;
use crate::workload::{BenchCase, Dtype, KvLayout};
use cudarc::driver::sys;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// Tokens each tz slice handles per pipeline stage (`DEC_TILE` in decode.cu).
pub(crate) const DECODE_TILE_TOKENS: u32 = 4;
/// Pipeline depth of the optimized kernel (`DEC_STAGES` in decode.cu).
pub(crate) const DECODE_STAGES: u32 = 3;
/// Threads the optimized kernel aims for per CTA: four warps keep enough CTAs per SM to hide
/// latency while the group and head dimension set the rest of the shape.
const DECODE_TARGET_THREADS: u32 = 128;
/// `__launch_bounds__` of the optimized kernel.
pub(crate) const DECODE_MAX_THREADS: u32 = 512;
/// Tensor-core kernel (decode_mma.cu): threads, tokens per stage, pipeline depths per cache dtype,
/// largest group, head sizes (`MMA_THREADS`, `MMA_STAGE_TOKENS`, `MMA_STAGES_*`, `MMA_MAX_GROUP`
/// there). Every e4m3 depth is compiled, and the backend times them on each case: fewer stages
/// fit more CTAs per SM (short CTAs), more keep more bytes in flight per CTA (long ones).
pub(crate) const MMA_THREADS: u32 = 128;
pub(crate) const MMA_STAGE_TOKENS: u32 = 64;
pub(crate) const MMA_STAGES_BF16: [u32; 2] = [2, 3];
pub(crate) const MMA_STAGES_FP8: [u32; 3] = [2, 3, 4];
pub(crate) const MMA_MAX_GROUP: u32 = 16;
pub(crate) const MMA_HEAD_SIZES: [u32; 2] = [64, 128];
/// Compute capability the tensor-core kernel needs (bf16 `mma.sync`, `ldmatrix`, `cp.async`).
pub(crate) const MMA_MIN_COMPUTE_MAJOR: i32 = 8;
/// Dynamic shared memory a CTA gets without opting in.
const DEFAULT_SMEM_LIMIT_BYTES: u32 = 48 * 1024;
/// Threads of the baseline kernel (`BASE_WARPS * 32` in baseline.cu).
pub(crate) const BASELINE_THREADS: u32 = 128;
/// Threads of the reference kernel (`REF_THREADS` in reference.cu).
pub(crate) const REFERENCE_THREADS: u32 = 256;
/// Warps of one merge CTA at most (`MERGE_MAX_WARPS` in decode.cu), and partial rows each warp
/// loads at once (`MERGE_UNROLL` in common.cuh).
pub(crate) const MERGE_WARPS: u32 = 8;
const MERGE_UNROLL: u32 = 8;
/// Warps of a merge CTA whose rows need no more than this many each (see [`merge_block`]).
const MERGE_SMALL_CTA_WARPS: u32 = 4;

/// Longest split list the tensor-core kernel may merge itself (`merge_group_if_last` in
/// common.cuh) rather than the merge kernel. The fused merge finishes each (sequence, kv head) as
/// soon as its own splits are written, without a second kernel and its wait for the whole grid;
/// but one CTA then reads all the group's partial rows (G x splits x head x 4 bytes), where the
/// merge kernel spreads them over many CTAs: with 32 splits it was 1.6x slower at b=1 s=4096 on
/// an H200, and with up to 8 it won or lost by a few percent depending on the case
/// (bench/gpu/NOTES.md, run 32). So up to this many the backend times both on the case.
pub(crate) const FUSED_MERGE_MAX_SPLITS: usize = 8;

/// Block shape of the merge kernel, (32 x warps per row, rows per CTA), for a plan whose longest
/// split list has `max_splits` items and `rows` output rows (qo heads x sequences) on `sm_count`
/// SMs. Enough warps per qo head that its splits take one round of loads (up to 8), and the rest
/// of the CTA's warps on further qo heads of the sequence (a CTA per qo head left 3 of 4 warps
/// idle on short lists and made 4096 CTAs at b=64) - but not fewer CTAs than SMs, since each CTA
/// also converts its rows (eight rows per CTA left 8 CTAs to quantize all of b=1's NVFP4 output).
///
/// A CTA has 4 warps unless a row needs 8. The merge is launched while the decode kernel runs
/// (PDL) and its CTAs wait for it where they are placed; a decode kernel at 3 CTAs per SM leaves
/// 16 K of the SM's 64 K registers, room for one 8-warp merge CTA (64 registers a thread) or two of
/// 4 warps, and at 4 or 5 CTAs per SM less. CTAs that do not fit are placed only as decode CTAs
/// leave. With 4-warp CTAs the merge after the decode grid took 8 % less at b4 s4096 (21.5 ->
/// 19.7 us), 7 % at b4 s16384, 10 % for FP8 b4 s4096 (bench/gpu/NOTES.md run 46); at b1 a row of
/// 33-64 splits keeps its 8 warps (with 4 it takes two rounds of loads: b1 s16384 +3.5 %).
pub(crate) fn merge_block(max_splits: usize, rows: u32, sm_count: u32) -> (u32, u32) {
    let needed = merge_row_warps(max_splits);
    let cta_warps = needed.max(MERGE_SMALL_CTA_WARPS);
    let mut per_cta = cta_warps / needed;
    while per_cta > 1 && rows.div_ceil(per_cta) < sm_count {
        per_cta /= 2;
    }
    (32 * (cta_warps / per_cta), per_cta)
}

/// Warps a row of `max_splits` partials needs so that each loads its share in one round (a
/// power of two, at most a CTA's [`MERGE_WARPS`]).
fn merge_row_warps(max_splits: usize) -> u32 {
    let rounds = (max_splits.max(1) as u32).div_ceil(MERGE_UNROLL);
    rounds.next_power_of_two().min(MERGE_WARPS)
}

/// How the merge kernel's CTAs take their rows. The backend times both where they differ
/// ([`merge_rows_alternative`]) and keeps the faster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MergeRows {
    /// [`merge_block`]'s shape: a row's splits spread over warps (one round of loads each), and a
    /// row over the CTA's 4 warps where that leaves too few CTAs for the SMs.
    Spread,
    /// One row per CTA, with only the warps its list needs ([`merge_row_warps`]: one for up to 8
    /// splits, two for up to 16), where `Spread` gives a row more. With one warp the row is folded
    /// and converted in that warp's registers, with no shared-memory exchange or barrier in front
    /// of the conversion. In kbench at b4 s1024 (4 warps on each row under `Spread`) one warp was
    /// 2-5 % faster in every mode, NVFP4 most; at b16-b64, where `Spread` already gives a row one
    /// warp and puts 4 rows in a CTA, CTAs of one row were 2-8 % slower, so it is not offered
    /// there (bench/gpu/NOTES.md run 82). Two warps on a row of 9-16 splits (kbench's b4 s4096,
    /// 4 warps under `Spread`) were 7-9 % faster for FP8 output, within 1 % for BF16 output and
    /// 2-5 % slower for NVFP4, in three runs (run 89), so it is a timed choice too.
    Narrow,
}

/// The merge kernel's block (32 x warps per row, rows per CTA) in `shape`; see [`merge_block`].
pub(crate) fn merge_block_for(
    shape: MergeRows,
    max_splits: usize,
    rows: u32,
    sm_count: u32,
) -> (u32, u32) {
    match shape {
        MergeRows::Spread => merge_block(max_splits, rows, sm_count),
        MergeRows::Narrow => (32 * merge_row_warps(max_splits), 1),
    }
}

/// Whether [`MergeRows::Narrow`] is a different launch from [`MergeRows::Spread`] worth timing:
/// `Spread` puts more warps on a row than its list needs.
pub(crate) fn merge_rows_alternative(max_splits: usize, rows: u32, sm_count: u32) -> bool {
    merge_block(max_splits, rows, sm_count).0 > 32 * merge_row_warps(max_splits)
}

/// Compute capability from which the merge is launched as a programmatic dependent of the decode
/// kernel (PDL, `griddepcontrol` in the kernels): its CTAs start while the decode kernel's last
/// ones run, which hides most of a second launch (on an H200, b=1 s=4096: 9 % of the call).
const PDL_MIN_COMPUTE_MAJOR: i32 = 9;
/// Threads per block of the element-wise kernels (generation, dequantization).
const ELEMENTWISE_THREADS: u32 = 256;
/// Blocks per SM of the grid-stride element-wise kernels: enough to saturate memory.
const ELEMENTWISE_BLOCKS_PER_SM: u32 = 16;
/// Head sizes with compiled kernels.
pub(crate) const SUPPORTED_HEAD_SIZES: [u32; 3] = [64, 128, 256];

/// Parameters of every attention kernel; must match `struct AttnParams` in common.cuh field for
/// field (8-byte fields first, so neither side pads between fields; both round the size up to 8
/// bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AttnParams {
    pub q: u64,
    pub kv: u64,
    pub block_tables: u64,
    pub seq_lens: u64,
    pub out: u64,
    pub out_sf: u64,
    pub partial_o: u64,
    pub partial_lse: u64,
    pub work: u64,
    pub split_offsets: u64,
    /// `[batch, kv_heads]` u32 tickets of the fused merge, 0 between launches.
    pub merge_counters: u64,
    pub page_stride: i64,
    pub half_stride: i64,
    pub head_stride: i64,
    pub slot_stride: i64,
    pub batch: i32,
    pub num_qo_heads: i32,
    pub num_kv_heads: i32,
    pub head_size: i32,
    pub max_blocks: i32,
    pub block_shift: i32,
    pub group: i32,
    pub sf_cols: i32,
    pub direct: i32,
    /// 1: launch entries flagged [`super::plan::DIRECT_ITEM`] write final outputs and the merge
    /// skips their sequences.
    pub direct_items: i32,
    /// 1 (tensor-core kernel, split plans): the last CTA of each (sequence, kv head) merges its
    /// partials, and no merge kernel runs (see [`FUSED_MERGE_MAX_SPLITS`]).
    pub fused_merge: i32,
    /// The case's scales, laid out as the C struct's six floats.
    pub scales: crate::workload::Scales,
    /// 1 (tensor-core kernel, split plans): the partials are stored with an L2 evict-last policy,
    /// so that they stay in the L2 from one call to the next; 0: evict-normal. Timed on the case
    /// (backend.rs), since the lines it keeps are L2 the cache's pages then cannot use. Last, so
    /// that no earlier field moves (every kernel's code depends on their offsets).
    pub partial_evict_last: i32,
    /// Partial rows (work items) of a split plan: qo head `h`'s log-sum-exps are
    /// `partial_lse[h * lse_stride + row]`, so that a row's splits lie side by side and the merge
    /// reads them in a few sectors (one per split in the `[row, qo head]` layout before).
    pub lse_stride: i32,
}

// SAFETY: plain-old-data with the same layout as the C struct (all fields are fixed-size
// integers or floats, 8-byte ones first; `scales` is a repr(C) struct of six f32).
unsafe impl DeviceRepr for AttnParams {}
// SAFETY: four i32, the layout of CUDA's int4.
unsafe impl DeviceRepr for WorkItem {}

/// Element strides of a case's paged cache: (page, K->V half, kv head, slot).
pub(crate) fn cache_strides(case: &BenchCase) -> (i64, i64, i64, i64) {
    let (h, blk, d) = (
        case.num_kv_heads as i64,
        case.block_size as i64,
        case.head_size as i64,
    );
    let half = h * blk * d;
    match case.layout {
        KvLayout::Hnd => (2 * half, half, blk * d, d),
        KvLayout::Nhd => (2 * half, half, d, h * d),
    }
}

/// `AttnParams` for `case` with every shape and scale field set; pointers are left for the
/// caller.
pub(crate) fn case_params(case: &BenchCase) -> AttnParams {
    let scales = crate::workload::Scales::for_case(case);
    let (page, half, head, slot) = cache_strides(case);
    AttnParams {
        page_stride: page,
        half_stride: half,
        head_stride: head,
        slot_stride: slot,
        batch: case.batch_size as i32,
        num_qo_heads: case.num_qo_heads as i32,
        num_kv_heads: case.num_kv_heads as i32,
        head_size: case.head_size as i32,
        max_blocks: case.max_blocks_per_seq() as i32,
        block_shift: case.block_size.max(1).trailing_zeros() as i32,
        group: case.group_size() as i32,
        sf_cols: (case.num_qo_heads * case.head_size / 16) as i32,
        direct: 1,
        scales,
        ..Default::default()
    }
}

fn dtype_tag(d: Dtype) -> &'static str {
    d.as_str()
}

pub(crate) fn baseline_kernel_name(head: u32) -> String {
    format!("baseline_d{head}_bf16_bf16_bf16")
}

pub(crate) fn decode_kernel_name(head: u32, q: Dtype, kv: Dtype, out: Dtype) -> String {
    format!(
        "decode_d{head}_{}_{}_{}",
        dtype_tag(q),
        dtype_tag(kv),
        dtype_tag(out)
    )
}

/// Tensor-core kernels come in two widths of the head (N) dimension: groups up to 8 and up to 16.
pub(crate) const MMA_GROUP_WIDTHS: [u32; 2] = [8, 16];

pub(crate) fn decode_mma_kernel_name(
    head: u32,
    group: u32,
    q: Dtype,
    kv: Dtype,
    out: Dtype,
    stages: u32,
) -> String {
    let width = if group <= MMA_GROUP_WIDTHS[0] {
        MMA_GROUP_WIDTHS[0]
    } else {
        MMA_GROUP_WIDTHS[1]
    };
    format!(
        "decode_mma_d{head}_g{width}_{}_{}_{}_s{stages}",
        dtype_tag(q),
        dtype_tag(kv),
        dtype_tag(out)
    )
}

pub(crate) fn merge_kernel_name(head: u32, out: Dtype) -> String {
    format!("merge_d{head}_{}", dtype_tag(out))
}

/// (q, kv) input combinations with compiled optimized kernels.
pub(crate) const DECODE_INPUTS: [(Dtype, Dtype); 3] = [
    (Dtype::Bf16, Dtype::Bf16),
    (Dtype::Bf16, Dtype::Fp8),
    (Dtype::Fp8, Dtype::Fp8),
];
pub(crate) const OUTPUTS: [Dtype; 3] = [Dtype::Bf16, Dtype::Fp8, Dtype::Nvfp4];

/// Every kernel the module defines; all are looked up when a device session opens, so a missing
/// one fails at start, not in the middle of a sweep.
pub(crate) fn all_kernel_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "generate_q_bf16",
        "generate_q_fp8",
        "generate_kv_bf16",
        "generate_kv_fp8",
        "dequant_e4m3_to_bf16",
        "calibrate_stream_read",
        "reference_decode",
        "inject_fault",
        "check_conversions",
        "check_nvfp4_codes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for head in SUPPORTED_HEAD_SIZES {
        names.push(baseline_kernel_name(head));
        for (q, kv) in DECODE_INPUTS {
            for out in OUTPUTS {
                names.push(decode_kernel_name(head, q, kv, out));
            }
        }
        for out in OUTPUTS {
            names.push(merge_kernel_name(head, out));
        }
        if MMA_HEAD_SIZES.contains(&head) {
            for group in MMA_GROUP_WIDTHS {
                for (q, kv) in DECODE_INPUTS {
                    for out in OUTPUTS {
                        for &stages in mma_stage_counts(kv) {
                            names.push(decode_mma_kernel_name(head, group, q, kv, out, stages));
                        }
                    }
                }
            }
        }
    }
    names
}

/// Which implementation of the optimized kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeVariant {
    /// Tensor cores (decode_mma.cu): head 64/128, group <= 16, sm_80+.
    Mma,
    /// CUDA-core FMAs (decode.cu): every supported shape.
    Fma,
}

impl DecodeVariant {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeVariant::Mma => "mma",
            DecodeVariant::Fma => "fma",
        }
    }
}

/// Thread-block shape and shared memory of the optimized kernel for one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecodeGeometry {
    pub variant: DecodeVariant,
    pub block: (u32, u32, u32),
    pub stage_tokens: u32,
    /// Pipeline depth (stages of `stage_tokens` tokens in shared memory).
    pub stages: u32,
    pub smem_bytes: u32,
}

impl DecodeGeometry {
    pub fn threads(&self) -> u32 {
        self.block.0 * self.block.1 * self.block.2
    }
}

/// Pipeline depths the tensor-core kernel is compiled with for a cache dtype.
pub(crate) fn mma_stage_counts(kv: Dtype) -> &'static [u32] {
    if kv == Dtype::Fp8 {
        &MMA_STAGES_FP8
    } else {
        &MMA_STAGES_BF16
    }
}

/// What a device allows the optimized kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct KernelLimits {
    pub compute_major: i32,
    /// The most dynamic shared memory one CTA may opt in to.
    pub max_smem_per_block: u32,
}

/// The optimized kernel's candidates for a case, to be timed against each other: the tensor-core
/// variant at each compiled pipeline depth (only `stages`, when given) whose shared memory the
/// device allows, when the shape and the device's architecture allow it and `prefer_fma` is off
/// (3 bf16 stages of a 16-head group need 100 KiB: not on an L4 or L40S); else the FMA variant;
/// or why none fits.
pub(crate) fn choose_decode_geometries(
    head: u32,
    group: u32,
    kv: Dtype,
    limits: KernelLimits,
    prefer_fma: bool,
    stages: Option<u32>,
) -> Result<Vec<DecodeGeometry>, String> {
    if !prefer_fma && limits.compute_major >= MMA_MIN_COMPUTE_MAJOR {
        let depths = mma_stage_counts(kv);
        let mma: Vec<DecodeGeometry> = depths
            .iter()
            .filter(|&&d| stages.is_none_or(|s| s == d))
            .filter_map(|&d| mma_geometry(head, group, kv, d))
            .filter(|g| g.smem_bytes <= limits.max_smem_per_block)
            .collect();
        if !mma.is_empty() {
            return Ok(mma);
        }
        if let Some(s) = stages {
            if let Some(g) = mma_geometry(head, group, kv, s) {
                return Err(format!(
                    "the {s}-stage tensor-core kernel needs {} bytes of shared memory per CTA; \
                     this device allows {}",
                    g.smem_bytes, limits.max_smem_per_block
                ));
            }
            if mma_geometry(head, group, kv, depths[0]).is_some() {
                return Err(format!(
                    "the tensor-core kernel has no {s}-stage build for a {} cache (compiled: \
                     {depths:?})",
                    kv.as_str()
                ));
            }
        }
    }
    decode_geometry(head, group, kv).map(|g| vec![g])
}

/// Geometry of the tensor-core kernel at pipeline depth `depth`, when it supports the shape.
pub(crate) fn mma_geometry(head: u32, group: u32, kv: Dtype, depth: u32) -> Option<DecodeGeometry> {
    if !MMA_HEAD_SIZES.contains(&head) || group == 0 || group > MMA_MAX_GROUP {
        return None;
    }
    if !mma_stage_counts(kv).contains(&depth) {
        return None;
    }
    let elem = if kv == Dtype::Fp8 { 1 } else { 2 };
    let stages = depth * 2 * MMA_STAGE_TOKENS * head * elem;
    // The group's query rows, in 16-bit halves with 8 halves of padding per row, sit behind the
    // stages while the prologue builds the fragments (`QS` in decode_mma.cu).
    let query = group * (head + 8) * 2;
    let warps = MMA_THREADS / 32;
    // The warps' partial rows (padded by 4 floats, `RS` in decode_mma.cu) and their (max, sum)
    // pairs, for the epilogue (over the stages).
    let merge = 4 * group * (warps * (head + 4) + 2 * warps);
    Some(DecodeGeometry {
        variant: DecodeVariant::Mma,
        block: (MMA_THREADS, 1, 1),
        stage_tokens: MMA_STAGE_TOKENS,
        stages: depth,
        smem_bytes: (stages + query).max(merge),
    })
}

/// Geometry of the FMA kernel, or why the case does not fit it.
pub(crate) fn decode_geometry(head: u32, group: u32, kv: Dtype) -> Result<DecodeGeometry, String> {
    if !SUPPORTED_HEAD_SIZES.contains(&head) {
        return Err(format!(
            "head size {head} has no compiled kernel (supported: 64, 128, 256)"
        ));
    }
    let bdx = head / 8;
    let base = bdx * group.max(1);
    if base > DECODE_MAX_THREADS {
        return Err(format!(
            "a GQA group of {group} with head size {head} needs {base} threads per CTA, more \
             than the kernel's {DECODE_MAX_THREADS}"
        ));
    }
    let mut bdz = DECODE_TARGET_THREADS.div_ceil(base).max(1);
    while !(base * bdz).is_multiple_of(32) {
        bdz += 1;
    }
    if base * bdz > DECODE_MAX_THREADS {
        return Err(format!(
            "GQA group {group} with head size {head} cannot be shaped into whole warps within \
             {DECODE_MAX_THREADS} threads"
        ));
    }
    let elem = if kv == Dtype::Fp8 { 1 } else { 2 };
    let stage_tokens = bdz * DECODE_TILE_TOKENS;
    let stages = DECODE_STAGES * 2 * stage_tokens * head * elem;
    let reduce = 4 * (bdz * group * head + 2 * bdz * group + group * head);
    Ok(DecodeGeometry {
        variant: DecodeVariant::Fma,
        block: (bdx, group, bdz),
        stage_tokens,
        stages: DECODE_STAGES,
        smem_bytes: stages.max(reduce),
    })
}

fn missing(name: &str) -> CudaError {
    CudaError::Internal {
        context: "looking up a kernel".into(),
        message: format!("kernel {name} is not in the compiled module"),
    }
}

/// How a kernel's launch waits for the work before it in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaunchAfter {
    /// The usual stream order: starts once the previous kernel has finished.
    Completion,
    /// Programmatic dependent launch (sm_90+): may start once every CTA of the previous kernel
    /// has called `grid_dependency_launch()` or exited, and must call `grid_dependency_wait()`
    /// before reading what that kernel wrote or writing what it reads (merge_partials and
    /// decode_mma do).
    ProgrammaticStart,
}

/// Launches a kernel that takes one `AttnParams` by value.
fn launch_params(
    session: &DeviceSession,
    name: &str,
    cfg: LaunchConfig,
    params: &AttnParams,
    after: LaunchAfter,
) -> Result<(), CudaError> {
    let f = session.function(name).ok_or_else(|| missing(name))?;
    if after == LaunchAfter::Completion {
        let mut builder = session.stream.launch_builder(f);
        builder.arg(params);
        // SAFETY: every kernel launched here takes exactly one `AttnParams` by value; its
        // pointers were set by the caller to live device buffers of the sizes the case implies,
        // and the grid matches what the kernel indexes (checked by the callers' shape logic).
        unsafe { builder.launch(cfg) }.map_err(CudaError::driver(format!("launching {name}")))?;
        return Ok(());
    }
    let context = || format!("launching {name} (programmatic dependent launch)");
    session
        .ctx
        .bind_to_thread()
        .map_err(CudaError::driver(context()))?;
    // SAFETY: the attribute value is a plain C union; zeroed, then its PDL field set.
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.programmaticStreamSerializationAllowed = 1;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: session.stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut arg = *params;
    let mut args = [(&mut arg as *mut AttnParams).cast::<std::ffi::c_void>()];
    // SAFETY: as above for the kernel and its parameters; `args` points at a copy of them that
    // outlives the call (which copies it), `config` and `attr` outlive the call, and the stream
    // and function belong to the session's context, bound to this thread above.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(CudaError::driver(context()))?;
    Ok(())
}

/// The GPU reference: f32 output, one CTA per (qo head, sequence).
pub(crate) fn launch_reference(
    session: &DeviceSession,
    params: &AttnParams,
    q_fp8: bool,
    kv_fp8: bool,
) -> Result<(), CudaError> {
    let name = "reference_decode";
    let f = session.function(name).ok_or_else(|| missing(name))?;
    let cfg = LaunchConfig {
        grid_dim: (params.num_qo_heads as u32, params.batch as u32, 1),
        block_dim: (REFERENCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (qf, kf) = (q_fp8 as i32, kv_fp8 as i32);
    let mut builder = session.stream.launch_builder(f);
    builder.arg(params).arg(&qf).arg(&kf);
    // SAFETY: reference_decode(AttnParams, int, int); params point at live buffers (q, kv,
    // tables, seq lens, an f32 output of batch*qo_heads*head elements).
    unsafe { builder.launch(cfg) }.map_err(CudaError::driver("launching reference_decode"))?;
    Ok(())
}

/// The baseline: bf16 in and out, one CTA per (qo head, sequence).
pub(crate) fn launch_baseline(
    session: &DeviceSession,
    params: &AttnParams,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (params.num_qo_heads as u32, params.batch as u32, 1),
        block_dim: (BASELINE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch_params(
        session,
        &baseline_kernel_name(params.head_size as u32),
        cfg,
        params,
        LaunchAfter::Completion,
    )
}

/// The optimized kernel (and the merge when the plan splits sequences): one "call". `ctas` is the
/// length of the plan's launch list (one CTA per work item and kv head), `max_splits` its longest
/// split list, `merge_rows` the merge kernel's shape.
pub(crate) fn launch_decode(
    session: &DeviceSession,
    params: &AttnParams,
    geometry: &DecodeGeometry,
    ctas: u32,
    max_splits: usize,
    merge_rows: MergeRows,
    names: &DecodeNames,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (ctas, 1, 1),
        block_dim: geometry.block,
        shared_mem_bytes: geometry.smem_bytes,
    };
    let pdl = session.props.compute_major >= PDL_MIN_COMPUTE_MAJOR;
    // Chained calls: the tensor-core kernel as a programmatic dependent of the kernel before it
    // (in a stream of calls, the previous call's merge or decode kernel), so that its launch and
    // its plan's first read overlap that kernel's last exits and flush; it waits for that kernel
    // before reading its inputs or writing anything. A decode kernel without a merge after it
    // triggers nothing early, so the next one is placed as its CTAs exit; the merge triggers once
    // a CTA has loaded its partials, a few hundred nanoseconds before it exits (v24), so the next
    // grid's CTAs are still spread as after a plain launch (run 43 triggered at the merge's start
    // and packed a one-wave grid unevenly). 1 % geomean on an H200, 3-4 % on the 7-9 us cells
    // (bench/gpu/NOTES.md run 59), and the late trigger 1-2 % more, 3-11 % on the short split
    // cells (run 79). The FMA kernel has no such wait, so it is launched in stream order.
    let after = |programmatic: bool| {
        if programmatic {
            LaunchAfter::ProgrammaticStart
        } else {
            LaunchAfter::Completion
        }
    };
    let decode_after = after(pdl && geometry.variant == DecodeVariant::Mma);
    launch_params(session, &names.decode, cfg, params, decode_after)?;
    if params.direct == 0 && params.fused_merge == 0 {
        let (x, rows) = merge_block_for(
            merge_rows,
            max_splits,
            params.num_qo_heads as u32 * params.batch as u32,
            session.props.sm_count,
        );
        let cfg = LaunchConfig {
            grid_dim: (
                (params.num_qo_heads as u32).div_ceil(rows),
                params.batch as u32,
                1,
            ),
            block_dim: (x, rows, 1),
            shared_mem_bytes: 0,
        };
        launch_params(session, &names.merge, cfg, params, after(pdl))?;
    }
    Ok(())
}

/// Kernel names of one optimized configuration (looked up once, not per launch).
#[derive(Debug, Clone)]
pub(crate) struct DecodeNames {
    pub decode: String,
    pub merge: String,
}

impl DecodeNames {
    pub fn for_case(case: &BenchCase, geometry: &DecodeGeometry) -> DecodeNames {
        let (h, q, kv, out) = (case.head_size, case.quant.q, case.quant.kv, case.quant.out);
        DecodeNames {
            decode: match geometry.variant {
                DecodeVariant::Mma => {
                    decode_mma_kernel_name(h, case.group_size(), q, kv, out, geometry.stages)
                }
                DecodeVariant::Fma => decode_kernel_name(h, q, kv, out),
            },
            merge: merge_kernel_name(h, out),
        }
    }
}

/// Raises the kernel's dynamic shared-memory limit when the geometry needs more than the default.
pub(crate) fn prepare_decode(
    session: &DeviceSession,
    names: &DecodeNames,
    geometry: &DecodeGeometry,
) -> Result<(), CudaError> {
    if geometry.smem_bytes > DEFAULT_SMEM_LIMIT_BYTES {
        let f = session
            .function(&names.decode)
            .ok_or_else(|| missing(&names.decode))?;
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            geometry.smem_bytes as i32,
        )
        .map_err(CudaError::driver("raising the shared-memory limit"))?;
    }
    Ok(())
}

/// CTAs of the optimized kernel one SM runs at once.
pub(crate) fn decode_ctas_per_sm(
    session: &DeviceSession,
    names: &DecodeNames,
    geometry: &DecodeGeometry,
) -> Result<u32, CudaError> {
    let f = session
        .function(&names.decode)
        .ok_or_else(|| missing(&names.decode))?;
    let n = f
        .occupancy_max_active_blocks_per_multiprocessor(
            geometry.threads(),
            geometry.smem_bytes as usize,
            None,
        )
        .map_err(CudaError::driver("querying occupancy"))?;
    Ok(n.max(1))
}

/// Grid of a grid-stride element-wise kernel over `n` elements.
fn elementwise_cfg(session: &DeviceSession, n: u64) -> LaunchConfig {
    let max_blocks = session.props.sm_count * ELEMENTWISE_BLOCKS_PER_SM;
    let blocks = n
        .div_ceil(ELEMENTWISE_THREADS as u64)
        .clamp(1, max_blocks as u64) as u32;
    linear_cfg(blocks, ELEMENTWISE_THREADS)
}

/// A one-dimensional grid of `blocks` CTAs of `threads` threads, without dynamic shared memory.
fn linear_cfg(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fills `out` (n elements of `dtype`) with the query's standard-normal values.
pub(crate) fn launch_generate_q(
    session: &DeviceSession,
    out: u64,
    n: u64,
    dtype: Dtype,
    seed: u64,
    stream_salt: u64,
    scale: f32,
) -> Result<(), CudaError> {
    let name = if dtype == Dtype::Fp8 {
        "generate_q_fp8"
    } else {
        "generate_q_bf16"
    };
    let f = session.function(name).ok_or_else(|| missing(name))?;
    let mut b = session.stream.launch_builder(f);
    b.arg(&out).arg(&n).arg(&seed).arg(&stream_salt).arg(&scale);
    // SAFETY: generate_q_*(out*, u64 n, u64 seed, u64 stream, float scale); `out` holds n
    // elements of the dtype.
    unsafe { b.launch(elementwise_cfg(session, n)) }
        .map_err(CudaError::driver(format!("launching {name}")))?;
    Ok(())
}

/// Fills a KV pool (n elements) with standard-normal values in the case's layout.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_generate_kv(
    session: &DeviceSession,
    out: u64,
    n: u64,
    case: &BenchCase,
    seed: u64,
    stream_salt: u64,
    k_scale: f32,
    v_scale: f32,
) -> Result<(), CudaError> {
    let nhd = (case.layout == KvLayout::Nhd) as i32;
    let (h, blk, d) = (
        case.num_kv_heads as i32,
        case.block_size as i32,
        case.head_size as i32,
    );
    let fp8 = case.quant.kv == Dtype::Fp8;
    let name = if fp8 {
        "generate_kv_fp8"
    } else {
        "generate_kv_bf16"
    };
    let f = session.function(name).ok_or_else(|| missing(name))?;
    let mut b = session.stream.launch_builder(f);
    b.arg(&out)
        .arg(&n)
        .arg(&seed)
        .arg(&stream_salt)
        .arg(&nhd)
        .arg(&h)
        .arg(&blk)
        .arg(&d);
    if fp8 {
        b.arg(&k_scale).arg(&v_scale);
    }
    // SAFETY: generate_kv_bf16(u16*, u64, u64, u64, int, int, int, int) or generate_kv_fp8(u8*,
    // the same, float k_scale, float v_scale); `out` holds n elements of the cache dtype.
    unsafe { b.launch(elementwise_cfg(session, n)) }
        .map_err(CudaError::driver(format!("launching {name}")))?;
    Ok(())
}

/// bf16 copy (scales applied) of an e4m3 tensor; `half` > 0 for a paged cache (see generate.cu).
pub(crate) fn launch_dequant(
    session: &DeviceSession,
    out: u64,
    input: u64,
    n: u64,
    half: u64,
    k_scale: f32,
    v_scale: f32,
) -> Result<(), CudaError> {
    let name = "dequant_e4m3_to_bf16";
    let f = session.function(name).ok_or_else(|| missing(name))?;
    let mut b = session.stream.launch_builder(f);
    b.arg(&out)
        .arg(&input)
        .arg(&n)
        .arg(&half)
        .arg(&k_scale)
        .arg(&v_scale);
    // SAFETY: dequant_e4m3_to_bf16(u16* out, const u8* in, u64 n, u64 half, float, float); `out`
    // holds n bf16 elements and `input` n bytes.
    unsafe { b.launch(elementwise_cfg(session, n)) }
        .map_err(CudaError::driver(format!("launching {name}")))?;
    Ok(())
}

/// The streaming-read calibration kernel over `n16` 16-byte words.
pub(crate) fn launch_stream_read(
    session: &DeviceSession,
    buf: u64,
    n16: u64,
    sink: u64,
) -> Result<(), CudaError> {
    let name = "calibrate_stream_read";
    let f = session.function(name).ok_or_else(|| missing(name))?;
    let cfg = linear_cfg(session.props.sm_count * 8, 512);
    let mut b = session.stream.launch_builder(f);
    b.arg(&buf).arg(&n16).arg(&sink);
    // SAFETY: calibrate_stream_read(const uint4*, u64, u32*); `buf` holds n16 16-byte words and
    // `sink` one u32.
    unsafe { b.launch(cfg) }.map_err(CudaError::driver(format!("launching {name}")))?;
    Ok(())
}

/// Launches one of the exhaustive number-format checks of reference.cu (`check_conversions`,
/// `check_nvfp4_codes`); `result` holds the u32 counters it expects, set up by the caller.
pub(crate) fn launch_format_check(
    session: &DeviceSession,
    name: &str,
    result: u64,
) -> Result<(), CudaError> {
    let f = session.function(name).ok_or_else(|| missing(name))?;
    let cfg = linear_cfg(session.props.sm_count * 8, 256);
    let mut b = session.stream.launch_builder(f);
    b.arg(&result);
    // SAFETY: check_*(u32* result); `result` holds the counters the kernel writes (seven for
    // check_conversions, four for check_nvfp4_codes).
    unsafe { b.launch(cfg) }.map_err(CudaError::driver(format!("launching {name}")))?;
    Ok(())
}

/// Launches `inject_fault` on an address no allocation covers (see generate.cu).
pub(crate) fn launch_fault(session: &DeviceSession) -> Result<(), CudaError> {
    let name = "inject_fault";
    let f = session.function(name).ok_or_else(|| missing(name))?;
    // Far above any allocation, and not null (a null write may be caught differently).
    let bad: u64 = 0x0000_7fff_dead_0000;
    let cfg = linear_cfg(1, 32);
    let mut b = session.stream.launch_builder(f);
    b.arg(&bad);
    // SAFETY: deliberately unsafe for the device (an illegal address fault, which the driver
    // contains to this context); nothing on the host side is touched.
    unsafe { b.launch(cfg) }.map_err(CudaError::driver(format!("launching {name}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{KvPool, MeasureMethod, QuantMode};

    fn case(layout: KvLayout) -> BenchCase {
        BenchCase {
            id: String::new(),
            batch_size: 2,
            max_seq_len: 64,
            quant: QuantMode::BF16,
            num_qo_heads: 16,
            num_kv_heads: 4,
            head_size: 64,
            layout,
            block_size: 16,
            pool: KvPool::Shared { tokens: 256 },
            seed: 1,
            method: MeasureMethod::default(),
        }
    }

    #[test]
    fn strides_reproduce_the_layout_offsets() {
        for layout in [KvLayout::Hnd, KvLayout::Nhd] {
            let c = case(layout);
            let (page, half, head, slot) = cache_strides(&c);
            for (p, kv, h, s, d) in [
                (0usize, 0usize, 0usize, 0usize, 0usize),
                (3, 1, 2, 5, 7),
                (1, 0, 3, 15, 63),
            ] {
                let ours = p as i64 * page
                    + kv as i64 * half
                    + h as i64 * head
                    + s as i64 * slot
                    + d as i64;
                let theirs = layout.offset(p, kv, h, s, d, 4, 16, 64) as i64;
                assert_eq!(ours, theirs, "{layout} {p} {kv} {h} {s} {d}");
            }
        }
    }

    #[test]
    fn params_block_has_the_c_layout_size() {
        // 11 pointers + 4 i64 + 11 i32 + 6 f32 + 2 i32: 196 bytes, rounded up to 200 by the
        // 8-byte alignment (the same in C).
        assert_eq!(
            std::mem::size_of::<AttnParams>(),
            11 * 8 + 4 * 8 + 11 * 4 + 6 * 4 + 2 * 4 + 4
        );
        assert_eq!(
            std::mem::offset_of!(AttnParams, partial_evict_last),
            11 * 8 + 4 * 8 + 11 * 4 + 6 * 4
        );
        assert_eq!(
            std::mem::offset_of!(AttnParams, lse_stride),
            11 * 8 + 4 * 8 + 11 * 4 + 6 * 4 + 4
        );
        // The scales sit right after the i32 fields, as common.cuh's six floats do.
        assert_eq!(
            std::mem::offset_of!(AttnParams, scales),
            11 * 8 + 4 * 8 + 11 * 4
        );
        assert_eq!(std::mem::size_of::<crate::workload::Scales>(), 6 * 4);
        assert_eq!(std::mem::size_of::<WorkItem>(), 16);
    }

    #[test]
    fn geometry_fills_whole_warps_and_fits_shared_memory() {
        for head in SUPPORTED_HEAD_SIZES {
            for group in 1..=16 {
                for kv in [Dtype::Bf16, Dtype::Fp8] {
                    let g = decode_geometry(head, group, kv).unwrap();
                    assert_eq!(g.threads() % 32, 0, "head {head} group {group}");
                    assert!(g.threads() <= DECODE_MAX_THREADS);
                    assert!(g.smem_bytes <= DEFAULT_SMEM_LIMIT_BYTES, "{g:?}");
                    assert_eq!(32 % g.block.0, 0, "a token's lanes must sit in one warp");
                    for &depth in mma_stage_counts(kv) {
                        if let Some(m) = mma_geometry(head, group, kv, depth) {
                            assert_eq!(m.threads(), MMA_THREADS);
                            // Hopper/Ampere allow up to 227/163 KiB per block after opting in.
                            assert!(m.smem_bytes <= 160 * 1024, "{m:?}");
                            assert_eq!(m.stage_tokens, MMA_STAGE_TOKENS);
                            assert_eq!(m.stages, depth);
                        }
                    }
                }
            }
        }
        assert!(decode_geometry(96, 8, Dtype::Bf16).is_err());
        assert!(decode_geometry(256, 17, Dtype::Bf16).is_err());
        // Tensor cores where they fit (every compiled depth), FMA elsewhere or when asked.
        // Hopper: 227 KiB of shared memory per CTA.
        let hopper = |cc| KernelLimits {
            compute_major: cc,
            max_smem_per_block: 227 * 1024,
        };
        let pick_on = |h, g, kv, limits, fma, stages| {
            choose_decode_geometries(h, g, kv, limits, fma, stages)
                .map(|v| v.iter().map(|g| (g.variant, g.stages)).collect::<Vec<_>>())
        };
        let pick = |h, g, kv, cc, fma, stages| pick_on(h, g, kv, hopper(cc), fma, stages);
        let mma = DecodeVariant::Mma;
        let fma = DecodeVariant::Fma;
        let fp8 = Dtype::Fp8;
        assert_eq!(
            pick(128, 8, fp8, 9, false, None).unwrap(),
            [(mma, 2), (mma, 3), (mma, 4)]
        );
        assert_eq!(pick(128, 8, fp8, 9, false, Some(3)).unwrap(), [(mma, 3)]);
        assert_eq!(
            pick(128, 8, Dtype::Bf16, 9, false, None).unwrap(),
            [(mma, 2), (mma, 3)]
        );
        let err = pick(128, 8, Dtype::Bf16, 9, false, Some(4)).unwrap_err();
        assert!(err.contains("no 4-stage build for a bf16 cache"), "{err}");
        assert_eq!(
            pick(128, 8, fp8, 9, true, None).unwrap(),
            [(fma, DECODE_STAGES)]
        );
        // A forced depth does not apply to the FMA kernel (one depth).
        assert_eq!(
            pick(256, 8, fp8, 9, false, Some(3)).unwrap(),
            [(fma, DECODE_STAGES)]
        );
        assert_eq!(
            pick(128, 8, fp8, 7, false, None).unwrap(),
            [(fma, DECODE_STAGES)]
        );
        // sm_89 (L4, L40S): 99 KiB per CTA, so no 3-stage bf16 kernel for a 16-head group (100
        // KiB), which the self-test then does not force either.
        let ada = KernelLimits {
            compute_major: 8,
            max_smem_per_block: 99 * 1024,
        };
        let bf16 = Dtype::Bf16;
        assert_eq!(
            pick_on(128, 16, bf16, ada, false, None).unwrap(),
            [(mma, 2)]
        );
        assert_eq!(
            pick_on(128, 8, bf16, ada, false, None).unwrap(),
            [(mma, 2), (mma, 3)]
        );
        let err = pick_on(128, 16, bf16, ada, false, Some(3)).unwrap_err();
        assert!(
            err.contains("shared memory") && err.contains("101376"),
            "{err}"
        );
        // Without a device (no limits known) only the FMA kernel.
        assert_eq!(
            pick_on(128, 8, fp8, KernelLimits::default(), false, None).unwrap(),
            [(fma, DECODE_STAGES)]
        );
        assert!(mma_geometry(64, 17, Dtype::Bf16, 2).is_none());
        assert!(mma_geometry(128, 8, Dtype::Bf16, 4).is_none());
        // Three bf16 stages still fit two CTAs per SM (228 KiB of shared memory on Hopper).
        let bf16_3 = mma_geometry(128, 16, Dtype::Bf16, 3).unwrap().smem_bytes;
        assert!(2 * (bf16_3 + 1024) <= 228 * 1024, "{bf16_3}");
        // Fewer stages, less shared memory: that is what buys the extra CTAs per SM.
        let smem = |d| mma_geometry(128, 8, fp8, d).unwrap().smem_bytes;
        assert!(smem(2) < smem(3) && smem(3) < smem(4));
        assert_eq!(smem(3), 3 * 2 * 64 * 128 + 8 * 136 * 2);
    }

    #[test]
    fn merge_block_covers_the_splits_in_one_round() {
        for splits in 1..200usize {
            for rows in [64, 256, 1024, 4096, 16384] {
                let (x, per_cta) = merge_block(splits, rows, 132);
                let row_warps = x / 32;
                assert_eq!(x % 32, 0);
                // 4 warps a CTA, or 8 where a row needs more than 4 for one round of loads.
                let cta_warps = row_warps * per_cta;
                let one_round_in_4 = splits <= (MERGE_SMALL_CTA_WARPS * MERGE_UNROLL) as usize;
                assert_eq!(
                    cta_warps,
                    if one_round_in_4 {
                        MERGE_SMALL_CTA_WARPS
                    } else {
                        MERGE_WARPS
                    },
                    "{splits}"
                );
                // One round of MERGE_UNROLL loads per warp, while 8 warps can cover the list.
                if splits <= (MERGE_WARPS * MERGE_UNROLL) as usize {
                    assert!(row_warps * MERGE_UNROLL >= splits as u32, "{splits}");
                } else {
                    assert_eq!(per_cta, 1);
                }
                // Rows per CTA only where there are CTAs enough for every SM.
                assert!(
                    per_cta == 1 || rows.div_ceil(per_cta) >= 132,
                    "{rows} {per_cta}"
                );
            }
        }
        // Short lists at large batch: one warp per qo head, 4 heads per CTA.
        assert_eq!(merge_block(2, 4096, 132), (32, 4));
        assert_eq!(merge_block(32, 4096, 132), (128, 1));
        // b=1 (64 rows): one row per CTA, 4 warps on it, or 8 for a list of 33 to 64 splits.
        assert_eq!(merge_block(8, 64, 132), (128, 1));
        assert_eq!(merge_block(49, 64, 132), (256, 1));
    }

    #[test]
    fn narrow_merge_rows_are_offered_only_where_a_row_has_more_warps_than_it_needs() {
        // b=1 and b=4 at s=1024 (8 splits of 128 tokens): Spread puts 4 warps on each row, one
        // does.
        for rows in [64, 256] {
            assert!(merge_rows_alternative(8, rows, 132), "{rows}");
            assert_eq!(merge_block_for(MergeRows::Narrow, 8, rows, 132), (32, 1));
        }
        // b=4 at s=4096 (up to 16 splits): Spread puts 4 warps on each row, two do.
        assert_eq!(merge_block(16, 256, 132), (128, 1));
        assert!(merge_rows_alternative(9, 256, 132));
        assert!(merge_rows_alternative(16, 64, 132));
        assert_eq!(merge_block_for(MergeRows::Narrow, 16, 256, 132), (64, 1));
        // b=16 (1024 rows): Spread already gives a row one warp (4 rows a CTA), or two (2 rows).
        assert_eq!(merge_block(8, 1024, 132), (32, 4));
        assert!(!merge_rows_alternative(8, 1024, 132));
        assert_eq!(merge_block(16, 1024, 132), (64, 2));
        assert!(!merge_rows_alternative(16, 1024, 132));
        // A list of 17 or more keeps Spread's warps: it needs them all.
        assert!(!merge_rows_alternative(17, 64, 132));
        assert!(!merge_rows_alternative(49, 64, 132));
        // Spread is merge_block itself.
        for (splits, rows) in [(2, 4096), (8, 64), (49, 64)] {
            assert_eq!(
                merge_block_for(MergeRows::Spread, splits, rows, 132),
                merge_block(splits, rows, 132)
            );
        }
    }

    #[test]
    fn rust_constants_match_the_cuda_sources() {
        let mma = include_str!("../../cuda/decode_mma.cu");
        assert!(mma.contains(&format!("#define MMA_WARPS {}", MMA_THREADS / 32)));
        assert!(mma.contains("#define MMA_STAGE_TOKENS (MMA_WARPS * MMA_TILE)"));
        assert!(mma.contains(&format!(
            "#define MMA_TILE {}",
            MMA_STAGE_TOKENS / (MMA_THREADS / 32)
        )));
        assert!(mma.contains(&format!(
            "#define MMA_STAGES_BF16_MIN {}",
            MMA_STAGES_BF16[0]
        )));
        assert!(mma.contains(&format!(
            "#define MMA_STAGES_BF16_MAX {}",
            MMA_STAGES_BF16[MMA_STAGES_BF16.len() - 1]
        )));
        assert!(mma.contains(&format!("#define MMA_STAGES_FP8_MIN {}", MMA_STAGES_FP8[0])));
        assert!(mma.contains(&format!(
            "#define MMA_STAGES_FP8_MAX {}",
            MMA_STAGES_FP8[MMA_STAGES_FP8.len() - 1]
        )));
        for depth in MMA_STAGES_FP8 {
            assert!(mma.contains(&format!(
                "DB_DECODE_MMA_OUTS(D, GN, NH, QN, QF, fp8, true, {depth})"
            )));
        }
        for depth in MMA_STAGES_BF16 {
            assert!(mma.contains(&format!(
                "DB_DECODE_MMA_OUTS(D, GN, NH, bf16, false, bf16, false, {depth})"
            )));
        }
        assert!(mma.contains(&format!("#define MMA_MAX_GROUP {MMA_MAX_GROUP}")));
        assert_eq!(MMA_GROUP_WIDTHS[1], MMA_MAX_GROUP);
        for width in MMA_GROUP_WIDTHS {
            assert!(mma.contains(&format!("DB_DECODE_MMA_GROUP(128, {width}, {})", width / 8)));
        }
        let decode = include_str!("../../cuda/decode.cu");
        assert!(decode.contains(&format!("#define DEC_TILE {DECODE_TILE_TOKENS}")));
        assert!(decode.contains(&format!("#define DEC_STAGES {DECODE_STAGES}")));
        assert!(decode.contains(&format!("#define MERGE_MAX_WARPS {MERGE_WARPS}")));
        let common = include_str!("../../cuda/common.cuh");
        assert!(common.contains(&format!("#define MERGE_UNROLL {MERGE_UNROLL}")));
        assert!(decode.contains(&format!("__launch_bounds__({DECODE_MAX_THREADS})")));
        let baseline = include_str!("../../cuda/baseline.cu");
        assert!(baseline.contains(&format!("#define BASE_WARPS {}", BASELINE_THREADS / 32)));
        let reference = include_str!("../../cuda/reference.cu");
        assert!(reference.contains(&format!("#define REF_THREADS {REFERENCE_THREADS}")));
    }

    #[test]
    fn kernel_names_follow_the_root_dtype_pattern() {
        let names = all_kernel_names();
        assert!(names.contains(&"decode_d128_fp8_fp8_nvfp4".to_string()));
        for depth in [2, 3, 4] {
            assert!(names.contains(&format!("decode_mma_d128_g8_bf16_fp8_bf16_s{depth}")));
            assert!(names.contains(&format!("decode_mma_d64_g16_fp8_fp8_nvfp4_s{depth}")));
        }
        assert!(names.contains(&"decode_mma_d128_g8_bf16_bf16_fp8_s3".to_string()));
        assert!(!names.contains(&"decode_mma_d128_g8_bf16_bf16_fp8_s4".to_string()));
        assert_eq!(
            decode_mma_kernel_name(128, 5, Dtype::Bf16, Dtype::Bf16, Dtype::Bf16, 2),
            "decode_mma_d128_g8_bf16_bf16_bf16_s2"
        );
        assert_eq!(
            decode_mma_kernel_name(128, 9, Dtype::Bf16, Dtype::Fp8, Dtype::Bf16, 3),
            "decode_mma_d128_g16_bf16_fp8_bf16_s3"
        );
        assert!(names.contains(&"baseline_d128_bf16_bf16_bf16".to_string()));
        assert!(names.contains(&"merge_d256_fp8".to_string()));
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }
}
