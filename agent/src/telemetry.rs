//! NVML telemetry around timed regions: what the GPU's power, temperature, clocks and clock-event
//! (throttle) reasons were while a kernel was being timed.
//!
//! A timing is only comparable with another if the GPU ran at comparable clocks; this module records
//! the evidence next to every measurement. A background thread samples NVML every
//! [`NVML_SAMPLE_PERIOD_MS`] while a region is open, and the total-energy counter is read at both
//! ends of the region for energy per call. The thread lives as long as the probe and sleeps between
//! regions, so timing a kernel never pays for a thread spawn.
//!
//! NVML is loaded at run time: on a machine without the NVIDIA driver [`NvmlTelemetry::open`] fails
//! with a [`TelemetryError`] and [`probe_for`] falls back to [`NoTelemetry`] with one warning, so the
//! same binary runs (with null telemetry) everywhere. A reading a GPU does not support stays `None`.
//!
//! The aggregation ([`summarize`]) is a pure function over samples so it is tested without a GPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use decodebench_kernels::{NoTelemetry, Telemetry, TelemetryProbe};
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_POWER_INSTANT};
use nvml_wrapper::{Device, Nvml};

use crate::identity::resolve_device;
pub use crate::identity::DeviceSelector;

/// Period of the NVML sampler, in milliseconds. The driver refreshes power, clocks and clock-event
/// reasons on a 10-20 ms cadence, so sampling faster mostly re-reads the same values; 10 ms still
/// gives several samples inside a timed region of a few tens of milliseconds. One sample is about
/// six driver calls (tens of microseconds each), well under 1 % of one CPU core at this period, and
/// it runs on its own thread, not the one launching kernels.
pub const NVML_SAMPLE_PERIOD_MS: u64 = 10;

/// Millijoules per joule, for the energy counter (NVML reports mJ).
const MILLIJOULES_PER_JOULE: f64 = 1000.0;
/// Milliwatts per watt, for power readings (NVML reports mW).
const MILLIWATTS_PER_WATT: f64 = 1000.0;

/// Why NVML telemetry or identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "NVML is not available ({source}): install the NVIDIA driver (libnvidia-ml.so.1) and, in a \
         container, run with the NVIDIA container runtime; until then telemetry is recorded as null"
    )]
    NvmlUnavailable {
        #[source]
        source: NvmlError,
    },
    #[error(
        "no GPU matches `{selector}` among the {count} GPUs NVML sees: pass an NVML index \
         (0..{count}), a UUID (GPU-...) or a PCI bus id (0000:1b:00.0); NVML ignores \
         CUDA_VISIBLE_DEVICES, so prefer the UUID or PCI bus id of the CUDA device"
    )]
    DeviceNotFound {
        selector: DeviceSelector,
        count: u32,
    },
    #[error("NVML could not open GPU `{selector}` ({source}): check the selector and that the GPU is healthy (nvidia-smi)")]
    DeviceOpen {
        selector: DeviceSelector,
        #[source]
        source: NvmlError,
    },
    #[error("NVML query `{what}` failed ({source}): check the GPU with nvidia-smi")]
    Query {
        what: &'static str,
        #[source]
        source: NvmlError,
    },
    #[error(
        "`{input}` is not a GPU selector: use an NVML index (0), a UUID (GPU-... or MIG-...) or a \
         PCI bus id (0000:1b:00.0)"
    )]
    InvalidSelector { input: String },
}

/// One NVML reading of the GPU's state. A field is `None` when the GPU or driver does not give it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetrySample {
    pub power_w: Option<f64>,
    pub gpu_temp_c: Option<f64>,
    pub mem_temp_c: Option<f64>,
    pub sm_clock_mhz: Option<f64>,
    pub mem_clock_mhz: Option<f64>,
    pub gpu_util_pct: Option<f64>,
    /// Raw NVML clock-event reason bits (`nvmlClocksEventReason*`); names via
    /// [`clock_event_reason_names`].
    pub clock_event_bits: Option<u64>,
}

/// The clock-event reasons with their readable names, in NVML bit order (so a given set always
/// prints the same way).
fn clock_event_reason_table() -> [(u64, &'static str); 9] {
    [
        (ThrottleReasons::GPU_IDLE.bits(), "gpu_idle"),
        (
            ThrottleReasons::APPLICATIONS_CLOCKS_SETTING.bits(),
            "applications_clocks",
        ),
        (ThrottleReasons::SW_POWER_CAP.bits(), "sw_power_cap"),
        (ThrottleReasons::HW_SLOWDOWN.bits(), "hw_slowdown"),
        (ThrottleReasons::SYNC_BOOST.bits(), "sync_boost"),
        (
            ThrottleReasons::SW_THERMAL_SLOWDOWN.bits(),
            "sw_thermal_slowdown",
        ),
        (
            ThrottleReasons::HW_THERMAL_SLOWDOWN.bits(),
            "hw_thermal_slowdown",
        ),
        (
            ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN.bits(),
            "hw_power_brake",
        ),
        (
            ThrottleReasons::DISPLAY_CLOCK_SETTING.bits(),
            "display_clocks",
        ),
    ]
}

/// Readable names of the clock-event reason bits set in `bits`, in NVML bit order. Bits this
/// version does not know are named `unknown_0x<bit>` rather than dropped.
pub fn clock_event_reason_names(bits: u64) -> Vec<String> {
    let table = clock_event_reason_table();
    let mut names = Vec::new();
    for bit in (0..u64::BITS).map(|shift| 1u64 << shift) {
        if bits & bit == 0 {
            continue;
        }
        match table.iter().find(|(known, _)| *known == bit) {
            Some((_, name)) => names.push((*name).to_string()),
            None => names.push(format!("unknown_{bit:#x}")),
        }
    }
    names
}

/// Minimum, maximum and mean of the readings of one field that were actually taken.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FieldSummary {
    min: f64,
    max: f64,
    mean: f64,
}

impl FieldSummary {
    /// `None` when no sample carried the field, so an unread field stays null rather than zero.
    fn over(
        samples: &[TelemetrySample],
        field: impl Fn(&TelemetrySample) -> Option<f64>,
    ) -> Option<FieldSummary> {
        let mut count = 0usize;
        let mut sum = 0.0;
        let mut min = f64::INFINITY;
        let mut max = f64::NEG_INFINITY;
        for value in samples.iter().filter_map(field).filter(|v| v.is_finite()) {
            count += 1;
            sum += value;
            min = min.min(value);
            max = max.max(value);
        }
        (count > 0).then(|| FieldSummary {
            min,
            max,
            mean: sum / count as f64,
        })
    }
}

/// Energy used between two reads of NVML's total-energy counter (mJ), or `None` when it is unknown:
/// a read failed, or the counter did not advance. A GPU running kernels always draws energy, so a
/// zero delta means the counter was not refreshed within the region (it updates on the order of
/// tens of milliseconds), and a decrease means it was reset (driver reload); neither is a reading.
pub fn energy_delta_mj(at_begin_mj: Option<u64>, at_end_mj: Option<u64>) -> Option<u64> {
    match (at_begin_mj, at_end_mj) {
        (Some(begin), Some(end)) if end > begin => Some(end - begin),
        _ => None,
    }
}

/// Aggregates the samples of one timed region into a [`Telemetry`]. `energy_delta_mj` is the energy
/// the region used (see [`energy_delta_mj`]) and `calls` the number of kernel calls in it.
pub fn summarize(
    samples: &[TelemetrySample],
    energy_delta_mj: Option<u64>,
    calls: u64,
) -> Telemetry {
    let power = FieldSummary::over(samples, |s| s.power_w);
    let temp = FieldSummary::over(samples, |s| s.gpu_temp_c);
    let mem_temp = FieldSummary::over(samples, |s| s.mem_temp_c);
    let sm_clock = FieldSummary::over(samples, |s| s.sm_clock_mhz);
    let mem_clock = FieldSummary::over(samples, |s| s.mem_clock_mhz);
    let util = FieldSummary::over(samples, |s| s.gpu_util_pct);
    let reason_bits = samples
        .iter()
        .filter_map(|s| s.clock_event_bits)
        .fold(0u64, |acc, bits| acc | bits);
    let energy_per_call_j = match energy_delta_mj {
        Some(delta) if calls > 0 => Some(delta as f64 / MILLIJOULES_PER_JOULE / calls as f64),
        _ => None,
    };
    Telemetry {
        power_avg_w: power.map(|p| p.mean),
        power_max_w: power.map(|p| p.max),
        energy_per_call_j,
        temp_avg_c: temp.map(|t| t.mean),
        temp_max_c: temp.map(|t| t.max),
        mem_temp_max_c: mem_temp.map(|t| t.max),
        sm_clock_min_mhz: sm_clock.map(|c| c.min),
        sm_clock_avg_mhz: sm_clock.map(|c| c.mean),
        mem_clock_min_mhz: mem_clock.map(|c| c.min),
        mem_clock_avg_mhz: mem_clock.map(|c| c.mean),
        gpu_util_avg_pct: util.map(|u| u.mean),
        throttle_reasons: clock_event_reason_names(reason_bits),
        samples: u32::try_from(samples.len()).unwrap_or(u32::MAX),
    }
}

/// True when an NVML error means the reading will never work on this GPU/driver (so the sampler
/// stops asking), as opposed to a transient failure.
fn never_available(error: &NvmlError) -> bool {
    matches!(
        error,
        NvmlError::NotSupported
            | NvmlError::NoPermission
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_)
    )
}

fn sample_value_f64(value: &SampleValue) -> f64 {
    match *value {
        SampleValue::F64(v) => v,
        SampleValue::U32(v) => f64::from(v),
        SampleValue::U64(v) => v as f64,
        SampleValue::I64(v) => v as f64,
    }
}

/// Which readings are still worth asking for; a reading NVML reports as unsupported is dropped for
/// the rest of the probe's life instead of costing a failed driver call every period.
#[derive(Debug, Clone)]
struct SensorSupport {
    instant_power: bool,
    average_power: bool,
    mem_temp: bool,
    gpu_temp: bool,
    sm_clock: bool,
    mem_clock: bool,
    util: bool,
    clock_events: bool,
}

impl Default for SensorSupport {
    fn default() -> Self {
        SensorSupport {
            instant_power: true,
            average_power: true,
            mem_temp: true,
            gpu_temp: true,
            sm_clock: true,
            mem_clock: true,
            util: true,
            clock_events: true,
        }
    }
}

/// Reads one value, remembering in `supported` when the reading can never work.
fn read_optional<T>(
    supported: &mut bool,
    read: impl FnOnce() -> Result<T, NvmlError>,
) -> Option<T> {
    if !*supported {
        return None;
    }
    match read() {
        Ok(value) => Some(value),
        Err(error) => {
            if never_available(&error) {
                *supported = false;
            }
            None
        }
    }
}

impl SensorSupport {
    /// Takes one sample of `device`.
    fn read(&mut self, device: &Device<'_>) -> TelemetrySample {
        // Instantaneous power and memory temperature come from the field-values API (nvml-wrapper
        // has no getter for memory temperature; `power_usage` is a 1 s average on Ampere and newer,
        // too slow for short regions). Both in one driver call.
        let (instant_power_w, mem_temp_c) = self.read_fields(device);
        let power_w = instant_power_w.or_else(|| {
            read_optional(&mut self.average_power, || device.power_usage())
                .map(|mw| f64::from(mw) / MILLIWATTS_PER_WATT)
        });
        TelemetrySample {
            power_w,
            gpu_temp_c: read_optional(&mut self.gpu_temp, || {
                device.temperature(TemperatureSensor::Gpu)
            })
            .map(f64::from),
            mem_temp_c,
            sm_clock_mhz: read_optional(&mut self.sm_clock, || device.clock_info(Clock::SM))
                .map(f64::from),
            mem_clock_mhz: read_optional(&mut self.mem_clock, || device.clock_info(Clock::Memory))
                .map(f64::from),
            gpu_util_pct: read_optional(&mut self.util, || device.utilization_rates())
                .map(|u| f64::from(u.gpu)),
            clock_event_bits: read_optional(&mut self.clock_events, || {
                device.current_throttle_reasons()
            })
            .map(|r| r.bits()),
        }
    }

    /// Instantaneous power (W) and memory temperature (°C) through `nvmlDeviceGetFieldValues`.
    fn read_fields(&mut self, device: &Device<'_>) -> (Option<f64>, Option<f64>) {
        let mut ids = Vec::with_capacity(2);
        if self.instant_power {
            ids.push(FieldId(NVML_FI_DEV_POWER_INSTANT));
        }
        if self.mem_temp {
            ids.push(FieldId(NVML_FI_DEV_MEMORY_TEMP));
        }
        if ids.is_empty() {
            return (None, None);
        }
        let values = match device.field_values_for(&ids) {
            Ok(values) => values,
            Err(error) => {
                if never_available(&error) {
                    self.instant_power = false;
                    self.mem_temp = false;
                }
                return (None, None);
            }
        };
        let mut power_w = None;
        let mut mem_temp_c = None;
        for (id, value) in ids.iter().zip(values) {
            let reading = value.and_then(|sample| sample.value);
            let (supported, slot, scale) = if id.0 == NVML_FI_DEV_POWER_INSTANT {
                (&mut self.instant_power, &mut power_w, MILLIWATTS_PER_WATT)
            } else {
                (&mut self.mem_temp, &mut mem_temp_c, 1.0)
            };
            match reading {
                Ok(value) => *slot = Some(sample_value_f64(&value) / scale),
                Err(error) if never_available(&error) => *supported = false,
                Err(_) => {}
            }
        }
        // Some drivers report an unsupported memory sensor as 0 °C rather than as an error.
        (power_w, mem_temp_c.filter(|t| *t > 0.0))
    }
}

/// State shared between a probe and its sampler thread.
#[derive(Debug, Default)]
struct SamplerState {
    /// A timed region is open: the thread samples every period.
    recording: bool,
    /// The probe is being dropped: the thread exits.
    shutdown: bool,
    /// Bumped at every `begin`, so a sample read across an `end`/`begin` boundary is not counted
    /// in the next region.
    region: u64,
    samples: Vec<TelemetrySample>,
}

#[derive(Debug, Default)]
struct SamplerShared {
    state: Mutex<SamplerState>,
    wake: Condvar,
}

impl SamplerShared {
    /// The sampler never panics while holding the lock, but a poisoned lock still holds valid
    /// state, so telemetry carries on rather than panicking.
    fn lock(&self) -> MutexGuard<'_, SamplerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sampler loop: idle until a region opens, then one sample per period until it closes.
fn run_sampler(
    shared: &SamplerShared,
    period: Duration,
    mut read: impl FnMut() -> TelemetrySample,
) {
    let mut state = shared.lock();
    loop {
        state = shared
            .wake
            .wait_while(state, |s| !s.recording && !s.shutdown)
            .unwrap_or_else(PoisonError::into_inner);
        if state.shutdown {
            return;
        }
        let region = state.region;
        drop(state);

        let started = Instant::now();
        let sample = read();

        state = shared.lock();
        if state.recording && state.region == region {
            state.samples.push(sample);
        }
        // Sleep out the rest of the period, but wake at once when the region ends.
        let rest = period.saturating_sub(started.elapsed());
        state = shared
            .wake
            .wait_timeout_while(state, rest, |s| {
                s.recording && s.region == region && !s.shutdown
            })
            .map(|(guard, _)| guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner().0);
    }
}

/// The running sampler thread; stops and joins on drop.
#[derive(Debug)]
struct SamplerThread {
    shared: Arc<SamplerShared>,
    handle: Option<JoinHandle<()>>,
}

impl SamplerThread {
    /// Starts a sampler thread. `body` runs on it with the shared state; it normally opens the
    /// device and calls [`run_sampler`].
    fn spawn(
        body: impl FnOnce(Arc<SamplerShared>) + Send + 'static,
    ) -> std::io::Result<SamplerThread> {
        let shared = Arc::new(SamplerShared::default());
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("nvml-sampler".to_string())
            .spawn(move || body(thread_shared))?;
        Ok(SamplerThread {
            shared,
            handle: Some(handle),
        })
    }

    /// Opens a region: drops any old samples and wakes the thread, which samples at once.
    fn start_region(&self) {
        let mut state = self.shared.lock();
        state.samples.clear();
        state.region = state.region.wrapping_add(1);
        state.recording = true;
        drop(state);
        self.shared.wake.notify_all();
    }

    /// Closes the region and returns its samples; the thread goes back to sleep.
    fn finish_region(&self) -> Vec<TelemetrySample> {
        let mut state = self.shared.lock();
        state.recording = false;
        let samples = std::mem::take(&mut state.samples);
        drop(state);
        self.shared.wake.notify_all();
        samples
    }
}

impl Drop for SamplerThread {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::warn!("the NVML sampler thread panicked; its last samples are lost");
            }
        }
    }
}

/// A [`TelemetryProbe`] reading one GPU through NVML.
#[derive(Debug)]
pub struct NvmlTelemetry {
    nvml: Arc<Nvml>,
    /// The GPU, resolved at open to its NVML index where it has one (a cheap handle lookup).
    selector: DeviceSelector,
    period: Duration,
    /// Started at the first `begin`, then kept for the probe's life.
    sampler: Option<SamplerThread>,
    /// The sampler thread could not be started; regions then carry energy only.
    sampler_failed: bool,
    energy_supported: bool,
    energy_at_begin_mj: Option<u64>,
}

impl NvmlTelemetry {
    /// Opens NVML and the selected GPU. Fails when NVML is missing (no driver) or no GPU matches.
    pub fn open(selector: DeviceSelector) -> Result<NvmlTelemetry, TelemetryError> {
        Self::open_with_period(selector, Duration::from_millis(NVML_SAMPLE_PERIOD_MS))
    }

    /// As [`NvmlTelemetry::open`], sampling every `period` instead of [`NVML_SAMPLE_PERIOD_MS`].
    pub fn open_with_period(
        selector: DeviceSelector,
        period: Duration,
    ) -> Result<NvmlTelemetry, TelemetryError> {
        let nvml = Nvml::init().map_err(|source| TelemetryError::NvmlUnavailable { source })?;
        let (resolved, energy_supported) = {
            let device = resolve_device(&nvml, &selector)?;
            let resolved = match device.index() {
                Ok(index) => DeviceSelector::Index(index),
                // MIG instances have no NVML index; their UUID is a direct lookup.
                Err(_) => selector,
            };
            let energy = device.total_energy_consumption();
            (resolved, !matches!(&energy, Err(e) if never_available(e)))
        };
        Ok(NvmlTelemetry {
            nvml: Arc::new(nvml),
            selector: resolved,
            period,
            sampler: None,
            sampler_failed: false,
            energy_supported,
            energy_at_begin_mj: None,
        })
    }

    /// The GPU this probe samples (its NVML index where it has one).
    pub fn selector(&self) -> &DeviceSelector {
        &self.selector
    }

    fn read_energy_mj(&self) -> Option<u64> {
        if !self.energy_supported {
            return None;
        }
        let device = resolve_device(&self.nvml, &self.selector).ok()?;
        device.total_energy_consumption().ok()
    }

    fn ensure_sampler(&mut self) -> Option<&SamplerThread> {
        if self.sampler.is_none() && !self.sampler_failed {
            let nvml = Arc::clone(&self.nvml);
            let selector = self.selector.clone();
            let period = self.period;
            let spawned = SamplerThread::spawn(move |shared| {
                match resolve_device(&nvml, &selector) {
                    Ok(device) => {
                        let mut support = SensorSupport::default();
                        run_sampler(&shared, period, || support.read(&device));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "NVML sampler cannot open its GPU; samples will be empty");
                    }
                }
            });
            match spawned {
                Ok(sampler) => self.sampler = Some(sampler),
                Err(error) => {
                    tracing::warn!(%error, "cannot start the NVML sampler thread; telemetry will carry energy only");
                    self.sampler_failed = true;
                }
            }
        }
        self.sampler.as_ref()
    }
}

impl TelemetryProbe for NvmlTelemetry {
    fn begin(&mut self) {
        self.energy_at_begin_mj = self.read_energy_mj();
        if let Some(sampler) = self.ensure_sampler() {
            sampler.start_region();
        }
    }

    fn end(&mut self, calls: u64) -> Telemetry {
        let samples = self
            .sampler
            .as_ref()
            .map(SamplerThread::finish_region)
            .unwrap_or_default();
        let at_end = self.read_energy_mj();
        let delta = energy_delta_mj(self.energy_at_begin_mj.take(), at_end);
        summarize(&samples, delta, calls)
    }
}

/// Set once the "telemetry unavailable" warning has been logged, so a process logs it once.
static NVML_FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

/// The probe the agent uses for `device`: NVML when it opens, else [`NoTelemetry`] (null
/// telemetry) after one warning per process.
pub fn probe_for(device: DeviceSelector) -> Box<dyn TelemetryProbe> {
    match NvmlTelemetry::open(device) {
        Ok(probe) => Box::new(probe),
        Err(error) => {
            if !NVML_FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    %error,
                    "GPU telemetry unavailable: power, energy, temperature, clocks and throttle \
                     reasons will be null in the results"
                );
            }
            Box::new(NoTelemetry)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TelemetrySample {
        TelemetrySample::default()
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn no_samples_leave_every_field_null() {
        let t = summarize(&[], None, 20);
        assert_eq!(t, Telemetry::default());
        assert_eq!(t.samples, 0);
        assert!(t.throttle_reasons.is_empty());
    }

    #[test]
    fn fields_never_read_stay_null_while_others_are_summarized() {
        let samples = vec![
            TelemetrySample {
                power_w: Some(300.0),
                sm_clock_mhz: Some(1980.0),
                ..sample()
            },
            TelemetrySample {
                power_w: Some(500.0),
                sm_clock_mhz: Some(1755.0),
                ..sample()
            },
        ];
        let t = summarize(&samples, None, 10);
        assert!(close(t.power_avg_w, 400.0));
        assert!(close(t.power_max_w, 500.0));
        assert!(close(t.sm_clock_min_mhz, 1755.0));
        assert!(close(t.sm_clock_avg_mhz, 1867.5));
        assert_eq!(t.temp_avg_c, None);
        assert_eq!(t.temp_max_c, None);
        assert_eq!(t.mem_temp_max_c, None);
        assert_eq!(t.mem_clock_min_mhz, None);
        assert_eq!(t.mem_clock_avg_mhz, None);
        assert_eq!(t.gpu_util_avg_pct, None);
        assert_eq!(t.energy_per_call_j, None);
        assert!(t.throttle_reasons.is_empty());
        assert_eq!(t.samples, 2);
    }

    #[test]
    fn averages_use_only_the_samples_that_carry_the_field() {
        // A reading that failed transiently in one sample must not count as zero.
        let samples = vec![
            TelemetrySample {
                gpu_temp_c: Some(60.0),
                gpu_util_pct: Some(100.0),
                ..sample()
            },
            TelemetrySample {
                gpu_temp_c: None,
                gpu_util_pct: Some(50.0),
                ..sample()
            },
            TelemetrySample {
                gpu_temp_c: Some(70.0),
                gpu_util_pct: None,
                ..sample()
            },
        ];
        let t = summarize(&samples, None, 1);
        assert!(close(t.temp_avg_c, 65.0));
        assert!(close(t.temp_max_c, 70.0));
        assert!(close(t.gpu_util_avg_pct, 75.0));
        assert_eq!(t.samples, 3);
    }

    #[test]
    fn min_avg_max_of_every_field() {
        let samples = vec![
            TelemetrySample {
                power_w: Some(650.0),
                gpu_temp_c: Some(55.0),
                mem_temp_c: Some(61.0),
                sm_clock_mhz: Some(1980.0),
                mem_clock_mhz: Some(2619.0),
                gpu_util_pct: Some(100.0),
                clock_event_bits: Some(0),
            },
            TelemetrySample {
                power_w: Some(700.0),
                gpu_temp_c: Some(58.0),
                mem_temp_c: Some(66.0),
                sm_clock_mhz: Some(1830.0),
                mem_clock_mhz: Some(2619.0),
                gpu_util_pct: Some(98.0),
                clock_event_bits: Some(ThrottleReasons::SW_POWER_CAP.bits()),
            },
            TelemetrySample {
                power_w: Some(690.0),
                gpu_temp_c: Some(61.0),
                mem_temp_c: Some(64.0),
                sm_clock_mhz: Some(1905.0),
                mem_clock_mhz: Some(2600.0),
                gpu_util_pct: Some(99.0),
                clock_event_bits: Some(0),
            },
        ];
        let t = summarize(&samples, Some(6_000), 30);
        assert!(close(t.power_avg_w, 680.0));
        assert!(close(t.power_max_w, 700.0));
        assert!(close(t.temp_avg_c, 58.0));
        assert!(close(t.temp_max_c, 61.0));
        assert!(close(t.mem_temp_max_c, 66.0));
        assert!(close(t.sm_clock_min_mhz, 1830.0));
        assert!(close(t.sm_clock_avg_mhz, 1905.0));
        assert!(close(t.mem_clock_min_mhz, 2600.0));
        assert!(close(t.mem_clock_avg_mhz, (2619.0 * 2.0 + 2600.0) / 3.0));
        assert!(close(t.gpu_util_avg_pct, 99.0));
        // 6000 mJ over 30 calls = 0.2 J per call.
        assert!(close(t.energy_per_call_j, 0.2));
        assert_eq!(t.throttle_reasons, vec!["sw_power_cap".to_string()]);
        assert!(t.throttled());
        assert_eq!(t.samples, 3);
    }

    #[test]
    fn energy_per_call_divides_the_delta_by_calls() {
        assert!(close(summarize(&[], Some(1_500), 3).energy_per_call_j, 0.5));
        assert!(close(summarize(&[], Some(1), 1).energy_per_call_j, 0.001));
        // No calls: no per-call figure rather than a division by zero.
        assert_eq!(summarize(&[], Some(1_500), 0).energy_per_call_j, None);
        assert_eq!(summarize(&[], None, 3).energy_per_call_j, None);
    }

    #[test]
    fn energy_delta_needs_both_reads_and_an_advancing_counter() {
        assert_eq!(energy_delta_mj(Some(1_000), Some(1_250)), Some(250));
        assert_eq!(energy_delta_mj(None, Some(1_250)), None);
        assert_eq!(energy_delta_mj(Some(1_000), None), None);
        // The counter did not refresh inside the region: unknown, not zero.
        assert_eq!(energy_delta_mj(Some(1_000), Some(1_000)), None);
        // The counter went backwards (driver reload): unknown.
        assert_eq!(energy_delta_mj(Some(5_000), Some(10)), None);
    }

    #[test]
    fn throttle_reasons_are_a_deduplicated_union_in_bit_order() {
        let samples = vec![
            TelemetrySample {
                clock_event_bits: Some(ThrottleReasons::HW_THERMAL_SLOWDOWN.bits()),
                ..sample()
            },
            TelemetrySample {
                clock_event_bits: Some(
                    ThrottleReasons::SW_POWER_CAP.bits() | ThrottleReasons::GPU_IDLE.bits(),
                ),
                ..sample()
            },
            TelemetrySample {
                clock_event_bits: Some(
                    ThrottleReasons::SW_POWER_CAP.bits()
                        | ThrottleReasons::HW_THERMAL_SLOWDOWN.bits(),
                ),
                ..sample()
            },
            TelemetrySample {
                clock_event_bits: None,
                ..sample()
            },
        ];
        let t = summarize(&samples, None, 1);
        assert_eq!(
            t.throttle_reasons,
            vec!["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]
        );
        // Same set, other sample order: same output.
        let mut reversed = samples.clone();
        reversed.reverse();
        assert_eq!(
            summarize(&reversed, None, 1).throttle_reasons,
            t.throttle_reasons
        );
    }

    #[test]
    fn every_named_reason_has_its_nvml_bit() {
        let all = clock_event_reason_table()
            .iter()
            .fold(0u64, |acc, (bit, _)| acc | bit);
        assert_eq!(
            clock_event_reason_names(all),
            vec![
                "gpu_idle",
                "applications_clocks",
                "sw_power_cap",
                "hw_slowdown",
                "sync_boost",
                "sw_thermal_slowdown",
                "hw_thermal_slowdown",
                "hw_power_brake",
                "display_clocks",
            ]
        );
        // The values are NVML's documented bit positions.
        assert_eq!(ThrottleReasons::GPU_IDLE.bits(), 0x1);
        assert_eq!(ThrottleReasons::SW_POWER_CAP.bits(), 0x4);
        assert_eq!(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN.bits(), 0x80);
        assert_eq!(ThrottleReasons::DISPLAY_CLOCK_SETTING.bits(), 0x100);
    }

    #[test]
    fn unknown_reason_bits_are_named_not_dropped() {
        assert_eq!(
            clock_event_reason_names(0x4 | 0x10_0000),
            vec!["sw_power_cap".to_string(), "unknown_0x100000".to_string()]
        );
        assert!(clock_event_reason_names(0).is_empty());
    }

    #[test]
    fn non_finite_readings_are_ignored() {
        let samples = vec![
            TelemetrySample {
                power_w: Some(f64::NAN),
                ..sample()
            },
            TelemetrySample {
                power_w: Some(250.0),
                ..sample()
            },
        ];
        let t = summarize(&samples, None, 1);
        assert!(close(t.power_avg_w, 250.0));
        assert!(close(t.power_max_w, 250.0));
    }

    /// A sampler whose reader counts its calls and tags each sample with the call number.
    fn counting_sampler(period: Duration) -> (SamplerThread, Arc<std::sync::atomic::AtomicU64>) {
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread_reads = Arc::clone(&reads);
        let sampler = SamplerThread::spawn(move |shared| {
            run_sampler(&shared, period, || {
                let n = thread_reads.fetch_add(1, Ordering::SeqCst) + 1;
                TelemetrySample {
                    power_w: Some(n as f64),
                    ..TelemetrySample::default()
                }
            })
        })
        .expect("spawn the sampler thread");
        (sampler, reads)
    }

    #[test]
    fn sampler_reads_only_inside_regions_and_reuses_its_thread() {
        let period = Duration::from_millis(5);
        let (sampler, reads) = counting_sampler(period);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            reads.load(Ordering::SeqCst),
            0,
            "sampled while no region was open"
        );

        let opened = Instant::now();
        sampler.start_region();
        std::thread::sleep(Duration::from_millis(60));
        let first = sampler.finish_region();
        let open_for = opened.elapsed();
        // About 12 periods; a slow, shared CI machine may give fewer, but never more than one per
        // period plus the one taken on wake-up.
        let most = (open_for.as_millis() / period.as_millis()) as usize + 1;
        assert!(
            first.len() >= 2,
            "only {} samples in {open_for:?}",
            first.len()
        );
        assert!(
            first.len() <= most,
            "{} samples in {open_for:?}",
            first.len()
        );

        let after_end = reads.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        // At most one read that was already in flight when the region closed.
        assert!(reads.load(Ordering::SeqCst) <= after_end + 1);

        // The same thread serves the next region, and it starts with fresh samples.
        sampler.start_region();
        std::thread::sleep(Duration::from_millis(20));
        let second = sampler.finish_region();
        assert!(!second.is_empty());
        let last_of_first = first.last().and_then(|s| s.power_w).unwrap_or(0.0);
        assert!(second
            .iter()
            .all(|s| s.power_w.is_some_and(|n| n > last_of_first)));
    }

    #[test]
    fn sampler_samples_at_once_when_a_region_opens() {
        // A long period: the only sample of a short region is the one taken on wake-up.
        let (sampler, _reads) = counting_sampler(Duration::from_secs(60));
        sampler.start_region();
        let deadline = Instant::now() + Duration::from_secs(5);
        while sampler.shared.lock().samples.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sampler.finish_region().len(), 1);
    }

    #[test]
    fn dropping_the_sampler_stops_its_thread_promptly_even_mid_period() {
        let (sampler, _reads) = counting_sampler(Duration::from_secs(60));
        sampler.start_region();
        std::thread::sleep(Duration::from_millis(10));
        let started = Instant::now();
        drop(sampler);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and driver: cargo test -p decodebench-agent -- --ignored"]
    fn real_gpu_probe_reports_readings_in_every_region() {
        let mut probe = NvmlTelemetry::open(DeviceSelector::Index(0)).expect("open GPU 0");
        for region in 0..2 {
            probe.begin();
            std::thread::sleep(Duration::from_millis(300));
            let t = probe.end(100);
            println!("region {region}: {t:?}");
            assert!(t.samples >= 5, "{} samples in 300 ms", t.samples);
            assert!(t.power_avg_w.is_some_and(|w| w > 0.0));
            assert!(t.power_max_w >= t.power_avg_w);
            assert!(t.temp_avg_c.is_some_and(|c| c > 0.0));
            assert!(t.sm_clock_min_mhz.is_some_and(|m| m > 0.0));
            assert!(t.mem_clock_avg_mhz.is_some_and(|m| m > 0.0));
            assert!(t.gpu_util_avg_pct.is_some());
            assert!(t.energy_per_call_j.is_some_and(|j| j > 0.0));
        }
    }

    #[test]
    fn open_without_nvml_fails_with_a_clear_error_and_probe_for_falls_back() {
        match NvmlTelemetry::open(DeviceSelector::Index(u32::MAX)) {
            Ok(_) => panic!("index u32::MAX cannot name a real GPU"),
            Err(TelemetryError::NvmlUnavailable { .. }) => {
                let message = TelemetryError::NvmlUnavailable {
                    source: NvmlError::LibraryNotFound,
                }
                .to_string();
                assert!(message.contains("NVIDIA driver"), "{message}");
            }
            // On a machine with a GPU, NVML opens and the bogus index is rejected.
            Err(TelemetryError::DeviceNotFound { count, .. }) => assert!(count < u32::MAX),
            Err(other) => panic!("unexpected error: {other}"),
        }
        // Whatever the machine, the fallback probe works without panicking.
        let mut probe = probe_for(DeviceSelector::Index(u32::MAX));
        probe.begin();
        let t = probe.end(10);
        assert_eq!(t, Telemetry::default());
    }
}
