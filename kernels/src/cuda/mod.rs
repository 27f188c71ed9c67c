//! The CUDA backend: decode-attention kernels written in CUDA C++ (`kernels/cuda/*.cu`), compiled
//! at run time by NVRTC for the device's own architecture, cached on disk, launched through
//! `cudarc`, verified against a GPU reference (itself checked against the CPU reference) and timed
//! with CUDA events.
//!
//! `cudarc` loads `libcuda` and `libnvrtc` at run time, so this module builds everywhere; on a
//! machine without a driver [`CudaBackend::probe`] and [`CudaBackend::new`] return an error (never
//! a panic).

mod backend;
mod compile;
mod data;
mod device;
mod launch;
mod library;
mod plan;
pub mod resources;
pub mod selftest;
mod timing;
mod verify;

pub use backend::CudaBackend;
pub use compile::{kernel_source_hash, precompile, CompileCache, Precompiled};
pub use device::DeviceSummary;
pub use plan::{plan_candidates, plan_splits, SplitPlan, MIN_CHUNK_TOKENS};
pub use selftest::{selftest, SelftestOptions, SelftestReport, SelftestRow};

use cudarc::driver::DriverError;
use thiserror::Error;

/// What went wrong while loading CUDA, compiling kernels or talking to the device.
#[derive(Debug, Error)]
pub enum CudaError {
    #[error(
        "the CUDA driver library (libcuda.so) was not found: install the NVIDIA driver, or add the \
         directory that holds libcuda.so.1 to LD_LIBRARY_PATH"
    )]
    DriverLibraryMissing,
    #[error(
        "the NVRTC library (libnvrtc.so) was not found: install the CUDA toolkit's NVRTC, or add \
         its directory (usually /usr/local/cuda/lib64) to LD_LIBRARY_PATH"
    )]
    NvrtcLibraryMissing,
    #[error("CUDA driver call failed while {context}: {source}")]
    Driver {
        context: String,
        #[source]
        source: DriverError,
    },
    #[error(
        "no CUDA device with ordinal {ordinal}: this machine has {count} (ordinals 0..{count})"
    )]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("NVRTC failed while {context}: {message}")]
    Nvrtc { context: String, message: String },
    #[error("NVRTC could not compile the kernels for {arch} (options {options}):\n{log}")]
    Compile {
        arch: String,
        options: String,
        log: String,
    },
    #[error(
        "the GPU cannot be used again in this process after a device error ({detail}); restart \
         the process (CUDA keeps errors such as an illegal memory access until the process exits)"
    )]
    Unrecoverable { detail: String },
    #[error("the CUDA library panicked while {context}: {message}")]
    Panicked { context: String, message: String },
    /// A state the GPU backend's own code should never reach (not the driver's, NVRTC's or the
    /// input's fault).
    #[error(
        "internal error in decodebench's GPU backend while {context}: {message}; this is a bug, \
         please report it with the command line and the grid"
    )]
    Internal { context: String, message: String },
}

impl CudaError {
    pub(crate) fn driver(context: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
        let context = context.into();
        move |source| CudaError::Driver { context, source }
    }
}
