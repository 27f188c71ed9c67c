//! Checking a kernel's output before it is timed: the output buffer is poisoned (NaN patterns)
//! before the run, copied back after it, decoded to f32 exactly as the CPU reference decodes its
//! own quantized outputs, and compared with the GPU reference using the CPU reference's
//! per-dtype tolerances ([`crate::reference::verify_output`]).
//!
//! The same module copies a case's device-generated inputs to the host, so the GPU reference
//! can itself be checked against [`crate::reference::attention_f64`].

use super::data::{dptr, CaseError, CaseInputs, DevicePool};
use super::device::DeviceSession;
use super::CudaError;
use crate::formats::Nvfp4Tensor;
use crate::inputs::{HostInputs, HostTensor};
use crate::reference::{decode_output, verify_output, QuantizedOutput, Verification};
use crate::workload::{BenchCase, Dtype, Scales};
use cudarc::driver::CudaSlice;
use half::bf16;

/// Byte every output buffer is filled with before a verified run: 0xFFFF is a bf16 NaN and 0xFF
/// an e4m3 NaN (and a NaN nvfp4 scale factor), so an element the kernel never writes fails.
pub(crate) const POISON_BYTE: u8 = 0xFF;

/// An output buffer (and nvfp4 scale factors) of one kernel.
pub(crate) struct OutputBuffers {
    pub dtype: Dtype,
    pub values: CudaSlice<u8>,
    pub scale_factors: Option<CudaSlice<u8>>,
}

impl OutputBuffers {
    pub fn poison(&mut self, session: &DeviceSession) -> Result<(), CudaError> {
        memset(session, &mut self.values, POISON_BYTE)?;
        if let Some(sf) = self.scale_factors.as_mut() {
            memset(session, sf, POISON_BYTE)?;
        }
        Ok(())
    }
}

pub(crate) fn memset(
    session: &DeviceSession,
    buf: &mut CudaSlice<u8>,
    value: u8,
) -> Result<(), CudaError> {
    let ptr = dptr(session, buf);
    // SAFETY: `ptr` addresses `buf.len()` bytes owned by `buf`, on the session's stream.
    unsafe {
        cudarc::driver::sys::cuMemsetD8Async(ptr, value, buf.len(), session.stream.cu_stream())
    }
    .result()
    .map_err(CudaError::driver("filling a device buffer"))
}

/// Copies an output back and decodes it to f32 (row-major `[batch, qo_heads, head]`).
pub(crate) fn decode_device_output(
    session: &DeviceSession,
    case: &BenchCase,
    out: &OutputBuffers,
) -> Result<Vec<f32>, CudaError> {
    let scales = Scales::for_case(case);
    let values: Vec<u8> = session
        .stream
        .clone_dtoh(&out.values)
        .map_err(CudaError::driver("copying an output to the host"))?;
    let elems = case.batch_size as usize * case.num_qo_heads as usize * case.head_size as usize;
    let quantized = match out.dtype {
        Dtype::Bf16 => QuantizedOutput::Bf16(
            values
                .chunks_exact(2)
                .take(elems)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        Dtype::Fp8 => QuantizedOutput::Fp8(values.into_iter().take(elems).collect()),
        Dtype::Nvfp4 => {
            let scales_swizzled = match &out.scale_factors {
                Some(sf) => session
                    .stream
                    .clone_dtoh(sf)
                    .map_err(CudaError::driver("copying scale factors to the host"))?,
                None => Vec::new(),
            };
            QuantizedOutput::Nvfp4(Nvfp4Tensor {
                packed: values.into_iter().take(elems / 2).collect(),
                scales_swizzled,
                rows: case.batch_size as usize,
                cols: case.num_qo_heads as usize * case.head_size as usize,
            })
        }
    };
    Ok(decode_output(&quantized, &scales))
}

/// Verifies a decoded output against the reference (f32 from the GPU reference, or f64 from
/// the CPU one).
pub(crate) fn check(
    case: &BenchCase,
    decoded: &[f32],
    reference: &[f64],
    out: Dtype,
) -> Verification {
    verify_output(decoded, reference, out, &Scales::for_case(case))
}

/// The case's device-generated inputs, copied to the host in the CPU reference's types.
pub(crate) fn inputs_to_host(
    session: &DeviceSession,
    case: &BenchCase,
    inputs: &CaseInputs,
    pool: &DevicePool,
) -> Result<HostInputs, CaseError> {
    let q = session
        .stream
        .clone_dtoh(&inputs.q)
        .map_err(CudaError::driver("copying the query to the host"))?;
    let kv = session
        .stream
        .clone_dtoh(&pool.kv)
        .map_err(CudaError::driver("copying the KV pool to the host"))?;
    let to_tensor = |bytes: Vec<u8>, dtype: Dtype, elems: u64| match dtype {
        Dtype::Fp8 => HostTensor::Fp8(bytes.into_iter().take(elems as usize).collect()),
        _ => HostTensor::Bf16(
            bytes
                .chunks_exact(2)
                .take(elems as usize)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
    };
    Ok(HostInputs {
        seq_lens: inputs.seq_lens.clone(),
        block_tables: inputs.block_tables.clone(),
        block_table_width: case.max_blocks_per_seq() as usize,
        scales: Scales::for_case(case),
        q: to_tensor(q, case.quant.q, inputs.q_elems),
        kv_cache: to_tensor(kv, case.quant.kv, pool.elems),
        num_pages: pool.pages as usize,
    })
}
