//! The workload: one decode-attention benchmark case and the types that describe it.
//!
//! These are plain Rust types shared by every crate (grid expansion in the coordinator, the
//! backends in this crate, the agent). Wire types live in `decodebench-proto` and convert to and
//! from these at the edge.

use crate::measurement::KernelKind;
use crate::torch_rng::TorchCudaRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Tokens in the reference script's shared KV pool.
pub const REFERENCE_POOL_TOKENS: u32 = 256_000;

/// Per-tensor scale of fp8 tensors (Q, KV, output). Not 1.0, so a kernel that forgets a scale
/// fails verification; a power of two, so dequantized fp8 values stay exact in bf16 and f32, and
/// standard-normal data (|x| < ~6) uses the upper e4m3 range without saturating.
pub const FP8_TENSOR_SCALE: f32 = 0.5;

/// The reference script's global scale for NVFP4 output (`o_sf_scale`).
pub const NVFP4_GLOBAL_SCALE: f32 = 500.0;

/// Element type of Q, the KV cache or the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    Fp8,
    Nvfp4,
}

impl Dtype {
    /// Short name used in grid files, ids and our own result columns.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::Fp8 => "fp8",
            Dtype::Nvfp4 => "nvfp4",
        }
    }

    /// The string the reference script prints for this dtype (its CSV columns use these).
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "torch.bfloat16",
            Dtype::Fp8 => "torch.float8_e4m3fn",
            Dtype::Nvfp4 => "torch.uint8",
        }
    }

    /// Bytes per element in memory; NVFP4 packs two elements per byte (scales counted apart).
    pub fn bits(self) -> u32 {
        match self {
            Dtype::Bf16 => 16,
            Dtype::Fp8 => 8,
            Dtype::Nvfp4 => 4,
        }
    }

    pub fn parse(s: &str) -> Option<Dtype> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" | "torch.bfloat16" => Some(Dtype::Bf16),
            "fp8" | "fp8_e4m3" | "e4m3" | "float8_e4m3fn" | "torch.float8_e4m3fn" => {
                Some(Dtype::Fp8)
            }
            "nvfp4" | "fp4" => Some(Dtype::Nvfp4),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The (q, kv, out) dtypes of one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QuantMode {
    pub q: Dtype,
    pub kv: Dtype,
    pub out: Dtype,
}

impl QuantMode {
    pub const BF16: QuantMode = QuantMode::new(Dtype::Bf16, Dtype::Bf16, Dtype::Bf16);
    pub const FP8_KV: QuantMode = QuantMode::new(Dtype::Bf16, Dtype::Fp8, Dtype::Bf16);
    pub const FP8_QKV: QuantMode = QuantMode::new(Dtype::Fp8, Dtype::Fp8, Dtype::Bf16);
    pub const FP8_QKV_OUT: QuantMode = QuantMode::new(Dtype::Fp8, Dtype::Fp8, Dtype::Fp8);
    pub const FP8_QKV_NVFP4_OUT: QuantMode = QuantMode::new(Dtype::Fp8, Dtype::Fp8, Dtype::Nvfp4);

    /// The reference script's five modes, in its order.
    pub const REFERENCE: [QuantMode; 5] = [
        QuantMode::BF16,
        QuantMode::FP8_KV,
        QuantMode::FP8_QKV,
        QuantMode::FP8_QKV_OUT,
        QuantMode::FP8_QKV_NVFP4_OUT,
    ];

    pub const fn new(q: Dtype, kv: Dtype, out: Dtype) -> QuantMode {
        QuantMode { q, kv, out }
    }

    /// Why this combination is not supported, if it is not.
    pub fn unsupported_reason(&self) -> Option<String> {
        if self.q == Dtype::Nvfp4 || self.kv == Dtype::Nvfp4 {
            return Some(format!(
                "{self}: nvfp4 is supported only as an output dtype; use bf16 or fp8 for q and kv"
            ));
        }
        if self.q == Dtype::Fp8 && self.kv != Dtype::Fp8 {
            return Some(format!(
                "{self}: an fp8 query needs an fp8 KV cache (as in the reference script)"
            ));
        }
        None
    }
}

impl fmt::Display for QuantMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.q, self.kv, self.out)
    }
}

/// Memory layout of one page of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvLayout {
    /// `[pages, 2, kv_heads, block, head]`
    Hnd,
    /// `[pages, 2, block, kv_heads, head]`
    Nhd,
}

impl KvLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            KvLayout::Hnd => "HND",
            KvLayout::Nhd => "NHD",
        }
    }

    pub fn parse(s: &str) -> Option<KvLayout> {
        match s.to_ascii_uppercase().as_str() {
            "HND" => Some(KvLayout::Hnd),
            "NHD" => Some(KvLayout::Nhd),
            _ => None,
        }
    }

    /// Element offset of (page, k_or_v, kv_head, slot, dim) in a cache of this layout.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn offset(
        self,
        page: usize,
        kv_index: usize,
        kv_head: usize,
        slot: usize,
        dim: usize,
        num_kv_heads: usize,
        block_size: usize,
        head_size: usize,
    ) -> usize {
        let page_elems = 2 * num_kv_heads * block_size * head_size;
        let half = num_kv_heads * block_size * head_size;
        let base = page * page_elems + kv_index * half;
        match self {
            KvLayout::Hnd => base + (kv_head * block_size + slot) * head_size + dim,
            KvLayout::Nhd => base + (slot * num_kv_heads + kv_head) * head_size + dim,
        }
    }
}

impl fmt::Display for KvLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the KV pool is built and how block tables pick pages from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum KvPool {
    /// A pool of `tokens` tokens; block tables pick pages uniformly at random (pages may repeat
    /// across and within sequences), as the reference script does.
    Shared { tokens: u32 },
    /// A pool sized to the case in which every page is used exactly once; block tables are a
    /// random permutation. Bandwidth figures then mean HBM traffic.
    Unique,
}

impl KvPool {
    pub fn label(&self) -> String {
        match self {
            KvPool::Shared { tokens } => format!("shared{tokens}"),
            KvPool::Unique => "unique".to_string(),
        }
    }
}

/// L2 state before each timed trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L2Mode {
    /// No flush between trials (the reference script's behaviour).
    Hot,
    /// L2 flushed before every timed trial (nvbench, FlashInfer's harness).
    Cold,
}

impl L2Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            L2Mode::Hot => "hot",
            L2Mode::Cold => "cold",
        }
    }
}

/// How a trial is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimingMode {
    /// One launch per trial between two events.
    Events,
    /// `graph_launches` launches captured in a CUDA graph, replayed per trial; the sample is the
    /// replay time divided by the launch count, so launch overhead is excluded.
    Graph,
}

impl TimingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TimingMode::Events => "events",
            TimingMode::Graph => "graph",
        }
    }
}

/// How a case is measured. Part of the case identity: the same workload measured two ways is two
/// cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasureMethod {
    pub warmup: u32,
    /// Trials when noise-based stopping is off; the minimum when it is on.
    pub trials: u32,
    pub l2: L2Mode,
    pub timing: TimingMode,
    /// Launches per graph replay in graph mode.
    pub graph_launches: u32,
    /// Noise-based stopping: keep taking trials until the relative standard error of the mean is
    /// below this fraction (e.g. 0.005), up to `max_trials` and `max_time_s`. `None` = fixed trials.
    pub target_rse: Option<f64>,
    pub max_trials: u32,
    pub max_time_s: f64,
    /// Re-measure a case whose trials ran under thermal or power throttling, up to this many times,
    /// after a cool-down.
    pub throttle_retries: u32,
    /// Which kernels run (both by default; `optimized` alone makes a kernel-tuning sweep several
    /// times shorter, since the baseline is the slow one).
    #[serde(default)]
    pub kernels: KernelSelection,
}

/// The kernels a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelSelection {
    #[default]
    Both,
    Optimized,
    Baseline,
}

impl KernelSelection {
    pub const ALL: [KernelSelection; 3] = [
        KernelSelection::Both,
        KernelSelection::Optimized,
        KernelSelection::Baseline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KernelSelection::Both => "both",
            KernelSelection::Optimized => "optimized",
            KernelSelection::Baseline => "baseline",
        }
    }

    pub fn parse(s: &str) -> Option<KernelSelection> {
        KernelSelection::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn includes(self, kind: KernelKind) -> bool {
        self.kinds().contains(&kind)
    }

    /// The kernels to run, in the order they run.
    pub fn kinds(self) -> &'static [KernelKind] {
        match self {
            KernelSelection::Both => &KernelKind::ALL,
            KernelSelection::Optimized => &[KernelKind::Optimized],
            KernelSelection::Baseline => &[KernelKind::Baseline],
        }
    }
}

impl Default for MeasureMethod {
    fn default() -> Self {
        MeasureMethod {
            warmup: 10,
            trials: 20,
            l2: L2Mode::Hot,
            timing: TimingMode::Events,
            graph_launches: 10,
            target_rse: None,
            max_trials: 1000,
            max_time_s: 5.0,
            throttle_retries: 0,
            kernels: KernelSelection::Both,
        }
    }
}

/// One benchmark case: everything needed to build the inputs, run both kernels and time them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchCase {
    /// Stable id derived from every other field (see [`BenchCase::compute_id`]).
    pub id: String,
    pub batch_size: u32,
    pub max_seq_len: u32,
    pub quant: QuantMode,
    pub num_qo_heads: u32,
    pub num_kv_heads: u32,
    pub head_size: u32,
    pub layout: KvLayout,
    pub block_size: u32,
    pub pool: KvPool,
    pub seed: u64,
    pub method: MeasureMethod,
}

impl BenchCase {
    /// The reference script's shape at this batch, length and quantization: 64 qo and 8 kv heads
    /// of 128, HND pages of 16 tokens, the shared pool of [`REFERENCE_POOL_TOKENS`], seed 0 and
    /// the default measurement method. The id is left empty: change fields with struct-update
    /// syntax (`BenchCase { head_size: 64, ..BenchCase::reference_shape(..) }`), then
    /// [`BenchCase::with_id`].
    pub fn reference_shape(batch_size: u32, max_seq_len: u32, quant: QuantMode) -> BenchCase {
        BenchCase {
            id: String::new(),
            batch_size,
            max_seq_len,
            quant,
            num_qo_heads: 64,
            num_kv_heads: 8,
            head_size: 128,
            layout: KvLayout::Hnd,
            block_size: 16,
            pool: KvPool::Shared {
                tokens: REFERENCE_POOL_TOKENS,
            },
            seed: 0,
            method: MeasureMethod::default(),
        }
    }

    /// A 16-hex-digit id: SHA-256 of the canonical parameter string. Stable across runs, machines
    /// and versions as long as the parameters are the same.
    pub fn compute_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.canonical_params().as_bytes());
        hex::encode(&h.finalize()[..8])
    }

    /// The canonical, human-readable form of the parameters that the id hashes. It starts with
    /// the version of what the parameters mean: `v2` since the seed draws the reference script's
    /// own lengths and block tables (PyTorch's CUDA generator, [`draw_seq_lens`]); a `v1` id named
    /// a case whose lengths and pages came from decodebench's own generator, other work under
    /// the same parameters, so the two never match.
    pub fn canonical_params(&self) -> String {
        let m = &self.method;
        format!(
            "v2;b={};s={};q={};kv={};o={};hq={};hkv={};d={};layout={};blk={};pool={};seed={};\
             warmup={};trials={};l2={};timing={};graph={};rse={:?};maxtr={};maxt={};thr={}",
            self.batch_size,
            self.max_seq_len,
            self.quant.q,
            self.quant.kv,
            self.quant.out,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_size,
            self.layout,
            self.block_size,
            self.pool.label(),
            self.seed,
            m.warmup,
            m.trials,
            m.l2.as_str(),
            m.timing.as_str(),
            m.graph_launches,
            m.target_rse,
            m.max_trials,
            m.max_time_s,
            m.throttle_retries,
        ) + &match m.kernels {
            // Absent for the default, so ids from before the field existed stay the same.
            KernelSelection::Both => String::new(),
            k => format!(";kernels={}", k.as_str()),
        }
    }

    /// Sets `id` from the parameters.
    pub fn with_id(mut self) -> BenchCase {
        self.id = self.compute_id();
        self
    }

    pub fn group_size(&self) -> u32 {
        self.num_qo_heads / self.num_kv_heads.max(1)
    }

    pub fn max_blocks_per_seq(&self) -> u32 {
        self.max_seq_len.div_ceil(self.block_size.max(1))
    }

    /// Pages in the KV pool for this case.
    pub fn pool_pages(&self, seq_lens: &[u32]) -> u32 {
        match self.pool {
            KvPool::Shared { tokens } => tokens.div_ceil(self.block_size.max(1)),
            KvPool::Unique => seq_lens
                .iter()
                .map(|s| s.div_ceil(self.block_size.max(1)))
                .sum::<u32>()
                .max(1),
        }
    }

    /// Key of the KV pool set-up this case needs: cases with the same key can share one pool.
    pub fn pool_key(&self) -> String {
        match self.pool {
            KvPool::Shared { tokens } => format!(
                "shared{tokens};kv={};hkv={};d={};layout={};blk={};seed={}",
                self.quant.kv,
                self.num_kv_heads,
                self.head_size,
                self.layout,
                self.block_size,
                self.seed
            ),
            KvPool::Unique => format!("unique;{}", self.id),
        }
    }

    /// A short human-readable label for logs.
    pub fn label(&self) -> String {
        format!(
            "b{} s{} {} {}x{} d{} {} blk{} {}",
            self.batch_size,
            self.max_seq_len,
            self.quant,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_size,
            self.layout,
            self.block_size,
            self.pool.label()
        )
    }

    /// Logical bytes per call, counted as FlashInfer's harness does: K and V actually read, plus Q,
    /// O (with NVFP4 scale factors) and the block tables.
    pub fn logical_bytes(&self, seq_lens: &[u32]) -> u64 {
        let tokens: u64 = seq_lens.iter().map(|&s| s as u64).sum();
        let kv_bits = tokens
            * self.num_kv_heads as u64
            * self.head_size as u64
            * 2
            * self.quant.kv.bits() as u64;
        let qo_elems = self.batch_size as u64 * self.num_qo_heads as u64 * self.head_size as u64;
        let q_bits = qo_elems * self.quant.q.bits() as u64;
        let o_bits = qo_elems * self.quant.out.bits() as u64;
        let sf_bytes = if self.quant.out == Dtype::Nvfp4 {
            qo_elems / 16
        } else {
            0
        };
        let table_bytes: u64 = seq_lens
            .iter()
            .map(|&s| s.div_ceil(self.block_size.max(1)) as u64 * 4)
            .sum::<u64>()
            + seq_lens.len() as u64 * 4;
        (kv_bits + q_bits + o_bits) / 8 + sf_bytes + table_bytes
    }
}

/// Per-tensor scales used by a case (FP8 Q/KV/out, NVFP4 global scale). The reference script uses
/// 1.0 everywhere except the NVFP4 global scale; the generators pick scales that keep values in
/// range.
///
/// Semantics: an fp8 tensor stores `e4m3(x / scale)` and means `stored * scale`; the output in
/// fp8 is `e4m3_sat(out / o_scale)`; NVFP4 output uses `o_sf_scale` as its global scale; logits
/// are `(q * q_scale) . (k * k_scale) * sm_scale`.
///
/// `repr(C)`: the same six floats end the kernels' parameter block (`AttnParams` in
/// `cuda/launch.rs` and `common.cuh`), which holds this struct as it is.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Scales {
    pub q_scale: f32,
    pub k_scale: f32,
    pub v_scale: f32,
    pub o_scale: f32,
    pub o_sf_scale: f32,
    pub sm_scale: f32,
}

impl Scales {
    /// Scales of `case`: [`FP8_TENSOR_SCALE`] for every fp8 tensor (so kernels must apply the
    /// scales to be right), 1.0 for bf16 ones.
    pub fn for_case(case: &BenchCase) -> Scales {
        let scale_of = |dtype: Dtype| {
            if dtype == Dtype::Fp8 {
                FP8_TENSOR_SCALE
            } else {
                1.0
            }
        };
        Scales {
            q_scale: scale_of(case.quant.q),
            k_scale: scale_of(case.quant.kv),
            v_scale: scale_of(case.quant.kv),
            o_scale: scale_of(case.quant.out),
            o_sf_scale: NVFP4_GLOBAL_SCALE,
            sm_scale: 1.0 / (case.head_size as f32).sqrt(),
        }
    }
}

/// RNG stream salt of the unique pool's page permutation (the reference script has no unique
/// pool, so that one draw is decodebench's own).
const BLOCK_TABLE_STREAM: u64 = 0xb10c_7ab1e;

/// PyTorch's CUDA generator as the reference script leaves it after drawing `case`'s query:
/// `torch.manual_seed(seed)`, then `torch.randn(batch, qo_heads, head_size)`.
fn reference_rng_after_query(case: &BenchCase) -> TorchCudaRng {
    let mut rng = TorchCudaRng::manual_seed(case.seed);
    rng.skip_normal(
        u64::from(case.batch_size) * u64::from(case.num_qo_heads) * u64::from(case.head_size),
    );
    rng
}

/// Sequence lengths exactly as the reference script draws them: with the case's seed as
/// `torch.manual_seed`, after the query, `torch.randint(1, max_seq_len, (batch,), int32)` on a
/// CUDA device ([`crate::torch_rng`]: the draws of a 132-SM H100, on every machine), uniform in
/// `[1, max_seq_len)`, the last set to `max_seq_len`. So a cell times the work the script's
/// cell, and FlashInfer's figures for it, timed (seed 0).
pub fn draw_seq_lens(case: &BenchCase) -> Vec<u32> {
    let mut rng = reference_rng_after_query(case);
    let batch = case.batch_size as usize;
    let max = case.max_seq_len.min(i32::MAX as u32);
    let mut lens: Vec<u32> = if max <= 1 {
        // torch refuses randint(1, 1); every sequence is one token, and the generator moves on
        // as for a draw.
        rng.skip_randint(batch as u64);
        vec![1; batch]
    } else {
        rng.randint_i32(1, max as i32, batch)
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    if let Some(last) = lens.last_mut() {
        *last = max;
    }
    lens
}

/// Block tables, row-major `[batch, max_blocks_per_seq]`.
///
/// Shared pool: as the reference script draws them, every entry (those past a sequence's end
/// too) a page uniform over the pool: after the query and the lengths, the script draws the
/// cache (`torch.randn` over `[pages, 2, kv_heads, block, head_size]`) and then
/// `torch.randint(0, pages, (batch, max_blocks_per_seq), int32)`.
/// Unique pool: the pages `0..pool_pages` are shuffled and dealt out in order, so each page is read
/// by exactly one (sequence, block); unused entries are 0.
pub fn draw_block_tables(case: &BenchCase, seq_lens: &[u32]) -> Vec<i32> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let block = case.block_size.max(1);
    let width = case.max_blocks_per_seq() as usize;
    let pages = case.pool_pages(seq_lens);
    match case.pool {
        KvPool::Shared { .. } => {
            let mut rng = reference_rng_after_query(case);
            rng.skip_randint(seq_lens.len() as u64);
            rng.skip_normal(
                u64::from(pages)
                    * 2
                    * u64::from(case.num_kv_heads)
                    * u64::from(block)
                    * u64::from(case.head_size),
            );
            rng.randint_i32(0, pages.min(i32::MAX as u32) as i32, seq_lens.len() * width)
        }
        KvPool::Unique => {
            let mut tables = vec![0i32; seq_lens.len() * width];
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(case.seed ^ BLOCK_TABLE_STREAM);
            let mut perm: Vec<i32> = (0..pages as i32).collect();
            perm.shuffle(&mut rng);
            let mut next = perm.into_iter();
            for (b, &len) in seq_lens.iter().enumerate() {
                for j in 0..len.div_ceil(block) as usize {
                    tables[b * width + j] = next.next().unwrap_or(0);
                }
            }
            tables
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn case(batch: u32, seq: u32, pool: KvPool) -> BenchCase {
        BenchCase {
            pool,
            seed: 42,
            ..BenchCase::reference_shape(batch, seq, QuantMode::BF16)
        }
        .with_id()
    }

    /// The reference shape at this batch, length and seed (shared pool, block 16).
    fn seeded(batch: u32, seq: u32, seed: u64) -> BenchCase {
        BenchCase {
            seed,
            ..BenchCase::reference_shape(batch, seq, QuantMode::BF16)
        }
    }

    #[test]
    fn seq_lens_follow_the_reference_scheme() {
        let lens = draw_seq_lens(&seeded(64, 1024, 7));
        assert_eq!(lens.len(), 64);
        assert_eq!(*lens.last().unwrap(), 1024);
        assert!(lens.iter().all(|&l| (1..=1024).contains(&l)));
        assert_eq!(
            lens,
            draw_seq_lens(&seeded(64, 1024, 7)),
            "seeded draw must be deterministic"
        );
        assert_ne!(lens, draw_seq_lens(&seeded(64, 1024, 8)));
        // A one-token maximum has nothing to draw.
        assert_eq!(draw_seq_lens(&seeded(3, 1, 0)), vec![1, 1, 1]);
    }

    /// One case of `kernels/tests/fixtures/torch_draws.json`: what PyTorch drew on a GPU.
    #[derive(serde::Deserialize)]
    struct TorchDraw {
        batch_size: u32,
        max_seq_len: u32,
        block_size: u32,
        num_qo_heads: u32,
        num_kv_heads: u32,
        head_size: u32,
        seed: u64,
        seq_lens: Vec<u32>,
        block_tables_sha256: String,
        block_tables_head: Vec<i32>,
        block_tables_tail: Vec<i32>,
    }

    #[derive(serde::Deserialize)]
    struct TorchDraws {
        sm_count: u64,
        max_threads_per_sm: u64,
        pool_tokens: u32,
        cases: Vec<TorchDraw>,
    }

    #[test]
    fn draws_are_the_reference_scripts_own() {
        // PyTorch's lengths and block tables for the reference sweep and a few other shapes and
        // seeds (bench/gpu/torch_draws.py on an H200), replayed on the host.
        let doc: TorchDraws =
            serde_json::from_str(include_str!("../tests/fixtures/torch_draws.json")).unwrap();
        assert_eq!(doc.sm_count, crate::torch_rng::REFERENCE_SM_COUNT);
        assert_eq!(
            doc.max_threads_per_sm,
            crate::torch_rng::REFERENCE_THREADS_PER_SM
        );
        assert_eq!(doc.pool_tokens, REFERENCE_POOL_TOKENS);
        assert_eq!(doc.cases.len(), 140);
        for d in &doc.cases {
            let c = BenchCase {
                num_qo_heads: d.num_qo_heads,
                num_kv_heads: d.num_kv_heads,
                head_size: d.head_size,
                block_size: d.block_size,
                ..seeded(d.batch_size, d.max_seq_len, d.seed)
            };
            let what = format!(
                "b{} s{} block {} heads {}/{} d{} seed {}",
                d.batch_size,
                d.max_seq_len,
                d.block_size,
                d.num_qo_heads,
                d.num_kv_heads,
                d.head_size,
                d.seed
            );
            let lens = draw_seq_lens(&c);
            assert_eq!(lens, d.seq_lens, "lengths of {what}");
            let tables = draw_block_tables(&c, &lens);
            assert_eq!(
                tables[..8],
                d.block_tables_head[..],
                "first pages of {what}"
            );
            assert_eq!(
                tables[tables.len() - 8..],
                d.block_tables_tail[..],
                "last pages of {what}"
            );
            let bytes: Vec<u8> = tables.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                d.block_tables_sha256,
                "block tables of {what}"
            );
        }
    }

    #[test]
    fn timeline_script_uses_decodebench_draws() {
        // bench/gpu/timeline.sh times the s=1024 cells with the lengths decodebench draws for them
        // (seed 0, the reference script's); it must change when the draw does.
        let script = include_str!("../../bench/gpu/timeline.sh");
        for batch in [4u32, 16, 64] {
            let key = format!("[{batch}]=\"");
            let start = script.find(&key).expect("a LENS entry per batch") + key.len();
            let list = &script[start..start + script[start..].find('"').unwrap()];
            let lens: Vec<u32> = list.split(',').map(|x| x.parse().unwrap()).collect();
            assert_eq!(
                lens,
                draw_seq_lens(&seeded(batch, 1024, 0)),
                "batch {batch}"
            );
        }
    }

    #[test]
    fn case_id_is_stable_and_parameter_sensitive() {
        let a = case(
            4,
            1024,
            KvPool::Shared {
                tokens: REFERENCE_POOL_TOKENS,
            },
        );
        let b = case(
            4,
            1024,
            KvPool::Shared {
                tokens: REFERENCE_POOL_TOKENS,
            },
        );
        assert_eq!(a.id, b.id);
        assert_eq!(a.id.len(), 16);
        let c = case(
            8,
            1024,
            KvPool::Shared {
                tokens: REFERENCE_POOL_TOKENS,
            },
        );
        assert_ne!(a.id, c.id);
        let mut d = a.clone();
        d.method.l2 = L2Mode::Cold;
        assert_ne!(a.id, d.with_id().id);
    }

    #[test]
    fn unique_pool_uses_every_page_once() {
        let c = case(8, 300, KvPool::Unique);
        let lens = draw_seq_lens(&c);
        let tables = draw_block_tables(&c, &lens);
        let width = c.max_blocks_per_seq() as usize;
        let mut used = Vec::new();
        for (b, &len) in lens.iter().enumerate() {
            for j in 0..len.div_ceil(16) as usize {
                used.push(tables[b * width + j]);
            }
        }
        used.sort();
        let expect: Vec<i32> = (0..c.pool_pages(&lens) as i32).collect();
        assert_eq!(used, expect);
    }

    #[test]
    fn shared_pool_tables_stay_in_range() {
        let c = case(
            16,
            4096,
            KvPool::Shared {
                tokens: REFERENCE_POOL_TOKENS,
            },
        );
        let lens = draw_seq_lens(&c);
        let tables = draw_block_tables(&c, &lens);
        assert!(tables.iter().all(|&p| p >= 0 && (p as u32) < 16000));
    }

    #[test]
    fn logical_bytes_count_kv_q_o_and_tables() {
        let c = case(
            1,
            1024,
            KvPool::Shared {
                tokens: REFERENCE_POOL_TOKENS,
            },
        );
        let lens = vec![1024];
        let kv = 1024u64 * 8 * 128 * 2 * 2;
        let qo = 64u64 * 128 * 2 * 2;
        let tables = 64 * 4 + 4;
        assert_eq!(c.logical_bytes(&lens), kv + qo + tables);
    }

    #[test]
    #[allow(clippy::identity_op)] // the offsets are spelled out dimension by dimension
    fn layouts_place_elements_as_documented() {
        // HND: [pages, 2, kv_heads, block, head]
        assert_eq!(
            KvLayout::Hnd.offset(1, 1, 2, 3, 4, 8, 16, 128),
            ((1 * 2 + 1) * 8 * 16 + 2 * 16 + 3) * 128 + 4
        );
        // NHD: [pages, 2, block, kv_heads, head]
        assert_eq!(
            KvLayout::Nhd.offset(1, 1, 2, 3, 4, 8, 16, 128),
            ((1 * 2 + 1) * 16 * 8 + 3 * 8 + 2) * 128 + 4
        );
    }
}
