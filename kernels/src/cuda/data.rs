//! A case's data on the device: the KV pool (generated there, reused by consecutive cases with
//! the same [`BenchCase::pool_key`]), the query, sequence lengths and block tables, and the bf16
//! copies the baseline reads. Nothing large crosses PCIe: only the lengths and tables are copied.
//!
//! Every allocation is checked against free memory first and its failure is reported as
//! [`CaseError::Oom`] with the sizes, so the backend can report the case and carry on.

use super::device::DeviceSession;
use super::launch::{launch_dequant, launch_generate_kv, launch_generate_q};
use super::CudaError;
use crate::workload::{draw_block_tables, draw_seq_lens, BenchCase, Dtype, Scales};
use cudarc::driver::sys::cudaError_enum;
use cudarc::driver::{CudaSlice, DevicePtr};

/// Memory left free beyond a case's own needs: the driver, the module, the merge workspace and
/// small per-launch allocations need some, and running the card to its last byte makes the
/// driver itself fail.
pub(crate) const MEMORY_HEADROOM_BYTES: u64 = 512 << 20;

/// Hash-stream salts of the device generator (independent Q and KV streams from one seed).
const Q_STREAM_SALT: u64 = 0x51_0001;
const KV_STREAM_SALT: u64 = 0x4b56_0002;

/// Why a case could not run, before any kernel-specific status applies.
#[derive(Debug)]
pub(crate) enum CaseError {
    /// Not enough device memory; the message gives the sizes.
    Oom(String),
    /// A CUDA error; the context may be unusable.
    Device(CudaError),
}

impl From<CudaError> for CaseError {
    fn from(e: CudaError) -> Self {
        CaseError::Device(e)
    }
}

pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Fails with `Oom` when `need` bytes (plus headroom) are not free.
pub(crate) fn ensure_free(session: &DeviceSession, need: u64, what: &str) -> Result<(), CaseError> {
    // Freed stream-ordered allocations return to the device at a synchronization point.
    session
        .stream
        .synchronize()
        .map_err(CudaError::driver("synchronizing before a memory check"))?;
    let (free, total) = session.memory()?;
    if need.saturating_add(MEMORY_HEADROOM_BYTES) > free {
        return Err(CaseError::Oom(format!(
            "{what} needs {} (+{} headroom) but only {} of {} are free",
            gib(need),
            gib(MEMORY_HEADROOM_BYTES),
            gib(free),
            gib(total)
        )));
    }
    Ok(())
}

/// Allocates `bytes` (at least 16) on the session's stream; out-of-memory becomes `Oom`.
pub(crate) fn alloc_bytes(
    session: &DeviceSession,
    bytes: u64,
    what: &str,
) -> Result<CudaSlice<u8>, CaseError> {
    let n = bytes.max(16) as usize;
    // SAFETY: the buffer is written by a kernel or a copy before anything reads it.
    match unsafe { session.stream.alloc::<u8>(n) } {
        Ok(s) => Ok(s),
        Err(e) if e.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => Err(CaseError::Oom(format!(
            "allocating {what} ({}) failed: out of device memory",
            gib(bytes)
        ))),
        Err(e) => Err(CaseError::Device(CudaError::Driver {
            context: format!("allocating {what}"),
            source: e,
        })),
    }
}

/// Raw device address of a buffer (for the kernels' parameter block).
pub(crate) fn dptr<T>(session: &DeviceSession, s: &CudaSlice<T>) -> u64 {
    let (p, _guard) = s.device_ptr(&session.stream);
    p
}

/// Bytes per stored element of an input dtype.
pub(crate) fn element_bytes(d: Dtype) -> u64 {
    if d == Dtype::Fp8 {
        1
    } else {
        2
    }
}

/// A case's KV pool on the device.
pub(crate) struct DevicePool {
    pub key: String,
    pub pages: u64,
    pub elems: u64,
    pub kv: CudaSlice<u8>,
    /// bf16 copy with the scales applied, made for the baseline when the pool is fp8.
    pub bf16_copy: Option<CudaSlice<u8>>,
}

/// Elements of the pool `case` needs.
pub(crate) fn pool_elems(case: &BenchCase, pages: u64) -> u64 {
    pages * 2 * case.num_kv_heads as u64 * case.block_size as u64 * case.head_size as u64
}

/// Makes `slot` hold the pool `case` needs: kept when the key matches, otherwise dropped and
/// generated afresh on the device.
pub(crate) fn ensure_pool(
    session: &DeviceSession,
    case: &BenchCase,
    seq_lens: &[u32],
    slot: &mut Option<DevicePool>,
) -> Result<(), CaseError> {
    let key = case.pool_key();
    if slot.as_ref().is_some_and(|p| p.key == key) {
        return Ok(());
    }
    *slot = None;
    let pages = case.pool_pages(seq_lens) as u64;
    let elems = pool_elems(case, pages);
    let bytes = elems * element_bytes(case.quant.kv);
    ensure_free(session, bytes, &format!("the KV pool ({pages} pages)"))?;
    let kv = alloc_bytes(session, bytes, "the KV pool")?;
    let scales = Scales::for_case(case);
    launch_generate_kv(
        session,
        dptr(session, &kv),
        elems,
        case,
        case.seed,
        KV_STREAM_SALT,
        scales.k_scale,
        scales.v_scale,
    )?;
    *slot = Some(DevicePool {
        key,
        pages,
        elems,
        kv,
        bf16_copy: None,
    });
    Ok(())
}

/// Makes the pool's bf16 copy for the baseline (fp8 pools only; a bf16 pool is its own copy).
pub(crate) fn ensure_pool_bf16(
    session: &DeviceSession,
    case: &BenchCase,
    pool: &mut DevicePool,
) -> Result<(), CaseError> {
    if case.quant.kv != Dtype::Fp8 || pool.bf16_copy.is_some() {
        return Ok(());
    }
    let bytes = pool.elems * 2;
    ensure_free(
        session,
        bytes,
        "the baseline's bf16 copy of the fp8 KV pool",
    )?;
    let copy = alloc_bytes(session, bytes, "the bf16 KV pool copy")?;
    let scales = Scales::for_case(case);
    let half = case.num_kv_heads as u64 * case.block_size as u64 * case.head_size as u64;
    launch_dequant(
        session,
        dptr(session, &copy),
        dptr(session, &pool.kv),
        pool.elems,
        half,
        scales.k_scale,
        scales.v_scale,
    )?;
    pool.bf16_copy = Some(copy);
    Ok(())
}

/// Per-case inputs besides the pool.
pub(crate) struct CaseInputs {
    pub seq_lens: Vec<u32>,
    pub block_tables: Vec<i32>,
    pub d_seq_lens: CudaSlice<i32>,
    pub d_tables: CudaSlice<i32>,
    /// Q in the case's q dtype.
    pub q: CudaSlice<u8>,
    pub q_elems: u64,
}

/// Sequence lengths and block tables of `case` (host), drawn as the workload defines.
pub(crate) fn host_schedule(case: &BenchCase) -> (Vec<u32>, Vec<i32>) {
    let seq_lens = draw_seq_lens(case);
    let tables = draw_block_tables(case, &seq_lens);
    (seq_lens, tables)
}

/// Q generated on the device and the small tables copied over.
pub(crate) fn build_inputs(
    session: &DeviceSession,
    case: &BenchCase,
    seq_lens: Vec<u32>,
    block_tables: Vec<i32>,
) -> Result<CaseInputs, CaseError> {
    let q_elems = case.batch_size as u64 * case.num_qo_heads as u64 * case.head_size as u64;
    let q_bytes = q_elems * element_bytes(case.quant.q);
    let small = (seq_lens.len() + block_tables.len()) as u64 * 4;
    ensure_free(session, q_bytes + small, "the query and block tables")?;
    let q = alloc_bytes(session, q_bytes, "the query")?;
    let scales = Scales::for_case(case);
    launch_generate_q(
        session,
        dptr(session, &q),
        q_elems,
        case.quant.q,
        case.seed,
        Q_STREAM_SALT,
        scales.q_scale,
    )?;
    let lens_i32: Vec<i32> = seq_lens.iter().map(|&s| s as i32).collect();
    let d_seq_lens = session
        .stream
        .clone_htod(&lens_i32)
        .map_err(CudaError::driver("copying sequence lengths"))?;
    let tables_src: &[i32] = if block_tables.is_empty() {
        &[0]
    } else {
        &block_tables
    };
    let d_tables = session
        .stream
        .clone_htod(tables_src)
        .map_err(CudaError::driver("copying block tables"))?;
    Ok(CaseInputs {
        seq_lens,
        block_tables,
        d_seq_lens,
        d_tables,
        q,
        q_elems,
    })
}

/// bf16 copy of an fp8 query (scale applied) for the baseline.
pub(crate) fn query_bf16(
    session: &DeviceSession,
    case: &BenchCase,
    inputs: &CaseInputs,
) -> Result<CudaSlice<u8>, CaseError> {
    let bytes = inputs.q_elems * 2;
    ensure_free(session, bytes, "the baseline's bf16 query")?;
    let out = alloc_bytes(session, bytes, "the bf16 query")?;
    let scales = Scales::for_case(case);
    launch_dequant(
        session,
        dptr(session, &out),
        dptr(session, &inputs.q),
        inputs.q_elems,
        0,
        scales.q_scale,
        scales.q_scale,
    )?;
    Ok(out)
}

/// Output buffer sizes of `case` in `out` dtype: (values bytes, nvfp4 scale-factor bytes).
pub(crate) fn output_bytes(case: &BenchCase, out: Dtype) -> (u64, u64) {
    let elems = case.batch_size as u64 * case.num_qo_heads as u64 * case.head_size as u64;
    match out {
        Dtype::Bf16 => (elems * 2, 0),
        Dtype::Fp8 => (elems, 0),
        Dtype::Nvfp4 => {
            let cols = (case.num_qo_heads * case.head_size / 16) as u64;
            let rows = (case.batch_size as u64).div_ceil(128) * 128;
            (elems / 2, rows * cols.div_ceil(4) * 4)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{KvPool, QuantMode};

    #[test]
    fn output_sizes_follow_the_dtype() {
        let case = BenchCase {
            num_qo_heads: 8,
            num_kv_heads: 1,
            head_size: 64,
            pool: KvPool::Unique,
            ..BenchCase::reference_shape(3, 10, QuantMode::FP8_QKV_NVFP4_OUT)
        };
        assert_eq!(output_bytes(&case, Dtype::Bf16), (3 * 8 * 64 * 2, 0));
        assert_eq!(output_bytes(&case, Dtype::Fp8), (3 * 8 * 64, 0));
        // 32 scale columns, rows padded to 128.
        assert_eq!(output_bytes(&case, Dtype::Nvfp4), (3 * 8 * 32, 128 * 32));
        assert_eq!(pool_elems(&case, 5), 5 * 2 * 16 * 64);
    }
}
