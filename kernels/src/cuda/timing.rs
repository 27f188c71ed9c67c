//! Timing a kernel call on the device, as the case's [`MeasureMethod`] asks: CUDA events around
//! each call (or around a CUDA-graph replay of several calls), optional L2 flush before each
//! timed trial, a fixed number of trials or noise-based stopping, and the streaming-read
//! calibration that gives every result its fraction of the achievable bandwidth.

use super::data::{alloc_bytes, dptr, CaseError};
use super::device::DeviceSession;
use super::launch::launch_stream_read;
use super::verify::memset;
use super::CudaError;
use crate::backend::TelemetryProbe;
use crate::measurement::{percentile, Telemetry, TimingStats};
use crate::workload::{L2Mode, MeasureMethod, TimingMode};
use cudarc::driver::sys::{self, CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, DriverError};
use std::time::Instant;

/// Trials recorded between two host synchronizations: the GPU runs them back to back, and the
/// host reads their events in one go.
const TRIAL_BATCH: usize = 16;

/// Least wall time spent in warm-up calls: an idle H100 sits at a few hundred MHz and takes
/// milliseconds to reach its boost clock, so a handful of 20-us warm-up calls would leave the first
/// timed trials of a small case slow (seen: a 3x median on the first case of a run).
const MIN_WARMUP_MS: f64 = 25.0;

/// Least length of the telemetry window: NVML's energy counter and power readings move in steps
/// of several milliseconds, so a window of a few short trials reads no energy at all. The window
/// keeps the GPU busy with back-to-back calls until it is this long, and energy per call divides
/// by every call made inside it.
const MIN_TELEMETRY_WINDOW_MS: f64 = 100.0;

/// GPU work enqueued per host synchronization while padding warm-up or the telemetry window.
const PAD_CHUNK_MS: f64 = 5.0;

/// Flush buffer size as a multiple of the L2 size: writing twice the cache evicts what a previous
/// call left in it.
const L2_FLUSH_FACTOR: u64 = 2;

/// Streaming-read calibration: bytes read per repeat (capped by free memory), repeats, warm-up.
const CALIBRATION_BYTES: u64 = 4 << 30;
const CALIBRATION_REPEATS: usize = 15;
const CALIBRATION_WARMUP: usize = 3;

/// What the timed trials of one kernel produced.
#[derive(Debug, Clone, Default)]
pub(crate) struct TimedTrials {
    pub samples_ms: Vec<f64>,
    pub rse_target_met: Option<bool>,
    pub telemetry: Telemetry,
}

/// Buffer that evicts L2 when written, sized from the device's L2.
pub(crate) fn l2_flush_buffer(session: &DeviceSession) -> Result<CudaSlice<u8>, CaseError> {
    let bytes = session.props.l2_bytes.max(1 << 20) * L2_FLUSH_FACTOR;
    alloc_bytes(session, bytes, "the L2 flush buffer")
}

/// Returns every L2 line marked persisting (evict-last) to normal priority, once the stream is
/// idle. The optimized kernel stores its split partials with an evict-last policy so that they
/// stay in the L2 from one call to the next (kernels/cuda/decode_mma.cu); the partial buffers of
/// earlier cases and of the other plan candidates would otherwise keep that priority after they
/// are freed, and take L2 space from whatever is timed next. Called before each timing, so that
/// each kernel is timed from the same L2 state; its own partials regain the priority on its first
/// warm-up call. Where the driver does not support L2 persistence (a GPU in MIG mode turns the
/// set-aside off) there is nothing to reset, and timing goes on.
pub(crate) fn reset_persisting_l2(session: &DeviceSession) -> Result<(), CudaError> {
    session.stream.synchronize().map_err(CudaError::driver(
        "synchronizing before resetting the L2's persisting lines",
    ))?;
    session.ctx.bind_to_thread().map_err(CudaError::driver(
        "binding the context to reset the L2's persisting lines",
    ))?;
    // SAFETY: no arguments; acts on the context bound to this thread above, whose stream is idle.
    match unsafe { sys::cuCtxResetPersistingL2Cache() } {
        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_NOT_SUPPORTED => Ok(()),
        failed => Err(CudaError::driver("resetting the L2's persisting lines")(
            DriverError(failed),
        )),
    }
}

fn timing_event(session: &DeviceSession) -> Result<CudaEvent, CudaError> {
    session
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(CudaError::driver("creating a timing event"))
}

/// Milliseconds between CUDA events recorded before and after what `enqueue` puts on the stream
/// (waits for it to finish).
fn event_timed_ms(
    session: &DeviceSession,
    enqueue: impl FnOnce() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    let (start, end) = (timing_event(session)?, timing_event(session)?);
    start
        .record(&session.stream)
        .map_err(CudaError::driver("recording a timing event"))?;
    enqueue()?;
    end.record(&session.stream)
        .map_err(CudaError::driver("recording a timing event"))?;
    Ok(start
        .elapsed_ms(&end)
        .map_err(CudaError::driver("reading a timing event"))? as f64)
}

/// The quick comparison ([`quick_compare_ms`]): the least GPU time of its warm-up, the GPU time
/// one timed batch aims for (sizing the batch: at most `QUICK_MAX_CALLS` calls, at least one),
/// the rounds of batches, and how much slower than the fastest a candidate may be in the first
/// round and still be timed in the others.
const QUICK_WARMUP_MS: f64 = 2.0;
const QUICK_MAX_WARMUP_CALLS: f64 = 1000.0;
const QUICK_BATCH_MS: f64 = 0.5;
const QUICK_MAX_CALLS: usize = 5;
const QUICK_ROUNDS: usize = 3;
const QUICK_PRUNE_RATIO: f64 = 1.10;
/// Below this time per call (ms), a graph-mode method's candidates are compared in graphs too.
const QUICK_GRAPH_BELOW_MS: f64 = 0.1;

/// Rough time of one call (ms) of each of `candidates` launch configurations (`call(i)` runs
/// candidate i once). For choosing between equivalent launch configurations, never for a
/// reported figure; see [`quick_compare`] for the schedule.
///
/// The candidates are first timed as separate launches. Where `method` times the reported figure
/// in graph mode and the fastest call is under `QUICK_GRAPH_BELOW_MS`, they are timed again the
/// way that figure is: each one's `graph_launches` calls captured once, a batch replaying that
/// graph (a "call" of the schedule is one replay; the times are per kernel call). Timed as
/// separate launches, a call of a few microseconds is paced by the host's launches, which favours
/// a candidate with fewer kernels (the fused merge) that a graph then runs slower (seen: +18 % on
/// a b4 s1024 FP8 cell); a longer call is not, and replaying its graph would only cost time.
pub(crate) fn quick_compare_ms(
    session: &DeviceSession,
    method: &MeasureMethod,
    candidates: usize,
    call: &dyn Fn(usize) -> Result<(), CudaError>,
) -> Result<Vec<f64>, CudaError> {
    reset_persisting_l2(session)?;
    let separate = quick_compare(candidates, &mut |i, calls| {
        event_timed_ms(session, || {
            for _ in 0..calls {
                call(i)?;
            }
            Ok(())
        })
    })?;
    if let Some(launches) = compare_in_graphs(method, &separate) {
        let graphs = (0..candidates)
            .map(|i| capture_graph(session, launches, &|| call(i)))
            .collect::<Result<Vec<_>, _>>()?;
        return quick_compare(candidates, &mut |i, replays| {
            let ms = event_timed_ms(session, || {
                for _ in 0..replays {
                    graphs[i]
                        .launch()
                        .map_err(CudaError::driver("replaying a candidate's graph"))?;
                }
                Ok(())
            })?;
            Ok(ms / launches as f64)
        });
    }
    Ok(separate)
}

/// The calls per graph to compare the candidates in, given their times as separate launches:
/// the method's `graph_launches` where it times graph replays and the fastest call is under
/// `QUICK_GRAPH_BELOW_MS`; otherwise none (the separate launches' times stand).
fn compare_in_graphs(method: &MeasureMethod, separate_ms: &[f64]) -> Option<u32> {
    let fastest = separate_ms.iter().copied().fold(f64::INFINITY, f64::min);
    (method.timing == TimingMode::Graph && fastest < QUICK_GRAPH_BELOW_MS)
        .then_some(method.graph_launches.max(1))
}

/// `launches` calls of `call` captured into a graph, instantiated and uploaded.
fn capture_graph(
    session: &DeviceSession,
    launches: u32,
    call: &dyn Fn() -> Result<(), CudaError>,
) -> Result<CudaGraph, CudaError> {
    let stream = &session.stream;
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(CudaError::driver("starting graph capture"))?;
    let mut captured = Ok(());
    for _ in 0..launches {
        captured = call();
        if captured.is_err() {
            break;
        }
    }
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    captured?;
    let graph = graph
        .map_err(CudaError::driver("instantiating the captured graph"))?
        .ok_or_else(|| CudaError::Internal {
            context: "capturing a graph".into(),
            message: "the capture produced no graph".into(),
        })?;
    graph
        .upload()
        .map_err(CudaError::driver("uploading the graph"))?;
    Ok(graph)
}

/// The quick comparison's schedule over `time_batch(i, calls)` (the ms that `calls` back-to-back
/// calls of candidate i take). Two single calls of each candidate (the second is the estimate),
/// then, where that kept the GPU busy less than `QUICK_WARMUP_MS`, a batch of each until it has
/// been (so an idle clock does not slow the first candidates); batches sized from the fastest
/// single call (5 calls of a 7-us kernel, 1 of a 7-ms one: the comparison took a fifth of a
/// default run's time when every batch was 5 calls); then rounds of one batch per candidate,
/// interleaved (each round starting one candidate later) so that a
/// clock or power drift (an H200 at its power cap drifts by several percent within a second) is
/// shared instead of favouring whichever ran at the best moment. After the first round only the
/// candidates within `QUICK_PRUNE_RATIO` of the fastest are timed again. Returns each
/// candidate's median per-call time over its batches.
pub(crate) fn quick_compare(
    candidates: usize,
    time_batch: &mut dyn FnMut(usize, usize) -> Result<f64, CudaError>,
) -> Result<Vec<f64>, CudaError> {
    if candidates == 0 {
        return Ok(Vec::new());
    }
    let mut single = vec![f64::INFINITY; candidates];
    let mut warm_ms = 0.0;
    for _ in 0..2 {
        for (i, t) in single.iter_mut().enumerate() {
            *t = time_batch(i, 1)?;
            warm_ms += *t;
        }
    }
    let pass_ms: f64 = single.iter().sum();
    if warm_ms < QUICK_WARMUP_MS && pass_ms > 0.0 {
        let calls = ((QUICK_WARMUP_MS - warm_ms) / pass_ms)
            .ceil()
            .min(QUICK_MAX_WARMUP_CALLS) as usize;
        for i in 0..candidates {
            time_batch(i, calls)?;
        }
    }
    let fastest = single.iter().copied().fold(f64::INFINITY, f64::min);
    let calls = if fastest > 0.0 && fastest.is_finite() {
        ((QUICK_BATCH_MS / fastest).ceil() as usize).clamp(1, QUICK_MAX_CALLS)
    } else {
        QUICK_MAX_CALLS
    };
    let mut samples = vec![Vec::with_capacity(QUICK_ROUNDS); candidates];
    let mut active: Vec<usize> = (0..candidates).collect();
    for round in 0..QUICK_ROUNDS {
        for k in 0..active.len() {
            let i = active[(k + round) % active.len()];
            samples[i].push(time_batch(i, calls)? / calls as f64);
        }
        if round == 0 {
            let best = active
                .iter()
                .map(|&i| samples[i][0])
                .fold(f64::INFINITY, f64::min);
            active.retain(|&i| samples[i][0] <= QUICK_PRUNE_RATIO * best);
        }
    }
    Ok(samples
        .into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect())
}

/// Whether noise-based stopping says to stop after `samples`.
pub(crate) fn enough_trials(
    method: &MeasureMethod,
    samples: &[f64],
    started: Instant,
) -> (bool, Option<bool>) {
    let n = samples.len() as u32;
    let fixed = method.trials.max(1);
    match method.target_rse {
        None => (n >= fixed, None),
        Some(target) => {
            let met = TimingStats::from_samples(samples).is_some_and(|s| s.rse <= target);
            let out_of_budget = n >= method.max_trials.max(fixed)
                || started.elapsed().as_secs_f64() >= method.max_time_s;
            (n >= fixed && (met || out_of_budget), Some(met))
        }
    }
}

/// Times `call` (one kernel call, possibly several launches) under `method`.
pub(crate) fn time_calls(
    session: &DeviceSession,
    method: &MeasureMethod,
    flush: Option<&mut CudaSlice<u8>>,
    probe: &mut dyn TelemetryProbe,
    call: &dyn Fn() -> Result<(), CudaError>,
) -> Result<TimedTrials, CudaError> {
    reset_persisting_l2(session)?;
    let cold = method.l2 == L2Mode::Cold;
    let mut flush = if cold { flush } else { None };
    let stream = &session.stream;
    let sync = |what: &str| {
        stream
            .synchronize()
            .map_err(CudaError::driver(format!("synchronizing after {what}")))
    };

    // Graph mode: capture `graph_launches` calls once; a trial replays them.
    let launches = method.graph_launches.max(1);
    let graph = if method.timing == TimingMode::Graph {
        Some(capture_graph(session, launches, call)?)
    } else {
        None
    };
    let run_once = || -> Result<(), CudaError> {
        match &graph {
            Some(g) => g.launch().map_err(CudaError::driver("replaying the graph")),
            None => call(),
        }
    };

    // Warm-up: the method's calls, then more until the clocks have had time to ramp.
    let warm_started = Instant::now();
    for _ in 0..method.warmup.max(1) {
        run_once()?;
    }
    sync("warm-up")?;
    let per_run_ms = warm_started.elapsed().as_secs_f64() * 1e3 / method.warmup.max(1) as f64;
    let chunk = ((PAD_CHUNK_MS / per_run_ms.max(1e-3)).ceil() as usize).clamp(1, 10_000);
    while warm_started.elapsed().as_secs_f64() * 1e3 < MIN_WARMUP_MS {
        for _ in 0..chunk {
            run_once()?;
        }
        sync("warm-up")?;
    }

    let events: Vec<(CudaEvent, CudaEvent)> = (0..TRIAL_BATCH)
        .map(|_| Ok((timing_event(session)?, timing_event(session)?)))
        .collect::<Result<_, CudaError>>()?;
    let per_trial_calls = if graph.is_some() { launches } else { 1 } as u64;
    let mut samples = Vec::new();
    // Every call made inside the telemetry window, timed or not (energy per call divides by it).
    let mut calls_in_window: u64 = 0;
    let started = Instant::now();
    probe.begin();
    loop {
        for (start, end) in &events {
            if let Some(buf) = flush.as_deref_mut() {
                memset(session, buf, (samples.len() & 0xff) as u8)?;
            }
            start
                .record(stream)
                .map_err(CudaError::driver("recording a timing event"))?;
            run_once()?;
            end.record(stream)
                .map_err(CudaError::driver("recording a timing event"))?;
        }
        sync("timed trials")?;
        calls_in_window += events.len() as u64 * per_trial_calls;
        let mut verdict = None;
        for (start, end) in &events {
            let ms = start
                .elapsed_ms(end)
                .map_err(CudaError::driver("reading a timing event"))? as f64;
            samples.push(ms / per_trial_calls as f64);
            let (stop, rse_met) = enough_trials(method, &samples, started);
            if stop {
                verdict = Some(rse_met);
                break;
            }
        }
        if let Some(rse_met) = verdict {
            // Pad the telemetry window with back-to-back calls (no flush, no events) so NVML's
            // energy and power readings cover steady work of this kernel.
            while started.elapsed().as_secs_f64() * 1e3 < MIN_TELEMETRY_WINDOW_MS {
                for _ in 0..chunk {
                    run_once()?;
                }
                sync("telemetry window")?;
                calls_in_window += chunk as u64 * per_trial_calls;
            }
            let telemetry = probe.end(calls_in_window);
            return Ok(TimedTrials {
                samples_ms: samples,
                rse_target_met: rse_met,
                telemetry,
            });
        }
    }
}

/// Measures streaming-read bandwidth (GB/s, 1e9 bytes/s): the median of repeated reads of a
/// multi-GiB buffer with 16-byte loads.
pub(crate) fn calibrate_read_bandwidth(session: &DeviceSession) -> Result<f64, CaseError> {
    let (free, _) = session.memory()?;
    let bytes = (CALIBRATION_BYTES.min(free / 4) / 16) * 16;
    if bytes < (64 << 20) {
        return Err(CaseError::Oom(format!(
            "calibration needs at least 64 MiB free; {} bytes are",
            free
        )));
    }
    let mut buf = alloc_bytes(session, bytes, "the calibration buffer")?;
    memset(session, &mut buf, 0)?;
    let mut sink = alloc_bytes(session, 16, "the calibration sink")?;
    memset(session, &mut sink, 0)?;
    let (bp, sp) = (dptr(session, &buf), dptr(session, &sink));
    for _ in 0..CALIBRATION_WARMUP {
        launch_stream_read(session, bp, bytes / 16, sp)?;
    }
    let mut samples = Vec::with_capacity(CALIBRATION_REPEATS);
    for _ in 0..CALIBRATION_REPEATS {
        let ms = event_timed_ms(session, || launch_stream_read(session, bp, bytes / 16, sp))?;
        samples.push(bytes as f64 / (ms * 1e-3) / 1e9);
    }
    samples.sort_by(f64::total_cmp);
    Ok(percentile(&samples, 50.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake device for the comparison's schedule: candidate i's call takes `per_call[i]` ms,
    /// scaled by a clock that `drift` slows a little with every call made (a power-capped GPU);
    /// it counts the calls each candidate got.
    struct FakeGpu {
        per_call: Vec<f64>,
        drift: f64,
        clock: f64,
        calls: Vec<usize>,
    }

    impl FakeGpu {
        fn new(per_call: &[f64], drift: f64) -> FakeGpu {
            FakeGpu {
                per_call: per_call.to_vec(),
                drift,
                clock: 1.0,
                calls: vec![0; per_call.len()],
            }
        }

        fn compare(&mut self) -> Vec<f64> {
            let n = self.per_call.len();
            quick_compare(n, &mut |i, calls| {
                let mut ms = 0.0;
                for _ in 0..calls {
                    ms += self.per_call[i] * self.clock;
                    self.clock *= 1.0 + self.drift;
                    self.calls[i] += 1;
                }
                Ok(ms)
            })
            .unwrap()
        }
    }

    fn fastest(times: &[f64]) -> usize {
        (0..times.len())
            .min_by(|&a, &b| times[a].total_cmp(&times[b]))
            .unwrap()
    }

    #[test]
    fn short_calls_under_graph_timing_are_compared_in_graphs() {
        let graph = MeasureMethod {
            timing: TimingMode::Graph,
            graph_launches: 10,
            ..MeasureMethod::default()
        };
        // 7-us calls: host launch pacing would decide, so graphs of the method's 10 calls.
        assert_eq!(compare_in_graphs(&graph, &[0.0075, 0.0063]), Some(10));
        // The fastest call decides: one long candidate does not keep the short ones out.
        assert_eq!(compare_in_graphs(&graph, &[5.0, 0.05]), Some(10));
        // A 2-ms call is not launch-paced; its graph replays would only cost time.
        assert_eq!(compare_in_graphs(&graph, &[2.0, 2.1]), None);
        // Zero calls per graph in a method is read as one.
        let one = MeasureMethod {
            graph_launches: 0,
            ..graph.clone()
        };
        assert_eq!(compare_in_graphs(&one, &[0.007]), Some(1));
        // Event timing times separate launches, and so does its comparison.
        let events = MeasureMethod {
            timing: TimingMode::Events,
            ..graph
        };
        assert_eq!(compare_in_graphs(&events, &[0.007]), None);
    }

    #[test]
    fn quick_comparison_keeps_the_fastest_and_stops_timing_the_slow() {
        // A 7-ms kernel: one call per batch; the two candidates 15 % and 40 % slower get the
        // warm-up and one round, the two within 10 % all three rounds.
        let mut gpu = FakeGpu::new(&[7.0, 6.9, 8.0, 9.8], 0.0);
        let t = gpu.compare();
        assert_eq!(fastest(&t), 1);
        assert!(
            (t[1] - 6.9).abs() < 1e-9 && (t[3] - 9.8).abs() < 1e-9,
            "{t:?}"
        );
        // Two single calls each (7 ms is past the warm-up time already), then the rounds.
        assert_eq!(gpu.calls, vec![2 + 3, 2 + 3, 2 + 1, 2 + 1]);
    }

    #[test]
    fn quick_comparison_batches_short_kernels_and_warms_the_clock_up() {
        // A 7-us kernel: batches of 5 calls, after 2 single calls each and a warm-up batch of
        // each that brings the GPU time to 2 ms: (2 - 4 x ~7 us) / (2 x ~7 us) -> 140 calls.
        let mut gpu = FakeGpu::new(&[0.007, 0.0071], 0.0);
        let t = gpu.compare();
        assert_eq!(fastest(&t), 0);
        assert_eq!(gpu.calls, vec![2 + 140 + 3 * 5; 2]);
        // A 0.2-ms kernel: batches of 3 calls (0.5 ms); warm-up (2 - 0.8) / 0.4 -> 3 calls.
        let mut gpu = FakeGpu::new(&[0.2, 0.2], 0.0);
        gpu.compare();
        assert_eq!(gpu.calls, vec![2 + 3 + 3 * 3; 2]);
    }

    #[test]
    fn quick_comparison_shares_a_drift_between_equal_candidates() {
        // Three equal candidates on a clock slowing 1 % per call: interleaved rounds keep their
        // medians within a few percent of each other; back to back, the last would be 10 %+
        // slower than the first.
        let mut gpu = FakeGpu::new(&[1.0, 1.0, 1.0], 0.01);
        let t = gpu.compare();
        let (lo, hi) = (
            t.iter().copied().fold(f64::INFINITY, f64::min),
            t.iter().copied().fold(0.0, f64::max),
        );
        assert!(hi / lo < 1.03, "{t:?}");
        // And a candidate 5 % faster still wins under the drift.
        let mut gpu = FakeGpu::new(&[1.0, 1.0, 0.95, 1.0], 0.01);
        assert_eq!(fastest(&gpu.compare()), 2);
    }

    #[test]
    fn quick_comparison_of_one_or_none() {
        assert!(quick_compare(0, &mut |_, _| Ok(1.0)).unwrap().is_empty());
        let mut gpu = FakeGpu::new(&[3.0], 0.0);
        assert_eq!(gpu.compare(), vec![3.0]);
    }

    #[test]
    fn fixed_trials_stop_at_the_count() {
        let m = MeasureMethod {
            trials: 3,
            ..Default::default()
        };
        let t = Instant::now();
        assert_eq!(enough_trials(&m, &[1.0, 1.0], t), (false, None));
        assert_eq!(enough_trials(&m, &[1.0, 1.0, 1.0], t), (true, None));
    }

    #[test]
    fn noise_based_stopping_waits_for_the_target_or_the_budget() {
        let m = MeasureMethod {
            trials: 3,
            target_rse: Some(0.01),
            max_trials: 6,
            max_time_s: 1e9,
            ..Default::default()
        };
        let t = Instant::now();
        // Quiet samples: the target is met once the minimum count is reached.
        assert_eq!(enough_trials(&m, &[1.0, 1.0], t), (false, Some(true)));
        assert_eq!(enough_trials(&m, &[1.0, 1.0, 1.0], t), (true, Some(true)));
        // Noisy samples: keep going until max_trials, then stop with the target unmet.
        let noisy = [1.0, 2.0, 1.0, 2.0, 1.0];
        assert_eq!(enough_trials(&m, &noisy, t), (false, Some(false)));
        let noisy6 = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0];
        assert_eq!(enough_trials(&m, &noisy6, t), (true, Some(false)));
        // Time budget spent: stop too.
        let m0 = MeasureMethod {
            max_time_s: 0.0,
            ..m
        };
        assert_eq!(enough_trials(&m0, &noisy, t), (true, Some(false)));
    }
}
