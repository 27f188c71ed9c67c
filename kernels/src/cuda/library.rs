//! Guards around `cudarc`'s dynamic loading: `cudarc` panics when `libcuda` or `libnvrtc` is
//! missing (or lacks a symbol), so every first touch goes through these checks, which turn both
//! cases into [`CudaError`]s.

use super::CudaError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// Whether `libcuda` can be loaded (checked once per process).
pub(crate) fn driver_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library under its usual names; no symbol is called.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// Whether `libnvrtc` can be loaded (checked once per process).
pub(crate) fn nvrtc_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as above, a dlopen probe only.
    *PRESENT.get_or_init(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
}

pub(crate) fn require_driver() -> Result<(), CudaError> {
    if driver_available() {
        Ok(())
    } else {
        Err(CudaError::DriverLibraryMissing)
    }
}

pub(crate) fn require_nvrtc() -> Result<(), CudaError> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(CudaError::NvrtcLibraryMissing)
    }
}

/// Runs `f`, turning a panic inside `cudarc` (a symbol missing from an old driver, say) into an
/// error instead of unwinding through the caller.
pub(crate) fn guarded<T>(
    context: &str,
    f: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(CudaError::Panicked {
                context: context.to_string(),
                message,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_turns_a_panic_into_an_error() {
        let r: Result<(), CudaError> = guarded("testing", || panic!("boom"));
        match r {
            Err(CudaError::Panicked { context, message }) => {
                assert_eq!(context, "testing");
                assert_eq!(message, "boom");
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert_eq!(guarded("ok", || Ok(7)).unwrap(), 7);
    }

    #[test]
    fn library_probes_do_not_panic() {
        // Either answer is fine; what matters is that probing never aborts the process.
        let _ = driver_available();
        let _ = nvrtc_available();
        if !driver_available() {
            assert!(matches!(
                require_driver(),
                Err(CudaError::DriverLibraryMissing)
            ));
        }
    }
}
