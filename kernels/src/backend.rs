//! The seam between "what to run" and "where it runs": CPU and CUDA implement one trait, so the
//! agent, the tests and the self-test drive either the same way.

use crate::measurement::{CaseMeasurement, DeviceIdentity, Telemetry};
use crate::workload::BenchCase;

/// Samples device telemetry around a timed region. The agent passes an NVML-backed probe; tests and
/// the CPU backend can pass [`NoTelemetry`].
pub trait TelemetryProbe: Send {
    /// Called right before the timed trials of one kernel start.
    fn begin(&mut self);
    /// Called right after they end. `calls` is the number of kernel calls inside the timed region
    /// (for energy per call).
    fn end(&mut self, calls: u64) -> Telemetry;
}

/// A probe that records nothing: every telemetry field stays null.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTelemetry;

impl TelemetryProbe for NoTelemetry {
    fn begin(&mut self) {}
    fn end(&mut self, _calls: u64) -> Telemetry {
        Telemetry::default()
    }
}

/// Runs benchmark cases on one device.
pub trait Backend: Send {
    /// The device this backend runs on, recorded once and joined to every result row.
    fn identity(&self) -> &DeviceIdentity;

    /// Builds the case's inputs, runs both kernels, verifies each against the reference and times
    /// the ones that are right. Problems with the case (unsupported, out of memory, wrong result, a
    /// device error) come back as statuses on the kernel measurements, never as a panic.
    fn run_case(&mut self, case: &BenchCase, probe: &mut dyn TelemetryProbe) -> CaseMeasurement;

    /// True when the device can no longer be used by this process (a CUDA error such as an
    /// illegal memory access stays with the process until it exits): every later case would
    /// fail, so the caller should report and exit, letting a fresh process take over.
    fn needs_restart(&self) -> bool {
        false
    }

    /// Fault drills (the agent's `DECODEBENCH_FAILPOINT=device-fault:CASE`): makes the device
    /// fault as a broken kernel would, leaving it as a real fault does. Returns what happened, or
    /// why this backend cannot fault (the CPU backend has no device).
    fn inject_device_fault(&mut self) -> Result<String, String> {
        Err("this backend has no device to fault (device-fault needs the CUDA backend)".into())
    }

    /// Fault drills (the agent's `DECODEBENCH_FAILPOINT=disturb:CASE`): the next case's optimized
    /// kernel gives a corrupted output from its second call on, as a kernel whose calls race
    /// with each other would, so that the check of the output its timed calls left is drilled
    /// end to end. Returns what was armed, or why this backend cannot.
    fn disturb_next_case(&mut self) -> Result<String, String> {
        Err("this backend cannot disturb a kernel's calls (disturb needs the CPU backend)".into())
    }
}
