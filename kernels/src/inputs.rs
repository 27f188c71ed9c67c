//! Host-side inputs of one case in their storage formats: sequence lengths, block tables, Q and the
//! paged KV pool (bf16, or fp8 e4m3 with a per-tensor scale), all drawn deterministically from the
//! case seed so every backend, the reference and a re-run on another machine see the same numbers.
//!
//! Values are standard normal (ChaCha8 + Box-Muller). Every KV page is drawn from its own RNG
//! stream, in logical `(k/v, kv_head, slot, dim)` order, so a page's contents depend only on the
//! seed and the page index: the same case in HND and NHD holds the same logical cache, and filling
//! only some pages gives those pages the same values as filling all of them.

use crate::formats::{e4m3_to_f32, f32_to_e4m3, E4M3_TABLE};
use crate::workload::{draw_block_tables, draw_seq_lens, BenchCase, Dtype, KvLayout, Scales};
use half::bf16;
use half::vec::HalfBitsVecExt;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

/// Largest KV pool the host will allocate for one case, in bytes. The reference pool (256,000
/// tokens x 8 KV heads x 128, bf16) is about 1 GiB, but a `unique` pool grows with the case
/// (batch 256 at 32k tokens is already about 17 GB in bf16). The host also holds Q, the baseline's
/// dequantized copy of the pages read and the reference's buffers, so a pool past 16 GiB is
/// refused up front rather than left to exhaust memory mid-run.
pub const MAX_HOST_KV_POOL_BYTES: u64 = 16 << 30;

/// RNG stream salts, so that Q and the KV pool drawn from one case seed are independent of each
/// other and of the sequence-length and block-table streams in `workload`.
const Q_STREAM: u64 = 0x0051_a7e5_0000_0001;
const KV_POOL_STREAM: u64 = 0x0c4c_4e00_0000_0002;

/// Pages per work chunk when filling the pool on several threads: big enough to amortise the
/// thread hand-off, small enough to balance.
const POOL_FILL_PAGES_PER_CHUNK: usize = 64;

/// Why a case's inputs could not be built.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum InputError {
    #[error("case {case}: {reason}")]
    InvalidCase { case: String, reason: String },
    #[error(
        "case {case}: its KV pool would need {bytes} bytes ({pages} pages), more than the \
         {cap}-byte host limit; use a smaller batch, shorter sequences or a shared pool"
    )]
    PoolTooLarge {
        case: String,
        bytes: u64,
        pages: u64,
        cap: u64,
    },
    #[error("inputs do not match case {case}: {reason}")]
    Mismatch { case: String, reason: String },
}

/// A tensor in its storage format.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    Bf16(Vec<bf16>),
    /// e4m3 bytes; the real value is `e4m3_to_f32(byte) * scale`.
    Fp8(Vec<u8>),
}

impl HostTensor {
    pub fn len(&self) -> usize {
        match self {
            HostTensor::Bf16(v) => v.len(),
            HostTensor::Fp8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            HostTensor::Bf16(_) => Dtype::Bf16,
            HostTensor::Fp8(_) => Dtype::Fp8,
        }
    }

    /// Bytes per stored element.
    pub fn element_bytes(&self) -> usize {
        match self {
            HostTensor::Bf16(_) => 2,
            HostTensor::Fp8(_) => 1,
        }
    }

    /// Element `i` as stored, before the per-tensor scale.
    #[inline]
    pub fn raw(&self, i: usize) -> f32 {
        match self {
            HostTensor::Bf16(v) => v[i].to_f32(),
            HostTensor::Fp8(v) => E4M3_TABLE[v[i] as usize],
        }
    }

    /// The real values: stored value times `scale`.
    pub fn dequantize(&self, scale: f32) -> Vec<f32> {
        match self {
            HostTensor::Bf16(v) => v.iter().map(|x| x.to_f32() * scale).collect(),
            HostTensor::Fp8(v) => v.iter().map(|&b| e4m3_to_f32(b) * scale).collect(),
        }
    }
}

/// The inputs of one case. Shapes follow the case: Q is `[batch, qo_heads, head]`, the pool is
/// `[num_pages, 2, kv_heads, block, head]` (HND) or `[num_pages, 2, block, kv_heads, head]` (NHD),
/// block tables are `[batch, block_table_width]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostInputs {
    pub seq_lens: Vec<u32>,
    pub block_tables: Vec<i32>,
    pub block_table_width: usize,
    pub scales: Scales,
    pub q: HostTensor,
    pub kv_cache: HostTensor,
    pub num_pages: usize,
}

impl HostInputs {
    /// Checks that these inputs have the shapes `case` describes and that every block-table entry
    /// a sequence uses names a page of the pool. The reference and the kernels index without
    /// further checks, so inputs that did not come from [`generate_host_inputs`] must pass this.
    pub fn check_matches(&self, case: &BenchCase) -> Result<(), InputError> {
        let mismatch = |reason: String| InputError::Mismatch {
            case: case.label(),
            reason,
        };
        let dims = CaseDims::of(case).map_err(&mismatch)?;
        if self.seq_lens.len() != dims.batch {
            return Err(mismatch(format!(
                "{} sequence lengths for batch {}",
                self.seq_lens.len(),
                dims.batch
            )));
        }
        if self.block_tables.len() != dims.batch * self.block_table_width {
            return Err(mismatch(format!(
                "block tables hold {} entries, expected batch {} x width {}",
                self.block_tables.len(),
                dims.batch,
                self.block_table_width
            )));
        }
        let q_len = dims.batch * dims.qo_heads * dims.head;
        if self.q.len() != q_len {
            return Err(mismatch(format!(
                "q holds {} elements, expected {q_len}",
                self.q.len()
            )));
        }
        if self.q.dtype() != case.quant.q || self.kv_cache.dtype() != case.quant.kv {
            return Err(mismatch(format!(
                "q/kv are {}/{}, the case wants {}/{}",
                self.q.dtype(),
                self.kv_cache.dtype(),
                case.quant.q,
                case.quant.kv
            )));
        }
        let pool_len = self.num_pages * dims.page_elems();
        if self.kv_cache.len() != pool_len {
            return Err(mismatch(format!(
                "kv cache holds {} elements, expected {} pages x {}",
                self.kv_cache.len(),
                self.num_pages,
                dims.page_elems()
            )));
        }
        for (b, &len) in self.seq_lens.iter().enumerate() {
            let blocks = (len as usize).div_ceil(dims.block);
            if len == 0 || blocks > self.block_table_width {
                return Err(mismatch(format!(
                    "sequence {b} has length {len}; lengths must be in 1..={}",
                    self.block_table_width * dims.block
                )));
            }
            let row = &self.block_tables[b * self.block_table_width..][..blocks];
            if let Some((j, &page)) = row
                .iter()
                .enumerate()
                .find(|&(_, &p)| p < 0 || p as usize >= self.num_pages)
            {
                return Err(mismatch(format!(
                    "block table [{b}, {j}] = {page} is outside the pool of {} pages",
                    self.num_pages
                )));
            }
        }
        Ok(())
    }

    /// The page holding token `t` of sequence `b`.
    #[inline]
    pub fn page_of(&self, b: usize, t: usize, block_size: usize) -> usize {
        self.block_tables[b * self.block_table_width + t / block_size] as usize
    }

    /// The distinct pages the sequences read, ascending.
    pub fn referenced_pages(&self, block_size: usize) -> Vec<usize> {
        let mut used = vec![false; self.num_pages];
        for (b, &len) in self.seq_lens.iter().enumerate() {
            let blocks = (len as usize).div_ceil(block_size.max(1));
            for &p in &self.block_tables[b * self.block_table_width..][..blocks] {
                if let Some(u) = used.get_mut(p as usize) {
                    *u = true;
                }
            }
        }
        used.iter()
            .enumerate()
            .filter_map(|(p, &u)| u.then_some(p))
            .collect()
    }
}

/// The case's dimensions as `usize`, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CaseDims {
    pub batch: usize,
    pub qo_heads: usize,
    pub kv_heads: usize,
    pub head: usize,
    pub block: usize,
    pub layout: KvLayout,
}

impl CaseDims {
    /// Dimensions of `case`, or why they cannot describe an attention problem.
    pub fn of(case: &BenchCase) -> Result<CaseDims, String> {
        if case.batch_size == 0 {
            return Err("batch_size is 0; it must be >= 1".into());
        }
        if case.max_seq_len == 0 {
            return Err("max_seq_len is 0; it must be >= 1".into());
        }
        if case.num_kv_heads == 0 || case.num_qo_heads == 0 {
            return Err("head counts must be >= 1".into());
        }
        if !case.num_qo_heads.is_multiple_of(case.num_kv_heads) {
            return Err(format!(
                "num_qo_heads {} is not a multiple of num_kv_heads {}",
                case.num_qo_heads, case.num_kv_heads
            ));
        }
        if case.head_size == 0 {
            return Err("head_size is 0; it must be >= 1".into());
        }
        if case.block_size == 0 {
            return Err("block_size is 0; it must be >= 1".into());
        }
        if case.quant.out == Dtype::Nvfp4 && !case.head_size.is_multiple_of(16) {
            return Err(format!(
                "nvfp4 output needs head_size to be a multiple of 16 (one scale factor per 16 \
                 elements of a head), got {}",
                case.head_size
            ));
        }
        Ok(CaseDims {
            batch: case.batch_size as usize,
            qo_heads: case.num_qo_heads as usize,
            kv_heads: case.num_kv_heads as usize,
            head: case.head_size as usize,
            block: case.block_size as usize,
            layout: case.layout,
        })
    }

    pub fn group(&self) -> usize {
        self.qo_heads / self.kv_heads
    }

    pub fn page_elems(&self) -> usize {
        2 * self.kv_heads * self.block * self.head
    }

    /// Element offset of (page, k_or_v, kv_head, slot, dim) in the pool.
    #[inline]
    pub fn kv_offset(&self, page: usize, kv: usize, kv_head: usize, slot: usize) -> usize {
        self.layout.offset(
            page,
            kv,
            kv_head,
            slot,
            0,
            self.kv_heads,
            self.block,
            self.head,
        )
    }
}

/// Which pages of the pool [`generate_kv_pool`] fills with values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolFill<'a> {
    /// Every page: for a pool that several cases (with different block tables) share.
    All,
    /// Only these pages; the rest stay zero. Values of the pages filled are the same as with
    /// `All`, and no correct kernel reads the others.
    Pages(&'a [usize]),
}

/// Builds the inputs of `case`: sequence lengths and block tables as `workload` draws them, Q
/// and the KV pages the block tables reference filled with seeded standard-normal values (bf16, or
/// e4m3 of `x / scale` with [`Scales::for_case`]). Unreferenced pages are zero; use
/// [`generate_kv_pool`] with [`PoolFill::All`] for a pool shared between cases.
pub fn generate_host_inputs(case: &BenchCase) -> Result<HostInputs, InputError> {
    let dims = CaseDims::of(case).map_err(|reason| InputError::InvalidCase {
        case: case.label(),
        reason,
    })?;
    if case.quant.q == Dtype::Nvfp4 || case.quant.kv == Dtype::Nvfp4 {
        return Err(InputError::InvalidCase {
            case: case.label(),
            reason: "nvfp4 is an output format only; q and kv must be bf16 or fp8".into(),
        });
    }
    let scales = Scales::for_case(case);
    let seq_lens = draw_seq_lens(case);
    let block_tables = draw_block_tables(case, &seq_lens);
    let num_pages = checked_pool_pages(case, &seq_lens)?;

    let mut inputs = HostInputs {
        seq_lens,
        block_tables,
        block_table_width: case.max_blocks_per_seq() as usize,
        scales,
        q: generate_q(case, &dims, &scales),
        kv_cache: HostTensor::Bf16(Vec::new()),
        num_pages,
    };
    let pages = inputs.referenced_pages(dims.block);
    inputs.kv_cache = generate_kv_pool(case, &scales, PoolFill::Pages(&pages))?;
    inputs.check_matches(case)?;
    Ok(inputs)
}

/// Pages in the case's pool, refused when the pool would pass [`MAX_HOST_KV_POOL_BYTES`].
fn checked_pool_pages(case: &BenchCase, seq_lens: &[u32]) -> Result<usize, InputError> {
    let pages = case.pool_pages(seq_lens) as u64;
    let page_bytes = 2
        * case.num_kv_heads as u64
        * case.block_size as u64
        * case.head_size as u64
        * (case.quant.kv.bits() as u64 / 8);
    let bytes = pages.saturating_mul(page_bytes);
    if bytes > MAX_HOST_KV_POOL_BYTES {
        return Err(InputError::PoolTooLarge {
            case: case.label(),
            bytes,
            pages,
            cap: MAX_HOST_KV_POOL_BYTES,
        });
    }
    Ok(pages as usize)
}

/// Q of `case`: `[batch, qo_heads, head]` standard normal in its storage format.
fn generate_q(case: &BenchCase, dims: &CaseDims, scales: &Scales) -> HostTensor {
    let mut rng = ChaCha8Rng::seed_from_u64(case.seed ^ Q_STREAM);
    let mut values = vec![0.0f32; dims.batch * dims.qo_heads * dims.head];
    fill_standard_normal(&mut rng, &mut values);
    match case.quant.q {
        Dtype::Fp8 => HostTensor::Fp8(
            values
                .iter()
                .map(|&x| f32_to_e4m3(x / scales.q_scale))
                .collect(),
        ),
        _ => HostTensor::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
    }
}

/// The KV pool of `case` (all of it, or only some pages) with seeded standard-normal values;
/// fp8 pools store `e4m3(x / k_scale)` in the K half and `e4m3(x / v_scale)` in the V half.
/// Fills pages on all available cores; the result does not depend on how many there are.
pub fn generate_kv_pool(
    case: &BenchCase,
    scales: &Scales,
    fill: PoolFill<'_>,
) -> Result<HostTensor, InputError> {
    let dims = CaseDims::of(case).map_err(|reason| InputError::InvalidCase {
        case: case.label(),
        reason,
    })?;
    let seq_lens = draw_seq_lens(case);
    let num_pages = checked_pool_pages(case, &seq_lens)?;
    let page_elems = dims.page_elems();
    let mut pages: Vec<usize> = match fill {
        PoolFill::All => (0..num_pages).collect(),
        PoolFill::Pages(p) => p.to_vec(),
    };
    pages.sort_unstable();
    pages.dedup();
    if let Some(&bad) = pages.last().filter(|&&p| p >= num_pages) {
        return Err(InputError::InvalidCase {
            case: case.label(),
            reason: format!("page {bad} requested, but the pool has {num_pages} pages"),
        });
    }
    let page_values = |page: usize, out: &mut Vec<f32>| {
        let mut rng = ChaCha8Rng::seed_from_u64(case.seed ^ KV_POOL_STREAM);
        rng.set_stream(page as u64);
        out.resize(page_elems, 0.0);
        fill_standard_normal(&mut rng, out);
    };
    if case.quant.kv == Dtype::Fp8 {
        // `vec![0u8; n]` is a zeroed allocation: pages never written cost no physical memory.
        let mut pool = vec![0u8; num_pages * page_elems];
        let encode = |logical: &[f32], dst: &mut [u8]| {
            store_page(&dims, logical, dst, |kv, x| {
                let scale = if kv == 0 {
                    scales.k_scale
                } else {
                    scales.v_scale
                };
                f32_to_e4m3(x / scale)
            })
        };
        fill_pages_parallel(&mut pool, page_elems, &pages, page_values, encode);
        Ok(HostTensor::Fp8(pool))
    } else {
        let mut pool = vec![0u16; num_pages * page_elems];
        let encode = |logical: &[f32], dst: &mut [u16]| {
            store_page(&dims, logical, dst, |_, x| bf16::from_f32(x).to_bits())
        };
        fill_pages_parallel(&mut pool, page_elems, &pages, page_values, encode);
        Ok(HostTensor::Bf16(pool.reinterpret_into::<bf16>()))
    }
}

/// Writes one page given in logical `(kv, kv_head, slot, dim)` order into `dst` (one page of the
/// pool in the case's layout), converting each value with `convert(kv_index, x)`.
fn store_page<T>(
    dims: &CaseDims,
    logical: &[f32],
    dst: &mut [T],
    convert: impl Fn(usize, f32) -> T,
) {
    let mut values = logical.iter();
    for kv in 0..2 {
        for kv_head in 0..dims.kv_heads {
            for slot in 0..dims.block {
                let base = dims.kv_offset(0, kv, kv_head, slot);
                for (dst, &x) in dst[base..base + dims.head].iter_mut().zip(&mut values) {
                    *dst = convert(kv, x);
                }
            }
        }
    }
}

/// Fills `pages` (sorted, distinct) of `pool` on all available cores: `draw(page, buffer)` makes
/// a page's logical values and `encode(values, page_slice)` stores them. The pool is cut into
/// disjoint ranges of pages, and each range goes to one thread.
fn fill_pages_parallel<T: Send>(
    pool: &mut [T],
    page_elems: usize,
    pages: &[usize],
    draw: impl Fn(usize, &mut Vec<f32>) + Sync,
    encode: impl Fn(&[f32], &mut [T]) + Sync,
) {
    if page_elems == 0 {
        return;
    }
    let pages_in = |first: usize| {
        let lo = pages.partition_point(|&p| p < first);
        let hi = pages.partition_point(|&p| p < first + POOL_FILL_PAGES_PER_CHUNK);
        &pages[lo..hi]
    };
    let work: Vec<(usize, &mut [T])> = pool
        .chunks_mut(POOL_FILL_PAGES_PER_CHUNK * page_elems)
        .enumerate()
        .map(|(i, range)| (i * POOL_FILL_PAGES_PER_CHUNK, range))
        .filter(|(first, _)| !pages_in(*first).is_empty())
        .collect();
    let threads = available_cores().min(work.len()).max(1);
    let mut per_thread: Vec<Vec<(usize, &mut [T])>> = (0..threads).map(|_| Vec::new()).collect();
    for (n, item) in work.into_iter().enumerate() {
        per_thread[n % threads].push(item);
    }
    let (draw, encode, pages_in) = (&draw, &encode, &pages_in);
    std::thread::scope(|scope| {
        for items in per_thread {
            scope.spawn(move || {
                let mut logical = Vec::with_capacity(page_elems);
                for (first, range) in items {
                    for &page in pages_in(first) {
                        draw(page, &mut logical);
                        let offset = (page - first) * page_elems;
                        encode(&logical, &mut range[offset..offset + page_elems]);
                    }
                }
            });
        }
    });
}

/// Cores this process may use (1 when the OS will not say).
pub(crate) fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Fills `out` with standard-normal values by the Box-Muller transform, two per pair of 64-bit
/// draws. Computed in f64 so the tails are right; stored as f32.
fn fill_standard_normal(rng: &mut ChaCha8Rng, out: &mut [f32]) {
    /// 2^-53: turns the top 53 bits of a u64 into a uniform in [0, 1).
    const UNIT_F64: f64 = 1.0 / (1u64 << 53) as f64;
    for pair in out.chunks_mut(2) {
        // u1 in (0, 1] so ln(u1) is finite; u2 in [0, 1).
        let u1 = ((rng.next_u64() >> 11) + 1) as f64 * UNIT_F64;
        let u2 = (rng.next_u64() >> 11) as f64 * UNIT_F64;
        let radius = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
        pair[0] = (radius * cos) as f32;
        if let Some(second) = pair.get_mut(1) {
            *second = (radius * sin) as f32;
        }
    }
}
