//! Picking and opening a backend: CUDA when asked for (or when `auto` finds a GPU), else the CPU
//! backend. Telemetry comes with the backend: NVML for a GPU, none for the CPU.

use crate::identity::{merge_into, nvml_identity, DeviceSelector};
use crate::telemetry::probe_for;
use decodebench_kernels::cpu::CpuBackend;
use decodebench_kernels::cuda::CudaBackend;
use decodebench_kernels::{
    Backend, BenchCase, CaseMeasurement, DeviceIdentity, NoTelemetry, TelemetryProbe,
};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Cuda,
    Cpu,
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("the CUDA backend is unavailable: {0}. Use --backend cpu to run on the CPU, or check the NVIDIA driver (nvidia-smi) and that libcuda/libnvrtc are on LD_LIBRARY_PATH")]
    CudaUnavailable(String),
    #[error("GPU {ordinal} does not exist: {count} GPU(s) visible")]
    NoSuchGpu { ordinal: usize, count: usize },
}

/// A backend ready to run, with the telemetry probe that belongs to its device.
pub struct OpenedBackend {
    pub backend: Box<dyn Backend>,
    pub probe: Box<dyn TelemetryProbe>,
}

/// How many CUDA devices are visible, or why none are.
pub fn cuda_device_count() -> Result<usize, String> {
    CudaBackend::probe()
        .map(|v| v.len())
        .map_err(|e| e.to_string())
}

/// The model name of each visible CUDA device, by ordinal (the SKU its results carry), without
/// creating a context on any of them.
pub fn cuda_device_names() -> Result<Vec<String>, String> {
    CudaBackend::probe()
        .map(|v| v.into_iter().map(|d| d.name).collect())
        .map_err(|e| e.to_string())
}

/// Opens the CPU backend.
pub fn open_cpu() -> OpenedBackend {
    OpenedBackend {
        backend: Box::new(CpuBackend::new()),
        probe: Box::new(NoTelemetry),
    }
}

/// Opens the CUDA backend on `ordinal`, with NVML identity merged in and an NVML telemetry probe
/// (or none, with one warning, when NVML is unavailable).
pub fn open_cuda(ordinal: usize) -> Result<OpenedBackend, BackendError> {
    let count = cuda_device_count().map_err(BackendError::CudaUnavailable)?;
    if ordinal >= count {
        return Err(BackendError::NoSuchGpu { ordinal, count });
    }
    let backend =
        CudaBackend::new(ordinal).map_err(|e| BackendError::CudaUnavailable(e.to_string()))?;
    let mut identity = backend.identity().clone();
    let selector =
        DeviceSelector::for_cuda_device(&identity).unwrap_or(DeviceSelector::Index(ordinal as u32));
    match nvml_identity(&selector) {
        Ok(nvml) => merge_into(&mut identity, &nvml),
        Err(e) => tracing::warn!(error = %e, "NVML identity unavailable; those columns stay null"),
    }
    let probe = probe_for(selector);
    Ok(OpenedBackend {
        backend: Box::new(IdentifiedBackend {
            inner: Box::new(backend),
            identity,
        }),
        probe,
    })
}

/// A backend whose identity was completed from NVML (serial, VBIOS, power limit, ECC, MIG...).
struct IdentifiedBackend {
    inner: Box<dyn Backend>,
    identity: DeviceIdentity,
}

impl Backend for IdentifiedBackend {
    fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    fn run_case(&mut self, case: &BenchCase, probe: &mut dyn TelemetryProbe) -> CaseMeasurement {
        self.inner.run_case(case, probe)
    }

    fn needs_restart(&self) -> bool {
        self.inner.needs_restart()
    }

    fn inject_device_fault(&mut self) -> Result<String, String> {
        self.inner.inject_device_fault()
    }
}
