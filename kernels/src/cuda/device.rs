//! One CUDA device: probing what is installed, opening a context with the kernels loaded, and
//! the identity recorded with every result.

use super::compile::{
    compile_program_cached, kernel_source_hash, nvrtc_supported_archs, nvrtc_version, target_for,
    CompileCache, CompileTarget, CompiledModule,
};
use super::launch::{all_kernel_names, KernelLimits};
use super::library::{guarded, require_driver};
use super::CudaError;
use crate::measurement::DeviceIdentity;
use cudarc::driver::result as drv;
use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A CUDA device as the driver lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    pub ordinal: usize,
    pub name: String,
    pub uuid: String,
    pub pci_bus_id: String,
    /// "major.minor"
    pub compute_capability: String,
    pub sm_count: u32,
    pub memory_bytes: u64,
}

fn attr(dev: sys::CUdevice, a: CUdevice_attribute, what: &str) -> Result<i32, CudaError> {
    // SAFETY: `dev` came from cuDeviceGet after a successful cuInit.
    unsafe { drv::device::get_attribute(dev, a) }
        .map_err(CudaError::driver(format!("reading {what}")))
}

/// NVML-style UUID text ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx") of a CUDA device UUID.
pub(crate) fn format_uuid(bytes: &[u8; 16]) -> String {
    let h = hex::encode(bytes);
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// NVML-style PCI bus id ("00000000:3B:00.0"), so the agent can match it with NVML's.
pub(crate) fn format_pci_bus_id(domain: i32, bus: i32, device: i32) -> String {
    format!("{domain:08X}:{bus:02X}:{device:02X}.0")
}

fn summarize(ordinal: usize) -> Result<(DeviceSummary, sys::CUdevice), CudaError> {
    let dev = drv::device::get(ordinal as i32)
        .map_err(CudaError::driver(format!("opening device {ordinal}")))?;
    let name = drv::device::get_name(dev).map_err(CudaError::driver("reading the device name"))?;
    let uuid = drv::device::get_uuid(dev).map_err(CudaError::driver("reading the device UUID"))?;
    let uuid_bytes: [u8; 16] = uuid.bytes.map(|b| b as u8);
    // SAFETY: valid device handle.
    let memory_bytes = unsafe { drv::device::total_mem(dev) }
        .map_err(CudaError::driver("reading the device memory size"))?
        as u64;
    let major = attr(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        "the compute capability",
    )?;
    let minor = attr(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        "the compute capability",
    )?;
    let sm_count = attr(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        "the SM count",
    )?;
    let domain = attr(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID,
        "the PCI domain",
    )?;
    let bus = attr(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID,
        "the PCI bus",
    )?;
    let pci_dev = attr(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID,
        "the PCI device",
    )?;
    Ok((
        DeviceSummary {
            ordinal,
            name,
            uuid: format_uuid(&uuid_bytes),
            pci_bus_id: format_pci_bus_id(domain, bus, pci_dev),
            compute_capability: format!("{major}.{minor}"),
            sm_count: sm_count.max(0) as u32,
            memory_bytes,
        },
        dev,
    ))
}

/// The CUDA devices on this machine. Errors (never panics) when there is no driver.
pub(crate) fn probe_devices() -> Result<Vec<DeviceSummary>, CudaError> {
    require_driver()?;
    guarded("probing CUDA devices", || {
        drv::init().map_err(CudaError::driver("initializing the CUDA driver (cuInit)"))?;
        let count = drv::device::get_count().map_err(CudaError::driver("counting devices"))?;
        (0..count.max(0) as usize)
            .map(|i| summarize(i).map(|(s, _)| s))
            .collect()
    })
}

/// The CUDA driver's version, as "major.minor".
fn cuda_driver_version() -> Result<String, CudaError> {
    let mut v = 0;
    // SAFETY: valid out-pointer, driver initialized.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(CudaError::driver("reading the CUDA driver version"))?;
    Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// Properties of the device the kernels and the planner need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceProps {
    pub sm_count: u32,
    pub l2_bytes: u64,
    pub compute_major: i32,
    pub compute_minor: i32,
    /// The most dynamic shared memory one CTA may opt in to (227 KiB on Hopper, 163 KiB on an
    /// A100, 99 KiB on sm_86/sm_89).
    pub max_smem_per_block: u32,
}

impl DeviceProps {
    pub fn kernel_limits(&self) -> KernelLimits {
        KernelLimits {
            compute_major: self.compute_major,
            max_smem_per_block: self.max_smem_per_block,
        }
    }
}

/// How the module was obtained at this start.
#[derive(Debug, Clone)]
pub(crate) struct ModuleOrigin {
    pub target: CompileTarget,
    pub from_cache: bool,
    pub elapsed: Duration,
}

/// Which kind of CUDA context a session opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContextKind {
    /// The device's primary context (shared with any other user in the process).
    Primary,
    /// A context of our own (`cuCtxCreate`), used when the primary one cannot be recreated.
    Own,
}

/// An open context on one device with the kernel module loaded and one stream to work on.
pub(crate) struct DeviceSession {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
    pub props: DeviceProps,
    pub origin: ModuleOrigin,
    pub kind: ContextKind,
}

impl DeviceSession {
    /// Opens device `ordinal`: context, stream, kernels (compiled or from the cache).
    pub fn open(
        ordinal: usize,
        cache: &CompileCache,
        kind: ContextKind,
    ) -> Result<DeviceSession, CudaError> {
        require_driver()?;
        guarded("opening the CUDA device", || {
            drv::init().map_err(CudaError::driver("initializing the CUDA driver (cuInit)"))?;
            let count = drv::device::get_count().map_err(CudaError::driver("counting devices"))?;
            if ordinal >= count.max(0) as usize {
                return Err(CudaError::NoSuchDevice {
                    ordinal,
                    count: count.max(0) as usize,
                });
            }
            let ctx = CudaContext::new(ordinal).map_err(CudaError::driver(format!(
                "creating a context on device {ordinal}"
            )))?;
            // One stream, no cross-stream hazards: cudarc's per-buffer event tracking would only
            // add work to every launch and get in the way of graph capture.
            // SAFETY: called before any buffer or stream exists in this context.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx
                .new_stream()
                .map_err(CudaError::driver("creating a stream"))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(CudaError::driver("reading the compute capability"))?;
            let sm_count = ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(CudaError::driver("reading the SM count"))?;
            let l2 = ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
                .map_err(CudaError::driver("reading the L2 size"))?;
            let smem = ctx
                .attribute(
                    CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
                .map_err(CudaError::driver("reading the shared memory per block"))?;
            let props = DeviceProps {
                sm_count: sm_count.max(1) as u32,
                l2_bytes: l2.max(0) as u64,
                compute_major: major,
                compute_minor: minor,
                max_smem_per_block: smem.max(0) as u32,
            };

            let started = Instant::now();
            let supported = nvrtc_supported_archs()?;
            let target = target_for(major, minor, &supported);
            let build = compile_program_cached(cache, &target, &nvrtc_version()?)?;
            let from_cache = build.from_cache;
            let ptx = match build.module {
                CompiledModule::Cubin(bytes) => Ptx::from_binary(bytes),
                CompiledModule::Ptx(text) => Ptx::from_src(text),
            };
            let module = ctx.load_module(ptx).map_err(CudaError::driver(format!(
                "loading the kernel module ({})",
                target.label()
            )))?;
            let mut functions = HashMap::new();
            for name in all_kernel_names() {
                let f = module
                    .load_function(&name)
                    .map_err(CudaError::driver(format!("looking up kernel {name}")))?;
                functions.insert(name, f);
            }
            let origin = ModuleOrigin {
                target,
                from_cache,
                elapsed: started.elapsed(),
            };
            Ok(DeviceSession {
                ctx,
                stream,
                _module: module,
                functions,
                props,
                origin,
                kind,
            })
        })
    }

    /// The kernel named `name` (every name in [`all_kernel_names`] is loaded at open).
    pub fn function(&self, name: &str) -> Option<&CudaFunction> {
        self.functions.get(name)
    }

    /// Identity of this device as CUDA reports it (NVML fields are left to the agent).
    pub fn identity(&self, ordinal: usize) -> Result<DeviceIdentity, CudaError> {
        let (summary, _) = summarize(ordinal)?;
        Ok(DeviceIdentity {
            backend: "cuda".to_string(),
            name: summary.name.clone(),
            uuid: summary.uuid,
            serial: None,
            pci_bus_id: Some(summary.pci_bus_id),
            sku: summary.name,
            compute_capability: Some(summary.compute_capability),
            sm_count: Some(summary.sm_count),
            memory_bytes: Some(summary.memory_bytes),
            driver_version: None,
            cuda_driver_version: Some(cuda_driver_version()?),
            nvrtc_version: Some(nvrtc_version()?),
            vbios_version: None,
            power_limit_w: None,
            ecc_enabled: None,
            mig_enabled: None,
            calibrated_read_gbps: None,
            kernel_source_hash: Some(kernel_source_hash()),
            host: crate::host::host_name(),
        })
    }

    /// Free and total device memory, bytes.
    pub fn memory(&self) -> Result<(u64, u64), CudaError> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(CudaError::driver("reading free device memory"))?;
        Ok((free as u64, total as u64))
    }
}

/// Resets device `ordinal`'s primary context after a sticky error: every allocation and module
/// in it is gone afterwards. Call only once every object of the old context has been dropped.
pub(crate) fn reset_primary_context(ordinal: usize) -> Result<(), CudaError> {
    require_driver()?;
    guarded("resetting the CUDA context", || {
        let dev = drv::device::get(ordinal as i32)
            .map_err(CudaError::driver(format!("opening device {ordinal}")))?;
        // SAFETY: no object of the old context is alive (the caller dropped the session).
        unsafe { sys::cuDevicePrimaryCtxReset_v2(dev) }
            .result()
            .map_err(CudaError::driver("resetting the primary context"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_and_pci_text_match_nvml_style() {
        let bytes: [u8; 16] = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(
            format_uuid(&bytes),
            "GPU-12345678-9abc-def0-0123-456789abcdef"
        );
        assert_eq!(format_pci_bus_id(0, 0x3b, 0), "00000000:3B:00.0");
    }

    #[test]
    fn probe_errors_instead_of_panicking_without_a_driver() {
        match probe_devices() {
            Ok(devices) => {
                // A machine with a driver: whatever it lists must be well-formed.
                for d in devices {
                    assert!(d.uuid.starts_with("GPU-"));
                }
            }
            Err(e) => {
                let text = e.to_string();
                assert!(!text.is_empty());
                if !super::super::library::driver_available() {
                    assert!(matches!(e, CudaError::DriverLibraryMissing), "{e}");
                }
            }
        }
    }
}
