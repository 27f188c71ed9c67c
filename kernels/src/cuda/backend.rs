//! [`CudaBackend`]: runs benchmark cases on one GPU. For each case it builds the inputs on the
//! device, computes the GPU reference, then for each kernel (baseline, optimized) verifies one
//! call against the reference and times the ones that are right.
//!
//! Problems stay inside the case: an unsupported combination is `skipped`, memory that does not
//! fit is `oom` (with the sizes), a wrong output is `wrong_result` (never timed), and a CUDA error
//! is `failed` — after which the context is thrown away, reset and reopened for the next case.
//! Some errors (an illegal memory access, measured on an H100 with driver 580) stay with the
//! process: no context can be created again. The backend then fails every later case at once
//! with that reason and [`CudaBackend::needs_restart`] turns true, so the agent can exit and let
//! a fresh process take the GPU.

use super::compile::CompileCache;
use super::data::{
    alloc_bytes, build_inputs, dptr, ensure_free, ensure_pool, ensure_pool_bf16, host_schedule,
    output_bytes, query_bf16, CaseError, CaseInputs, DevicePool,
};
use super::device::{
    probe_devices, reset_primary_context, ContextKind, DeviceSession, DeviceSummary, ModuleOrigin,
};
use super::launch::{
    case_params, choose_decode_geometries, decode_ctas_per_sm, launch_baseline, launch_decode,
    launch_format_check, launch_reference, merge_rows_alternative, prepare_decode, AttnParams,
    DecodeGeometry, DecodeNames, DecodeVariant, KernelLimits, MergeRows, FUSED_MERGE_MAX_SPLITS,
    SUPPORTED_HEAD_SIZES,
};
use super::plan::{plan_candidates, LaunchOrder, SplitPlan, WorkItem, MIN_CHUNK_TOKENS};
use super::timing::{calibrate_read_bandwidth, l2_flush_buffer, quick_compare_ms, time_calls};
use super::verify::{check, decode_device_output, memset, OutputBuffers};
use super::CudaError;
use crate::backend::{Backend, TelemetryProbe};
use crate::measurement::{CaseMeasurement, DeviceIdentity, KernelKind, KernelMeasurement, Status};
use crate::workload::{BenchCase, Dtype, L2Mode};
use cudarc::driver::CudaSlice;
use std::time::{Duration, Instant};

/// Pause before re-measuring a kernel whose trials ran under thermal or power throttling, so the
/// GPU can cool down.
const THROTTLE_COOLDOWN: Duration = Duration::from_secs(3);

/// Runs cases on one CUDA device.
pub struct CudaBackend {
    ordinal: usize,
    cache: CompileCache,
    identity: DeviceIdentity,
    session: Option<DeviceSession>,
    pool: Option<DevicePool>,
    flush: Option<CudaSlice<u8>>,
    min_chunk_tokens: u32,
    /// Use the FMA kernel even where the tensor-core one applies (self-test coverage).
    prefer_fma: bool,
    /// Only this pipeline depth of the tensor-core kernel, rather than timing every compiled one
    /// (self-test coverage).
    mma_stages: Option<u32>,
    origin: Option<ModuleOrigin>,
    rebuilds: u32,
    /// What went wrong resetting the context after the last device error, if anything.
    reset_error: Option<String>,
    /// Why the device could not be reopened after a device error (only a new process can use
    /// it); later cases fail at once with this.
    unrecoverable: Option<String>,
}

/// Outcome of one kernel before it becomes a [`KernelMeasurement`]: device errors are kept apart
/// so the backend knows to rebuild its context.
enum KernelOutcome {
    Measured(KernelMeasurement),
    DeviceError(KernelMeasurement),
}

impl CudaBackend {
    /// The CUDA devices on this machine (an error, never a panic, without a driver).
    pub fn probe() -> Result<Vec<DeviceSummary>, CudaError> {
        probe_devices()
    }

    /// Opens device `ordinal`: context, kernels (compiled by NVRTC or taken from the on-disk
    /// cache, see [`CompileCache::from_env`]), identity, and the streaming-read calibration.
    pub fn new(ordinal: usize) -> Result<CudaBackend, CudaError> {
        CudaBackend::with_cache(ordinal, CompileCache::from_env(), true)
    }

    /// As [`CudaBackend::new`] with an explicit cache, and the calibration optional (the
    /// self-test skips it).
    pub fn with_cache(
        ordinal: usize,
        cache: CompileCache,
        calibrate: bool,
    ) -> Result<CudaBackend, CudaError> {
        let session = DeviceSession::open(ordinal, &cache, ContextKind::Primary)?;
        let mut identity = session.identity(ordinal)?;
        if calibrate {
            match calibrate_read_bandwidth(&session) {
                Ok(gbps) => identity.calibrated_read_gbps = Some(gbps),
                Err(CaseError::Oom(m)) => {
                    tracing::warn!(message = %m, "bandwidth calibration skipped");
                }
                Err(CaseError::Device(e)) => return Err(e),
            }
        }
        let origin = Some(session.origin.clone());
        Ok(CudaBackend {
            ordinal,
            cache,
            identity,
            session: Some(session),
            pool: None,
            flush: None,
            min_chunk_tokens: MIN_CHUNK_TOKENS,
            prefer_fma: false,
            mma_stages: None,
            origin,
            rebuilds: 0,
            reset_error: None,
            unrecoverable: None,
        })
    }

    /// How the kernel module was obtained at the last (re)start, e.g.
    /// "cubin:sm_90a from the cache in 0.041 s".
    pub fn module_origin(&self) -> String {
        match &self.origin {
            Some(o) => format!(
                "{} {} in {:.3} s",
                o.target.label(),
                if o.from_cache {
                    "from the cache"
                } else {
                    "compiled by NVRTC"
                },
                o.elapsed.as_secs_f64()
            ),
            None => "not loaded".to_string(),
        }
    }

    /// Smallest split-KV chunk of the optimized kernel (tests lower it to force splitting).
    pub fn set_min_chunk_tokens(&mut self, tokens: u32) {
        self.min_chunk_tokens = tokens.max(1);
    }

    /// Runs the CUDA-core (FMA) optimized kernel even where the tensor-core one applies.
    pub fn set_prefer_fma(&mut self, prefer: bool) {
        self.prefer_fma = prefer;
    }

    /// Test hook: makes the device fault (an illegal-address write, which poisons the context)
    /// and handles it as a failing case would: the error comes back and the context is thrown
    /// away, to be rebuilt by the next case.
    #[doc(hidden)]
    pub fn inject_device_fault(&mut self) -> Result<(), CudaError> {
        self.ensure_session()?;
        let result = match self.session.as_ref() {
            Some(s) => super::launch::launch_fault(s).and_then(|_| {
                s.stream
                    .synchronize()
                    .map_err(CudaError::driver("synchronizing after the injected fault"))
            }),
            None => Err(no_session()),
        };
        if result.is_err() {
            self.discard_session();
        }
        result
    }

    /// Times the context was rebuilt after a device error.
    pub fn context_rebuilds(&self) -> u32 {
        self.rebuilds
    }

    /// Drops every device object and resets the context (after a device error).
    fn discard_session(&mut self) {
        self.pool = None;
        self.flush = None;
        if let Some(session) = self.session.take() {
            let was_primary = session.kind == ContextKind::Primary;
            drop(session);
            self.rebuilds += 1;
            self.reset_error = None;
            if was_primary {
                if let Err(e) = reset_primary_context(self.ordinal) {
                    tracing::warn!(error = %e, "resetting the CUDA context failed");
                    self.reset_error = Some(e.to_string());
                }
            }
        }
    }

    /// Opens a session if none is open: the primary context first, then (after a device error
    /// that the primary context does not recover from) a context of our own. When neither
    /// opens, the GPU is unusable for the rest of this process ([`CudaBackend::needs_restart`]).
    fn ensure_session(&mut self) -> Result<(), CudaError> {
        if self.session.is_some() {
            return Ok(());
        }
        if let Some(detail) = &self.unrecoverable {
            return Err(CudaError::Unrecoverable {
                detail: detail.clone(),
            });
        }
        let opened = DeviceSession::open(self.ordinal, &self.cache, ContextKind::Primary).or_else(
            |primary_err| {
                DeviceSession::open(self.ordinal, &self.cache, ContextKind::Own).map_err(
                    |own_err| CudaError::Unrecoverable {
                        detail: format!(
                            "primary context: {primary_err}; new context: {own_err}{}",
                            self.reset_error
                                .as_ref()
                                .map(|r| format!("; reset: {r}"))
                                .unwrap_or_default()
                        ),
                    },
                )
            },
        );
        match opened {
            Ok(s) => {
                self.origin = Some(s.origin.clone());
                self.session = Some(s);
                Ok(())
            }
            Err(e) => {
                if self.rebuilds > 0 {
                    if let CudaError::Unrecoverable { detail } = &e {
                        self.unrecoverable = Some(detail.clone());
                    }
                }
                Err(e)
            }
        }
    }

    /// True when a device error left the GPU unusable in this process (CUDA keeps some errors,
    /// such as an illegal address, for the life of the process): the caller should report and
    /// exit so that a fresh process takes over.
    pub fn needs_restart(&self) -> bool {
        self.unrecoverable.is_some()
    }

    /// Why the CUDA backend cannot run `case` at all (both kernels skipped).
    fn unsupported(case: &BenchCase) -> Option<String> {
        if let Some(r) = case.quant.unsupported_reason() {
            return Some(r);
        }
        if !SUPPORTED_HEAD_SIZES.contains(&case.head_size) {
            return Some(format!(
                "head size {} has no CUDA kernel; supported: 64, 128, 256",
                case.head_size
            ));
        }
        if case.num_kv_heads == 0 || !case.num_qo_heads.is_multiple_of(case.num_kv_heads) {
            return Some(format!(
                "{} qo heads cannot be grouped over {} kv heads",
                case.num_qo_heads, case.num_kv_heads
            ));
        }
        if !case.block_size.is_power_of_two() {
            return Some(format!(
                "block size {} is not a power of two; the CUDA kernels index pages by shifts",
                case.block_size
            ));
        }
        if case.batch_size == 0 || case.max_seq_len == 0 {
            return Some("empty case: batch size and max_seq_len must be >= 1".to_string());
        }
        None
    }

    fn run_kernels(
        &mut self,
        case: &BenchCase,
        probe: &mut dyn TelemetryProbe,
    ) -> Vec<KernelMeasurement> {
        let kinds = case.method.kernels.kinds();
        let all = |status: Status, message: String| {
            kinds
                .iter()
                .map(|&k| KernelMeasurement::not_timed(k, status, message.clone()))
                .collect::<Vec<_>>()
        };
        if let Some(reason) = Self::unsupported(case) {
            return all(Status::Skipped, reason);
        }
        if let Err(e) = self.ensure_session() {
            return all(Status::Failed, format!("CUDA device unavailable: {e}"));
        }
        let prepared = match self.prepare_case(case) {
            Ok(p) => p,
            Err(CaseError::Oom(m)) => return all(Status::Oom, m),
            Err(CaseError::Device(e)) => {
                self.discard_session();
                return all(Status::Failed, format!("setting up the case failed: {e}"));
            }
        };
        let mut out = Vec::with_capacity(2);
        let mut device_error = false;
        for &kind in kinds {
            let outcome = match kind {
                KernelKind::Baseline => self.run_baseline(case, &prepared, probe),
                KernelKind::Optimized => self.run_optimized(case, &prepared, probe),
            };
            match outcome {
                KernelOutcome::Measured(m) => out.push(m),
                KernelOutcome::DeviceError(m) => {
                    out.push(m);
                    device_error = true;
                    break;
                }
            }
        }
        drop(prepared);
        if device_error {
            self.discard_session();
            for &kind in kinds {
                if !out.iter().any(|m| m.kernel == Some(kind)) {
                    out.push(KernelMeasurement::not_timed(
                        kind,
                        Status::Failed,
                        "not run: an earlier kernel of this case hit a CUDA error",
                    ));
                }
            }
        }
        out
    }

    fn session(&self) -> Result<&DeviceSession, CaseError> {
        self.session
            .as_ref()
            .ok_or_else(|| CaseError::Device(no_session()))
    }

    /// Inputs (pool reused when possible) and the GPU reference output.
    fn prepare_case(&mut self, case: &BenchCase) -> Result<PreparedCase, CaseError> {
        let (seq_lens, tables) = host_schedule(case);
        {
            let session = self
                .session
                .as_ref()
                .ok_or_else(|| CaseError::Device(no_session()))?;
            ensure_pool(session, case, &seq_lens, &mut self.pool)?;
        }
        let session = self.session()?;
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| CaseError::Device(no_session()))?;
        let inputs = build_inputs(session, case, seq_lens, tables)?;
        let bytes_per_call = case.logical_bytes(&inputs.seq_lens);
        let reference = gpu_reference(session, case, &inputs, pool)?;
        Ok(PreparedCase {
            inputs,
            reference,
            bytes_per_call,
        })
    }

    fn run_baseline(
        &mut self,
        case: &BenchCase,
        prepared: &PreparedCase,
        probe: &mut dyn TelemetryProbe,
    ) -> KernelOutcome {
        let kind = KernelKind::Baseline;
        let result = (|| -> Result<KernelMeasurement, CaseError> {
            let session = self
                .session
                .as_ref()
                .ok_or_else(|| CaseError::Device(no_session()))?;
            let pool = self
                .pool
                .as_mut()
                .ok_or_else(|| CaseError::Device(no_session()))?;
            ensure_pool_bf16(session, case, pool)?;
            let q_bf16 = if case.quant.q == Dtype::Fp8 {
                Some(query_bf16(session, case, &prepared.inputs)?)
            } else {
                None
            };
            let (bytes, _) = output_bytes(case, Dtype::Bf16);
            ensure_free(session, bytes, "the baseline's output")?;
            let mut out = OutputBuffers {
                dtype: Dtype::Bf16,
                values: alloc_bytes(session, bytes, "the baseline's output")?,
                scale_factors: None,
            };
            let mut params = base_params(session, case, &prepared.inputs);
            params.q = q_bf16
                .as_ref()
                .map_or(dptr(session, &prepared.inputs.q), |s| dptr(session, s));
            params.kv = pool
                .bf16_copy
                .as_ref()
                .map_or(dptr(session, &pool.kv), |s| dptr(session, s));
            // Dequantized copies carry their scales already (the output's stays the case's).
            if case.quant.q == Dtype::Fp8 {
                params.scales.q_scale = 1.0;
            }
            if case.quant.kv == Dtype::Fp8 {
                params.scales.k_scale = 1.0;
                params.scales.v_scale = 1.0;
            }
            params.out = dptr(session, &out.values);
            let call = || launch_baseline(session, &params);
            let note = "bf16 paged decode on dequantized inputs, one CTA per (qo head, sequence)";
            let flush = &mut self.flush;
            verify_and_time(
                session, case, prepared, kind, &mut out, &call, flush, probe, note,
            )
        })();
        into_outcome(kind, result)
    }

    fn run_optimized(
        &mut self,
        case: &BenchCase,
        prepared: &PreparedCase,
        probe: &mut dyn TelemetryProbe,
    ) -> KernelOutcome {
        let kind = KernelKind::Optimized;
        let geometries = match choose_decode_geometries(
            case.head_size,
            case.group_size(),
            case.quant.kv,
            self.kernel_limits(),
            self.prefer_fma,
            self.mma_stages,
        ) {
            Ok(g) => g,
            Err(reason) => {
                return KernelOutcome::Measured(KernelMeasurement::not_timed(
                    kind,
                    Status::Skipped,
                    reason,
                ))
            }
        };
        let min_chunk = self.min_chunk_tokens;
        let result = (|| -> Result<KernelMeasurement, CaseError> {
            let session = self
                .session
                .as_ref()
                .ok_or_else(|| CaseError::Device(no_session()))?;
            // A chunking forced through set_min_chunk_tokens (tests, the self-test's split path)
            // is kept as is (the planner's plan, the first candidate); otherwise the planner's
            // plan may have a whole-sequence rival.
            let forced = min_chunk != MIN_CHUNK_TOKENS;
            let variants = geometries
                .iter()
                .map(|g| {
                    KernelVariant::prepare(session, case, g, &prepared.inputs, min_chunk, forced)
                })
                .collect::<Result<Vec<_>, CaseError>>()?;
            let (bytes, sf_bytes) = output_bytes(case, case.quant.out);
            let workspace: u64 = variants
                .iter()
                .flat_map(|v| &v.plans)
                .map(|p| workspace_bytes(case, p))
                .sum();
            ensure_free(
                session,
                bytes + sf_bytes + workspace,
                "the optimized kernel's output and split workspace",
            )?;
            let mut out = OutputBuffers {
                dtype: case.quant.out,
                values: alloc_bytes(session, bytes, "the optimized kernel's output")?,
                scale_factors: if sf_bytes > 0 {
                    Some(alloc_bytes(session, sf_bytes, "the nvfp4 scale factors")?)
                } else {
                    None
                },
            };
            let mut base = base_params(session, case, &prepared.inputs);
            base.q = dptr(session, &prepared.inputs.q);
            base.kv = dptr(
                session,
                &self
                    .pool
                    .as_ref()
                    .ok_or_else(|| CaseError::Device(no_session()))?
                    .kv,
            );
            base.out = dptr(session, &out.values);
            base.out_sf = out.scale_factors.as_ref().map_or(0, |s| dptr(session, s));
            // With a forced chunking the fused merge, where it applies, is not timed against the
            // merge kernel either: the self-test's split runs then cover the fused merge (up to
            // FUSED_MERGE_MAX_SPLITS splits) and the merge kernel (its long cases) every time.
            let merge_offer = |g: &DecodeGeometry| {
                if g.variant != DecodeVariant::Mma {
                    MergeOffer::KernelOnly
                } else if forced {
                    MergeOffer::FusedWhereItApplies
                } else {
                    MergeOffer::Both
                }
            };
            // Every variant's plans on the device: (variant, plan) -> uploaded.
            let mut uploaded = Vec::new();
            for (vi, v) in variants.iter().enumerate() {
                for (pi, plan) in v.plans.iter().enumerate() {
                    let u = upload_plan(session, case, plan, base, merge_offer(&v.geometry))?;
                    uploaded.push((vi, pi, u));
                }
            }
            // Pipeline depth, plan, launch order and merge (fused, or the merge kernel in each
            // of its row shapes that differ): where there is more than one combination, each is
            // tried on this case (a few calls) and the fastest kept.
            let merge_rows_of = |vi: usize, pi: usize, params: &AttnParams| -> &[MergeRows] {
                let splits = variants[vi].plans[pi].max_splits();
                let rows = case.num_qo_heads * case.batch_size;
                let kernel_merge = params.direct == 0 && params.fused_merge == 0;
                if kernel_merge && merge_rows_alternative(splits, rows, session.props.sm_count) {
                    &[MergeRows::Spread, MergeRows::Narrow]
                } else {
                    &[MergeRows::Spread]
                }
            };
            let trials: Vec<Trial> = uploaded
                .iter()
                .flat_map(|(vi, pi, u)| {
                    u.launches.iter().flat_map(move |(order, params)| {
                        merge_rows_of(*vi, *pi, params)
                            .iter()
                            .map(move |&merge_rows| Trial {
                                variant: *vi,
                                plan: *pi,
                                order: *order,
                                merge_rows,
                                params: *params,
                            })
                    })
                })
                .collect();
            let many_depths = variants.len() > 1;
            let many_plans = variants.iter().any(|v| v.plans.len() > 1);
            let quick = if trials.len() > 1 {
                quick_compare_ms(session, &case.method, trials.len(), &|i| {
                    let (trial, v) = (&trials[i], &variants[trials[i].variant]);
                    let plan = &v.plans[trial.plan];
                    let (ctas, splits) = (plan.launch.len() as u32, plan.max_splits());
                    let rows = trial.merge_rows;
                    launch_decode(
                        session,
                        &trial.params,
                        &v.geometry,
                        ctas,
                        splits,
                        rows,
                        &v.names,
                    )
                })?
            } else {
                Vec::new()
            };
            let mut best = (trials[0], f64::INFINITY);
            let mut timings = Vec::with_capacity(trials.len());
            for (trial, &ms) in trials.iter().zip(&quick) {
                let v = &variants[trial.variant];
                let mut label = Vec::new();
                if many_depths {
                    label.push(format!("s{}", v.geometry.stages));
                }
                if many_plans {
                    label.push(plan_label(&v.plans[trial.plan]));
                }
                label.push(trial.order.as_str().to_string());
                if trial.params.fused_merge != 0 {
                    label.push("fused".to_string());
                }
                if trial.merge_rows == MergeRows::Narrow {
                    label.push("narrow".to_string());
                }
                timings.push(format!("{} {ms:.4} ms", label.join(" ")));
                if ms < best.1 {
                    best = (*trial, ms);
                }
            }
            let chosen = best.0;
            let variant = &variants[chosen.variant];
            let (geometry, names) = (&variant.geometry, &variant.names);
            let plan = &variant.plans[chosen.plan];
            let mut params = chosen.params;
            let ctas = plan.launch.len() as u32;
            let max_splits = plan.max_splits();
            let rows = chosen.merge_rows;
            // The split partials' L2 policy (decode_mma.cu store_partial): evict-last keeps them
            // in the L2 from call to call, which saves their write-back on the long split cells,
            // and takes that much L2 from the cache's pages, which costs where a call re-reads
            // pages from the L2. Both are timed on the chosen configuration.
            let mut policy_note = String::new();
            if params.direct == 0 && geometry.variant == DecodeVariant::Mma {
                let policies = [0, 1].map(|evict_last| AttnParams {
                    partial_evict_last: evict_last,
                    ..params
                });
                let ms = quick_compare_ms(session, &case.method, policies.len(), &|i| {
                    launch_decode(
                        session,
                        &policies[i],
                        geometry,
                        ctas,
                        max_splits,
                        rows,
                        names,
                    )
                })?;
                let pick = usize::from(ms[1] < ms[0]);
                params = policies[pick];
                timings.push(format!(
                    "partials evict-normal {:.4} ms, evict-last {:.4} ms",
                    ms[0], ms[1]
                ));
                policy_note = format!(
                    ", partials stored evict-{}",
                    if pick == 1 { "last" } else { "normal" }
                );
            }
            let tried_note = if timings.is_empty() {
                String::new()
            } else {
                format!(" (tried {})", timings.join(", "))
            };
            let call = || launch_decode(session, &params, geometry, ctas, max_splits, rows, names);
            let note = format!(
                "{} ({}); block {}x{}x{}, {} stages, {} B smem, {} CTAs/SM; {}{}; launch order {}{}",
                names.decode,
                geometry.variant.as_str(),
                geometry.block.0,
                geometry.block.1,
                geometry.block.2,
                geometry.stages,
                geometry.smem_bytes,
                variant.ctas_per_sm,
                describe_plan(plan, params.fused_merge != 0, rows),
                policy_note,
                chosen.order.as_str(),
                tried_note
            );
            let flush = &mut self.flush;
            verify_and_time(
                session, case, prepared, kind, &mut out, &call, flush, probe, &note,
            )
        })();
        into_outcome(kind, result)
    }
}

/// One compiled form of the optimized kernel for a case (its geometry, at one pipeline depth),
/// with the split plans it is offered: the plans depend on how many of its CTAs fit an SM.
struct KernelVariant {
    geometry: DecodeGeometry,
    names: DecodeNames,
    ctas_per_sm: u32,
    plans: Vec<SplitPlan>,
}

impl KernelVariant {
    fn prepare(
        session: &DeviceSession,
        case: &BenchCase,
        geometry: &DecodeGeometry,
        inputs: &CaseInputs,
        min_chunk: u32,
        forced: bool,
    ) -> Result<KernelVariant, CaseError> {
        let names = DecodeNames::for_case(case, geometry);
        prepare_decode(session, &names, geometry)?;
        let ctas_per_sm = decode_ctas_per_sm(session, &names, geometry)?;
        let mut plans = plan_candidates(
            &inputs.seq_lens,
            case.num_kv_heads,
            session.props.sm_count * ctas_per_sm,
            geometry.stage_tokens,
            min_chunk,
        );
        // A forced chunking keeps the planner's plan alone. NVFP4 output also times each split
        // plan with its one-item sequences merged instead of written by their own CTAs: that
        // epilogue is NVFP4's longest (SplitPlan::without_direct_items).
        if forced {
            plans.truncate(1);
        } else if case.quant.out == Dtype::Nvfp4 {
            let merged: Vec<SplitPlan> = plans
                .iter()
                .filter(|p| !p.direct && p.has_direct_items())
                .map(SplitPlan::without_direct_items)
                .collect();
            plans.extend(merged);
        }
        Ok(KernelVariant {
            geometry: *geometry,
            names,
            ctas_per_sm,
            plans,
        })
    }
}

/// One launch configuration the optimized kernel may be timed with.
#[derive(Debug, Clone, Copy)]
struct Trial {
    variant: usize,
    plan: usize,
    order: LaunchOrder,
    merge_rows: MergeRows,
    params: AttnParams,
}

/// The GPU reference checked against the CPU reference on one case.
#[derive(Debug, Clone)]
pub(crate) struct ReferenceCheck {
    pub passed: bool,
    pub max_abs_err: f64,
    pub rel_l2_err: f64,
    pub detail: String,
}

/// Largest deviation of the f32 GPU reference from the f64 CPU reference, as a fraction of the
/// largest |output|: f32 accumulation over a few thousand terms stays orders of magnitude below.
pub(crate) const GPU_REFERENCE_TOLERANCE: f64 = 1e-4;

/// One self-test case: the reference check and each kernel's measurement (labelled).
pub(crate) struct SelftestCaseResult {
    pub reference: Result<ReferenceCheck, String>,
    pub kernels: Vec<(String, KernelMeasurement)>,
}

/// What `check_conversions` (reference.cu) found over every f32 bit pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ConversionCheck {
    /// e4m3 codes of the kernels' conversion (hardware on sm_89+) that differ from the software
    /// rounding, over non-NaN inputs.
    pub e4m3_mismatches: u32,
    /// NaN inputs whose e4m3 code is not a NaN.
    pub e4m3_nan_mismatches: u32,
    /// e2m1 codes that differ from the nearest-magnitude formulation.
    pub e2m1_mismatches: u32,
    /// The smallest mismatching input bit patterns, if any.
    pub first_e4m3: Option<u32>,
    pub first_e2m1: Option<u32>,
    /// NVFP4 element codes (reciprocal and correction) that differ from e2m1 of the correctly
    /// rounded quotient, and the first such (element bits, scale-factor code).
    pub nvfp4_mismatches: u32,
    pub first_nvfp4: Option<(u32, u8)>,
    /// NVFP4 scale-factor codes computed without a division that differ from e4m3(t / 6), over
    /// every f32 t, and the smallest such t's bits.
    pub sf_mismatches: u32,
    pub first_sf: Option<u32>,
    /// Positive e4m3 scale factors whose fast reciprocal is not the correctly rounded one.
    pub rcp_mismatches: u32,
    /// f32 values from 2^-126 to 2^125 whose branch-free reciprocal (`rcp_rn_normal`: the
    /// scale factors' and the merge's 1 / sum of weights) is not the correctly rounded one.
    pub normal_rcp_mismatches: u32,
}

impl CudaBackend {
    /// Runs the exhaustive number-format checks (every f32 bit pattern; every NVFP4 scale factor
    /// with every element value up to 16 times it): a few tens of milliseconds.
    pub(crate) fn check_conversions(&mut self) -> Result<ConversionCheck, CudaError> {
        self.ensure_session()?;
        let session = self.session.as_ref().ok_or_else(no_session)?;
        let run = |name: &str, init: &[u32]| -> Result<Vec<u32>, CudaError> {
            let result = session
                .stream
                .clone_htod(init)
                .map_err(CudaError::driver("copying a format check's counters"))?;
            launch_format_check(session, name, dptr(session, &result))?;
            session
                .stream
                .clone_dtoh(&result)
                .map_err(CudaError::driver("copying a format check's counts"))
        };
        let c = run(
            "check_conversions",
            &[0, 0, 0, u32::MAX, u32::MAX, 0, u32::MAX, 0],
        )?;
        let n = run("check_nvfp4_codes", &[0, u32::MAX, 0, 0])?;
        let first = |v: u32| (v != u32::MAX).then_some(v);
        Ok(ConversionCheck {
            e4m3_mismatches: c[0],
            e4m3_nan_mismatches: c[1],
            e2m1_mismatches: c[2],
            first_e4m3: first(c[3]),
            first_e2m1: first(c[4]),
            nvfp4_mismatches: n[0],
            first_nvfp4: first(n[1]).map(|y| (y, n[2] as u8)),
            sf_mismatches: c[5],
            first_sf: first(c[6]),
            rcp_mismatches: n[3],
            normal_rcp_mismatches: c[7],
        })
    }

    /// What the open device allows the optimized kernel (nothing without a session: the FMA
    /// kernel then, which needs no opt-in).
    fn kernel_limits(&self) -> KernelLimits {
        self.session
            .as_ref()
            .map_or(KernelLimits::default(), |s| s.props.kernel_limits())
    }

    /// Pipeline depths of the tensor-core kernel that `case` may run with on this device (none
    /// where the kernel does not apply).
    fn mma_depths(&self, case: &BenchCase) -> Vec<u32> {
        let (h, g, kv) = (case.head_size, case.group_size(), case.quant.kv);
        choose_decode_geometries(h, g, kv, self.kernel_limits(), false, None)
            .unwrap_or_default()
            .iter()
            .filter(|g| g.variant == DecodeVariant::Mma)
            .map(|g| g.stages)
            .collect()
    }

    /// Runs `case` for the self-test: the GPU reference is compared with the CPU reference on
    /// host copies of the device inputs, then the baseline and the optimized kernel (once per
    /// entry of `min_chunks`, to cover both the direct and the split-KV path) are verified
    /// against the CPU reference and briefly timed.
    pub(crate) fn selftest_case(
        &mut self,
        case: &BenchCase,
        min_chunks: &[u32],
    ) -> SelftestCaseResult {
        let mut probe = crate::backend::NoTelemetry;
        let failed = |msg: String| SelftestCaseResult {
            reference: Err(msg),
            kernels: Vec::new(),
        };
        if let Some(reason) = Self::unsupported(case) {
            return failed(format!("unsupported: {reason}"));
        }
        if let Err(e) = self.ensure_session() {
            return failed(format!("device unavailable: {e}"));
        }
        let mut prepared = match self.prepare_case(case) {
            Ok(p) => p,
            Err(CaseError::Oom(m)) => return failed(format!("out of memory: {m}")),
            Err(CaseError::Device(e)) => {
                self.discard_session();
                return failed(format!("CUDA error: {e}"));
            }
        };
        let host = match (self.session.as_ref(), self.pool.as_ref()) {
            (Some(s), Some(pool)) => super::verify::inputs_to_host(s, case, &prepared.inputs, pool),
            _ => Err(CaseError::Device(no_session())),
        };
        let host = match host {
            Ok(h) => h,
            Err(CaseError::Oom(m)) => return failed(m),
            Err(CaseError::Device(e)) => {
                self.discard_session();
                return failed(format!("CUDA error: {e}"));
            }
        };
        let cpu = crate::reference::attention_f64(case, &host);
        let reference = compare_references(&prepared.reference, &cpu);
        prepared.reference = cpu;
        let mut kernels = Vec::new();
        let saved = self.min_chunk_tokens;
        let saved_fma = self.prefer_fma;
        // The last chunking runs once per pipeline depth of the tensor-core kernel (the depth
        // changes only the pipeline, which split and whole-sequence items share), so every
        // compiled depth is checked whichever one the timing picks.
        let depths: Vec<u32> = self.mma_depths(case);
        let optimized = |min_chunk, prefer_fma, stages| {
            Some(OptimizedSettings {
                min_chunk,
                prefer_fma,
                stages,
            })
        };
        let mut runs = vec![("baseline".to_string(), None)];
        for (i, &c) in min_chunks.iter().enumerate() {
            if i + 1 == min_chunks.len() && depths.len() > 1 {
                for &d in &depths {
                    runs.push((
                        format!("optimized(chunk>={c},s{d})"),
                        optimized(c, false, Some(d)),
                    ));
                }
            } else {
                runs.push((format!("optimized(chunk>={c})"), optimized(c, false, None)));
            }
        }
        if let Some(&c) = min_chunks.last() {
            runs.push((
                format!("optimized-fma(chunk>={c})"),
                optimized(c, true, None),
            ));
        }
        for (label, setting) in runs {
            let outcome = match setting {
                None => self.run_baseline(case, &prepared, &mut probe),
                Some(o) => {
                    self.min_chunk_tokens = o.min_chunk;
                    self.prefer_fma = o.prefer_fma;
                    self.mma_stages = o.stages;
                    let out = self.run_optimized(case, &prepared, &mut probe);
                    self.prefer_fma = saved_fma;
                    self.mma_stages = None;
                    out
                }
            };
            match outcome {
                KernelOutcome::Measured(m) => kernels.push((label, m)),
                KernelOutcome::DeviceError(m) => {
                    kernels.push((label, m));
                    drop(prepared);
                    self.min_chunk_tokens = saved;
                    self.discard_session();
                    return SelftestCaseResult {
                        reference: Ok(reference),
                        kernels,
                    };
                }
            }
        }
        self.min_chunk_tokens = saved;
        SelftestCaseResult {
            reference: Ok(reference),
            kernels,
        }
    }
}

/// How the self-test runs the optimized kernel once.
#[derive(Debug, Clone, Copy)]
struct OptimizedSettings {
    min_chunk: u32,
    prefer_fma: bool,
    stages: Option<u32>,
}

/// Compares the GPU reference (f32, held as f64) with the CPU one.
pub(crate) fn compare_references(gpu: &[f64], cpu: &[f64]) -> ReferenceCheck {
    if gpu.len() != cpu.len() {
        return ReferenceCheck {
            passed: false,
            max_abs_err: f64::INFINITY,
            rel_l2_err: f64::INFINITY,
            detail: format!("GPU reference has {} values, CPU {}", gpu.len(), cpu.len()),
        };
    }
    let scale = cpu.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let (mut max_abs, mut err2, mut ref2, mut worst) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    let mut finite = true;
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        finite &= g.is_finite();
        let e = (g - c).abs();
        if e > max_abs || e.is_nan() {
            max_abs = e;
            worst = i;
        }
        err2 += e * e;
        ref2 += c * c;
    }
    let rel_l2 = if ref2 > 0.0 {
        (err2 / ref2).sqrt()
    } else {
        err2.sqrt()
    };
    let passed = finite && max_abs <= GPU_REFERENCE_TOLERANCE * scale.max(f64::MIN_POSITIVE);
    ReferenceCheck {
        passed,
        max_abs_err: max_abs,
        rel_l2_err: rel_l2,
        detail: format!(
            "max |gpu - cpu| {max_abs:.3e} at {worst} (limit {:.3e}), rel L2 {rel_l2:.3e}",
            GPU_REFERENCE_TOLERANCE * scale
        ),
    }
}

fn no_session() -> CudaError {
    CudaError::Internal {
        context: "running a case".into(),
        message: "no open device session".into(),
    }
}

fn describe_plan(plan: &SplitPlan, fused_merge: bool, merge_rows: MergeRows) -> String {
    if plan.direct {
        format!("{} items, no split", plan.items.len())
    } else {
        format!(
            "split-KV: {} items of <= {} tokens (up to {} per sequence{}) + {}",
            plan.items.len(),
            plan.chunk_tokens,
            plan.max_splits(),
            if plan.merges_one_item_sequences() {
                "; one-item sequences merged too"
            } else {
                ""
            },
            match (fused_merge, merge_rows) {
                (true, _) => "fused merge",
                (false, MergeRows::Spread) => "merge",
                (false, MergeRows::Narrow) => "merge (a row per CTA)",
            }
        )
    }
}

/// A plan's short name in the launch-choice note.
fn plan_label(plan: &SplitPlan) -> String {
    if plan.direct {
        return "whole".to_string();
    }
    if plan.merges_one_item_sequences() {
        format!("split<={} all-merged", plan.chunk_tokens)
    } else {
        format!("split<={}", plan.chunk_tokens)
    }
}

/// A plan on the device: its launch list in each distinct order, with the fused merge and with the
/// merge kernel where the fused one applies (as kernel parameters, ready to launch), and the
/// buffers they point at, which live as long as this.
struct UploadedPlan {
    launches: Vec<(LaunchOrder, AttnParams)>,
    _lists: Vec<CudaSlice<WorkItem>>,
    _offsets: CudaSlice<i32>,
    _partials: Option<(CudaSlice<u8>, CudaSlice<u8>)>,
    _counters: Option<CudaSlice<u8>>,
}

/// Which merges a split plan is offered with. The fused merge exists in the tensor-core kernel
/// only, and applies where no sequence has more than [`FUSED_MERGE_MAX_SPLITS`] splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MergeOffer {
    /// The merge kernel (the FMA kernel).
    KernelOnly,
    /// The fused merge where it applies, and the merge kernel beside it (timed, the faster kept).
    Both,
    /// The fused merge where it applies, else the merge kernel.
    FusedWhereItApplies,
}

/// Uploads `plan` (launch lists, split offsets, partial-output workspace, the fused merge's
/// counters) and fills in the parameters that depend on it over `base`: one launch per distinct
/// order (with one kv head both orders are the same list, and only it is uploaded) and offered
/// merge.
fn upload_plan(
    session: &DeviceSession,
    case: &BenchCase,
    plan: &SplitPlan,
    base: AttnParams,
    merge: MergeOffer,
) -> Result<UploadedPlan, CaseError> {
    let offsets = session
        .stream
        .clone_htod(&plan.split_offsets)
        .map_err(CudaError::driver("copying the split offsets"))?;
    let rows = plan.items.len() as u64 * case.num_qo_heads as u64;
    let partials = if plan.direct {
        None
    } else {
        Some((
            alloc_bytes(
                session,
                rows * case.head_size as u64 * 4,
                "split partial outputs",
            )?,
            alloc_bytes(session, rows * 4, "split log-sum-exps")?,
        ))
    };
    let fused = merge != MergeOffer::KernelOnly
        && !plan.direct
        && plan.max_splits() <= FUSED_MERGE_MAX_SPLITS;
    let counters = if fused {
        let bytes = case.batch_size as u64 * case.num_kv_heads as u64 * 4;
        let mut c = alloc_bytes(session, bytes, "the fused merge's counters")?;
        memset(session, &mut c, 0)?;
        Some(c)
    } else {
        None
    };
    let mut params = base;
    params.split_offsets = dptr(session, &offsets);
    params.direct = plan.direct as i32;
    params.direct_items = plan.has_direct_items() as i32;
    if let Some((po, lse)) = &partials {
        params.partial_o = dptr(session, po);
        params.partial_lse = dptr(session, lse);
        // The partial rows: the split offsets' last entry (plan.rs), already the kernels' i32.
        params.lse_stride = plan.split_offsets.last().copied().unwrap_or(0);
    }
    if let Some(c) = &counters {
        params.merge_counters = dptr(session, c);
        params.fused_merge = 1;
    }
    let mut host_lists: Vec<(LaunchOrder, Vec<WorkItem>)> = Vec::new();
    for order in LaunchOrder::ALL {
        let list = plan.launch_list(order);
        if !host_lists.iter().any(|(_, l)| *l == list) {
            host_lists.push((order, list));
        }
    }
    let mut launches = Vec::with_capacity(2 * host_lists.len());
    let mut lists = Vec::with_capacity(host_lists.len());
    for (order, list) in &host_lists {
        let list = session
            .stream
            .clone_htod(list)
            .map_err(CudaError::driver("copying the split plan"))?;
        let mut p = params;
        p.work = dptr(session, &list);
        launches.push((*order, p));
        if counters.is_some() && merge == MergeOffer::Both {
            // The same list with the merge kernel instead of the fused merge.
            let mut k = p;
            k.fused_merge = 0;
            launches.push((*order, k));
        }
        lists.push(list);
    }
    Ok(UploadedPlan {
        launches,
        _lists: lists,
        _offsets: offsets,
        _partials: partials,
        _counters: counters,
    })
}

fn workspace_bytes(case: &BenchCase, plan: &SplitPlan) -> u64 {
    let rows = plan.items.len() as u64 * case.num_qo_heads as u64;
    let partials = if plan.direct {
        0
    } else {
        rows * case.head_size as u64 * 4 + rows * 4
    };
    // At most one launch list per launch order, the split offsets and the fused merge's counters.
    let lists = LaunchOrder::ALL.len() as u64 * plan.launch.len() as u64;
    let counters = case.batch_size as u64 * case.num_kv_heads as u64 * 4;
    partials + (lists + plan.split_offsets.len() as u64) * 16 + counters
}

fn into_outcome(kind: KernelKind, result: Result<KernelMeasurement, CaseError>) -> KernelOutcome {
    match result {
        Ok(m) => KernelOutcome::Measured(m),
        Err(CaseError::Oom(msg)) => {
            KernelOutcome::Measured(KernelMeasurement::not_timed(kind, Status::Oom, msg))
        }
        Err(CaseError::Device(e)) => KernelOutcome::DeviceError(KernelMeasurement::not_timed(
            kind,
            Status::Failed,
            format!("CUDA error: {e}"),
        )),
    }
}

/// A case's inputs and GPU reference, shared by both kernels.
pub(crate) struct PreparedCase {
    pub inputs: CaseInputs,
    pub reference: Vec<f64>,
    pub bytes_per_call: u64,
}

/// Shape and scale parameters plus the case's tables.
fn base_params(session: &DeviceSession, case: &BenchCase, inputs: &CaseInputs) -> AttnParams {
    let mut p = case_params(case);
    p.block_tables = dptr(session, &inputs.d_tables);
    p.seq_lens = dptr(session, &inputs.d_seq_lens);
    p
}

/// The GPU reference output of the case, as f64.
pub(crate) fn gpu_reference(
    session: &DeviceSession,
    case: &BenchCase,
    inputs: &CaseInputs,
    pool: &DevicePool,
) -> Result<Vec<f64>, CaseError> {
    let elems = case.batch_size as u64 * case.num_qo_heads as u64 * case.head_size as u64;
    ensure_free(session, elems * 4, "the reference output")?;
    let out = alloc_bytes(session, elems * 4, "the reference output")?;
    let mut params = base_params(session, case, inputs);
    params.q = dptr(session, &inputs.q);
    params.kv = dptr(session, &pool.kv);
    params.out = dptr(session, &out);
    launch_reference(
        session,
        &params,
        case.quant.q == Dtype::Fp8,
        case.quant.kv == Dtype::Fp8,
    )?;
    let bytes: Vec<u8> = session
        .stream
        .clone_dtoh(&out)
        .map_err(CudaError::driver("copying the reference output"))?;
    Ok(bytes
        .chunks_exact(4)
        .take(elems as usize)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect())
}

/// Verifies one call of `call` against the reference; when right, times it, and verifies the
/// output its timed calls left as well.
#[allow(clippy::too_many_arguments)]
fn verify_and_time(
    session: &DeviceSession,
    case: &BenchCase,
    prepared: &PreparedCase,
    kind: KernelKind,
    out: &mut OutputBuffers,
    call: &dyn Fn() -> Result<(), CudaError>,
    flush: &mut Option<CudaSlice<u8>>,
    probe: &mut dyn TelemetryProbe,
    note: &str,
) -> Result<KernelMeasurement, CaseError> {
    out.poison(session)?;
    call()?;
    session.stream.synchronize().map_err(CudaError::driver(
        "running the kernel once for verification",
    ))?;
    // The output buffers as the last call left them, checked against the GPU reference.
    let out = &*out;
    let verify = || -> Result<_, CaseError> {
        let decoded = decode_device_output(session, case, out)?;
        Ok(check(case, &decoded, &prepared.reference, out.dtype))
    };
    let against_reference = |detail: &str| format!("{note}; against the GPU reference: {detail}");
    let verification = verify()?;
    let mut m = KernelMeasurement {
        kernel: Some(kind),
        bytes_per_call: prepared.bytes_per_call,
        accuracy: Some(verification.accuracy),
        ..Default::default()
    };
    if !verification.passed {
        m.status = Some(Status::WrongResult);
        m.message = against_reference(&verification.detail);
        return Ok(m);
    }

    if case.method.l2 == L2Mode::Cold && flush.is_none() {
        *flush = Some(l2_flush_buffer(session)?);
    }
    let calibrated = None::<f64>;
    let mut retries_used = 0;
    loop {
        let trials = time_calls(session, &case.method, flush.as_mut(), probe, call)?;
        let throttled = trials.telemetry.throttled();
        m.samples_ms = trials.samples_ms;
        m.rse_target_met = trials.rse_target_met;
        m.telemetry = trials.telemetry;
        m.throttled = throttled;
        if throttled && retries_used < case.method.throttle_retries {
            retries_used += 1;
            std::thread::sleep(THROTTLE_COOLDOWN);
            continue;
        }
        break;
    }
    m.throttle_retries_used = retries_used;
    m.finish_stats(calibrated);
    m.status = Some(Status::Ok);
    m.message = format!("{note}; verified: {}", verification.detail);
    // The output the timed calls left is checked too: calls that disturb each other (a race
    // between chained calls, a count or buffer one call leaves for the next) pass the one
    // verified call above, and their times would then not be a measurement of correct work.
    let after = verify()?;
    if !after.passed {
        return Ok(m.wrong_after_timing(after.accuracy, &against_reference(&after.detail)));
    }
    Ok(m)
}

impl Backend for CudaBackend {
    fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    fn needs_restart(&self) -> bool {
        CudaBackend::needs_restart(self)
    }

    fn inject_device_fault(&mut self) -> Result<String, String> {
        match CudaBackend::inject_device_fault(self) {
            Err(e) => Ok(format!("GPU {} faulted: {e}", self.ordinal)),
            Ok(()) => Err(format!(
                "the fault kernel ran on GPU {} without faulting the device",
                self.ordinal
            )),
        }
    }

    fn run_case(&mut self, case: &BenchCase, probe: &mut dyn TelemetryProbe) -> CaseMeasurement {
        let started = Instant::now();
        let mut kernels = self.run_kernels(case, probe);
        let calibrated = self.identity.calibrated_read_gbps;
        for k in &mut kernels {
            if k.status == Some(Status::Ok) {
                k.finish_stats(calibrated);
            }
        }
        CaseMeasurement {
            case_id: case.id.clone(),
            kernels,
            wall_s: started.elapsed().as_secs_f64(),
        }
    }
}
