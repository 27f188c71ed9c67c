//! Trying the CUDA backend on a GPU machine: probe, start-up (compile, then cache), self-test and
//! a timed sweep, in one run.
//!
//! ```text
//! gpu_check compile 9.0          # NVRTC only, no GPU needed: compile (and cache) for sm_90a
//! gpu_check probe
//! gpu_check selftest [quick]
//! gpu_check bench [quick]
//! gpu_check all [quick]
//! gpu_check fault                # a deliberate device fault, then a case on a fresh context
//! ```
//! Full outputs go to `$OUT` (or the current directory): selftest.txt, bench.json, bench.txt.

use decodebench_kernels::cuda::{precompile, selftest, CompileCache, SelftestOptions};
use decodebench_kernels::workload::REFERENCE_POOL_TOKENS;
use decodebench_kernels::{
    Backend, BenchCase, CaseMeasurement, CudaBackend, KernelKind, KvLayout, KvPool, L2Mode,
    MeasureMethod, NoTelemetry, QuantMode, Status, TimingMode,
};
use std::error::Error;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

fn out_dir() -> PathBuf {
    std::env::var_os("OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn case(
    batch: u32,
    seq: u32,
    quant: QuantMode,
    layout: KvLayout,
    block: u32,
    pool: KvPool,
    method: MeasureMethod,
) -> BenchCase {
    BenchCase {
        id: String::new(),
        batch_size: batch,
        max_seq_len: seq,
        quant,
        num_qo_heads: 64,
        num_kv_heads: 8,
        head_size: 128,
        layout,
        block_size: block,
        pool,
        seed: 42,
        method,
    }
    .with_id()
}

fn bench_cases(quick: bool) -> Vec<(String, BenchCase)> {
    let shared = KvPool::Shared {
        tokens: REFERENCE_POOL_TOKENS,
    };
    let m = MeasureMethod::default();
    let mut cases = Vec::new();
    let batches: &[u32] = if quick { &[1, 64] } else { &[1, 16, 64, 256] };
    let seqs: &[u32] = if quick {
        &[8192]
    } else {
        &[1024, 16384, 131072]
    };
    for quant in QuantMode::REFERENCE {
        for &s in seqs {
            for &b in batches {
                cases.push((
                    "grid".to_string(),
                    case(b, s, quant, KvLayout::Hnd, 16, shared, m.clone()),
                ));
            }
        }
    }
    // The measurement-method checks: one bf16 case (b16 s4096, shared pool) under each method.
    let method_case =
        |method: MeasureMethod| case(16, 4096, QuantMode::BF16, KvLayout::Hnd, 16, shared, method);
    let variants: Vec<(&str, BenchCase)> = vec![
        (
            "unique",
            case(
                64,
                8192,
                QuantMode::BF16,
                KvLayout::Hnd,
                16,
                KvPool::Unique,
                m.clone(),
            ),
        ),
        (
            "unique",
            case(
                64,
                8192,
                QuantMode::FP8_QKV_OUT,
                KvLayout::Hnd,
                16,
                KvPool::Unique,
                m.clone(),
            ),
        ),
        (
            "cold-l2",
            method_case(MeasureMethod {
                l2: L2Mode::Cold,
                ..m.clone()
            }),
        ),
        ("hot-l2", method_case(m.clone())),
        (
            "graph",
            method_case(MeasureMethod {
                timing: TimingMode::Graph,
                ..m.clone()
            }),
        ),
        (
            "rse0.005",
            method_case(MeasureMethod {
                target_rse: Some(0.005),
                max_trials: 500,
                max_time_s: 3.0,
                ..m.clone()
            }),
        ),
        (
            "nhd-blk64",
            case(
                64,
                8192,
                QuantMode::FP8_QKV_NVFP4_OUT,
                KvLayout::Nhd,
                64,
                shared,
                m.clone(),
            ),
        ),
        (
            "oom",
            BenchCase {
                head_size: 256,
                ..case(
                    256,
                    131072,
                    QuantMode::BF16,
                    KvLayout::Hnd,
                    16,
                    KvPool::Unique,
                    m.clone(),
                )
            }
            .with_id(),
        ),
        (
            "skip",
            BenchCase {
                head_size: 96,
                ..case(
                    4,
                    1024,
                    QuantMode::BF16,
                    KvLayout::Hnd,
                    16,
                    shared,
                    m.clone(),
                )
            }
            .with_id(),
        ),
    ];
    cases.extend(variants.into_iter().map(|(t, c)| (t.to_string(), c)));
    cases
}

fn summary_line(tag: &str, c: &BenchCase, r: &CaseMeasurement) -> String {
    let get = |k| r.kernels.iter().find(|m| m.kernel == Some(k));
    let (b, o) = (get(KernelKind::Baseline), get(KernelKind::Optimized));
    let mean = |m: Option<&decodebench_kernels::KernelMeasurement>| {
        m.and_then(|m| m.stats).map(|s| s.mean_ms)
    };
    let status = |m: Option<&decodebench_kernels::KernelMeasurement>| {
        m.and_then(|m| m.status).map_or("-", |s| s.as_str())
    };
    let speedup = match (mean(b), mean(o)) {
        (Some(b), Some(o)) if b > 0.0 => format!("{:+.1}%", (b - o) / b * 100.0),
        _ => "-".into(),
    };
    let fmt_ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let bw = |m: Option<&decodebench_kernels::KernelMeasurement>| {
        m.and_then(|m| m.bandwidth_gbps)
            .map_or("-".to_string(), |v| format!("{v:.0}"))
    };
    let frac = o
        .and_then(|m| m.bandwidth_fraction)
        .map_or("-".to_string(), |v| format!("{v:.2}"));
    format!(
        "{tag:<10} {:<46} base {:>9} ms {:>5} GB/s [{:<12}] opt {:>9} ms {:>5} GB/s ({frac}) [{:<12}] {speedup}",
        c.label(),
        fmt_ms(mean(b)),
        bw(b),
        status(b),
        fmt_ms(mean(o)),
        bw(o),
        status(o)
    )
}

fn run_bench(backend: &mut CudaBackend, quick: bool) -> Result<bool, Box<dyn Error>> {
    let mut all = Vec::new();
    let mut text = String::new();
    let mut ok = true;
    for (tag, c) in bench_cases(quick) {
        let t = Instant::now();
        let r = backend.run_case(&c, &mut NoTelemetry);
        let line = format!(
            "{} ({:.1} s)",
            summary_line(&tag, &c, &r),
            t.elapsed().as_secs_f64()
        );
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
        for k in &r.kernels {
            let s = k.status.unwrap_or(Status::Failed);
            let expected_bad =
                (tag == "oom" && s == Status::Oom) || (tag == "skip" && s == Status::Skipped);
            if s != Status::Ok && !expected_bad {
                ok = false;
            }
            if s != Status::Ok {
                let msg = format!("    {:?} {}: {}", k.kernel, s.as_str(), k.message);
                println!("{msg}");
                text.push_str(&msg);
                text.push('\n');
            } else {
                let msg = format!(
                    "    {:?}: rse {:.4}, rse_met {:?}, samples {}, acc {:?}; {}",
                    k.kernel,
                    k.stats.map_or(0.0, |s| s.rse),
                    k.rse_target_met,
                    k.samples_ms.len(),
                    k.accuracy.map(|a| (a.max_abs_err, a.rel_l2_err)),
                    k.message
                );
                text.push_str(&msg);
                text.push('\n');
            }
        }
        all.push((c, r));
    }
    println!("context rebuilds: {}", backend.context_rebuilds());
    std::fs::write(out_dir().join("bench.txt"), text)?;
    let json = serde_json::to_string_pretty(&all.iter().map(|(c, r)| (c, r)).collect::<Vec<_>>())?;
    std::fs::write(out_dir().join("bench.json"), json)?;
    Ok(ok)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("all");
    let quick = args.iter().any(|a| a == "quick");
    let mut ok = true;
    match mode {
        "compile" => {
            let cc = args.get(1).map(String::as_str).unwrap_or("9.0");
            let (major, minor) = cc.split_once('.').unwrap_or((cc, "0"));
            let done = precompile(major.parse()?, minor.parse()?, &CompileCache::from_env())?;
            println!("{}\n{}", done.description, done.resources.summary());
        }
        "fault" => {
            let mut backend = CudaBackend::with_cache(0, CompileCache::from_env(), false)?;
            let cases = bench_cases(true);
            let (_, c) = &cases[0];
            let before = backend.run_case(c, &mut NoTelemetry);
            let fault = backend.inject_device_fault();
            println!("injected fault -> {fault:?}");
            let after = backend.run_case(c, &mut NoTelemetry);
            let statuses = |r: &CaseMeasurement| {
                r.kernels
                    .iter()
                    .map(|k| k.status.map_or("none", |s| s.as_str()))
                    .collect::<Vec<_>>()
            };
            println!(
                "before {:?}, after {:?}, context rebuilds {}, module {}",
                statuses(&before),
                statuses(&after),
                backend.context_rebuilds(),
                backend.module_origin()
            );
            for k in &after.kernels {
                if k.status != Some(Status::Ok) {
                    println!("after: {:?}: {}", k.kernel, k.message);
                }
            }
            let again = backend.run_case(c, &mut NoTelemetry);
            println!(
                "third run {:?}, rebuilds {}",
                statuses(&again),
                backend.context_rebuilds()
            );
            for k in &again.kernels {
                if k.status != Some(Status::Ok) {
                    println!("third: {:?}: {}", k.kernel, k.message);
                }
            }
            println!("needs restart: {}", backend.needs_restart());
            // Either the context came back, or the backend says the process must restart and
            // fails later cases at once (CUDA's rule for sticky errors).
            let recovered = backend.context_rebuilds() == 1
                && after.kernels.iter().all(|k| k.status == Some(Status::Ok));
            let flagged = backend.needs_restart()
                && again.kernels.iter().all(|k| {
                    k.status == Some(Status::Failed) && k.message.contains("restart the process")
                });
            ok = fault.is_err() && (recovered || flagged);
            println!(
                "fault handling: {} ({})",
                if ok { "PASS" } else { "FAIL" },
                if recovered {
                    "context rebuilt"
                } else {
                    "process restart required"
                }
            );
        }
        "probe" | "selftest" | "bench" | "all" => {
            match CudaBackend::probe() {
                Ok(devices) => {
                    for d in &devices {
                        println!("device {d:?}");
                    }
                }
                Err(e) => {
                    println!("probe failed: {e}");
                    std::process::exit(2);
                }
            }
            if mode == "probe" {
                return Ok(());
            }
            if mode == "selftest" || mode == "all" {
                let t = Instant::now();
                let report = selftest(&SelftestOptions {
                    quick,
                    ..Default::default()
                })?;
                std::fs::write(out_dir().join("selftest.txt"), report.table())?;
                println!("{}", report.module);
                for r in report.rows.iter().filter(|r| !r.passed) {
                    println!("FAIL {} {}: {}", r.case, r.check, r.detail);
                }
                println!(
                    "selftest: {} checks, {} failed, {:.1} s",
                    report.rows.len(),
                    report.failures(),
                    t.elapsed().as_secs_f64()
                );
                ok &= report.passed();
            }
            if mode == "bench" || mode == "all" {
                for attempt in 0..2 {
                    let t = Instant::now();
                    let backend = CudaBackend::new(0)?;
                    println!(
                        "start {attempt}: {:.2} s total, module {}; calibrated read {:?} GB/s",
                        t.elapsed().as_secs_f64(),
                        backend.module_origin(),
                        backend.identity().calibrated_read_gbps
                    );
                    if attempt == 1 {
                        println!("identity {:?}", backend.identity());
                        let mut backend = backend;
                        ok &= run_bench(&mut backend, quick)?;
                    }
                }
            }
        }
        other => {
            eprintln!("unknown mode {other}; use compile|probe|selftest|bench|all [quick]");
            std::process::exit(2);
        }
    }
    std::io::stdout().flush()?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
