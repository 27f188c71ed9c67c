//! The one definition of the result schema: which columns a result row has, their Arrow types,
//! and how each is read off a [`ResultRecord`].
//!
//! Every sink (Parquet, flat CSV) and every reader goes through [`schema`] and [`record_batch`], so
//! a column added here appears everywhere at once, and a column cannot exist in one file but not
//! another. Each column is declared once, as a name plus the function that extracts its value;
//! the Arrow type follows from the extractor's kind. `docs/COLUMNS.md` documents every column
//! (a test checks that it does).
//!
//! Rows are one per (case, kernel) of each record; the device and run columns repeat on each row
//! so that a single file joins cleanly across GPUs and runs.

use crate::record::ResultRecord;
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Float64Builder, Int64Array, ListBuilder, StringBuilder,
    UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use decodebench_kernels::{KernelMeasurement, KvPool, Telemetry, TimingStats};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Bumped whenever a column is renamed, removed or changes type (adding columns keeps it).
pub const SCHEMA_VERSION: &str = "1";

/// Schema metadata key holding [`SCHEMA_VERSION`].
pub const SCHEMA_VERSION_KEY: &str = "decodebench.schema_version";

/// Name of the per-trial samples column (a list of f64 milliseconds).
pub const SAMPLES_COLUMN: &str = "samples_ms";

/// One output row: a record and one of its kernel measurements (`None` when the agent reported
/// no kernel at all, so the case still leaves a row behind).
#[derive(Clone, Copy)]
pub struct Row<'a> {
    pub record: &'a ResultRecord,
    pub kernel: Option<&'a KernelMeasurement>,
}

impl<'a> Row<'a> {
    fn stats(self) -> Option<TimingStats> {
        self.kernel.and_then(|k| k.stats)
    }

    fn telemetry(self) -> Option<&'a Telemetry> {
        self.kernel.map(|k| &k.telemetry)
    }
}

type Utf8Fn = for<'a> fn(Row<'a>) -> Option<Cow<'a, str>>;
type ListFn = for<'a> fn(Row<'a>) -> Option<&'a [f64]>;

/// How a column's value is read, which also fixes its Arrow type.
#[derive(Clone, Copy)]
enum Extract {
    Utf8(Utf8Fn),
    UInt32(fn(Row<'_>) -> Option<u32>),
    UInt64(fn(Row<'_>) -> Option<u64>),
    Int64(fn(Row<'_>) -> Option<i64>),
    Float64(fn(Row<'_>) -> Option<f64>),
    Boolean(fn(Row<'_>) -> Option<bool>),
    Float64List(ListFn),
}

/// One column: its name, whether it may be null, and its extractor.
#[derive(Clone, Copy)]
pub struct ColumnDef {
    pub name: &'static str,
    pub nullable: bool,
    extract: Extract,
}

impl ColumnDef {
    pub fn data_type(&self) -> DataType {
        match self.extract {
            Extract::Utf8(_) => DataType::Utf8,
            Extract::UInt32(_) => DataType::UInt32,
            Extract::UInt64(_) => DataType::UInt64,
            Extract::Int64(_) => DataType::Int64,
            Extract::Float64(_) => DataType::Float64,
            Extract::Boolean(_) => DataType::Boolean,
            Extract::Float64List(_) => DataType::List(samples_item_field()),
        }
    }

    fn field(&self) -> Field {
        Field::new(self.name, self.data_type(), self.nullable)
    }
}

const fn required(name: &'static str, extract: Extract) -> ColumnDef {
    ColumnDef {
        name,
        nullable: false,
        extract,
    }
}

const fn nullable(name: &'static str, extract: Extract) -> ColumnDef {
    ColumnDef {
        name,
        nullable: true,
        extract,
    }
}

fn text(s: &str) -> Option<Cow<'_, str>> {
    Some(Cow::Borrowed(s))
}

fn opt_text(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(Cow::Borrowed)
}

/// Every column, in output order.
const COLUMNS: &[ColumnDef] = &[
    // --- where the result came from
    required("run_id", Extract::Utf8(|r| text(&r.record.run_id))),
    required(
        "git_revision",
        Extract::Utf8(|r| text(&r.record.git_revision)),
    ),
    required("agent_id", Extract::Utf8(|r| text(&r.record.agent_id))),
    required("attempt", Extract::UInt32(|r| Some(r.record.attempt))),
    required(
        "received_unix_ms",
        Extract::Int64(|r| Some(r.record.received_unix_ms)),
    ),
    required("host", Extract::Utf8(|r| text(&r.record.device.host))),
    // --- the device
    required(
        "device_backend",
        Extract::Utf8(|r| text(&r.record.device.backend)),
    ),
    required(
        "device_name",
        Extract::Utf8(|r| text(&r.record.device.name)),
    ),
    required(
        "device_uuid",
        Extract::Utf8(|r| text(&r.record.device.uuid)),
    ),
    nullable(
        "device_serial",
        Extract::Utf8(|r| opt_text(&r.record.device.serial)),
    ),
    nullable(
        "device_pci_bus_id",
        Extract::Utf8(|r| opt_text(&r.record.device.pci_bus_id)),
    ),
    required("device_sku", Extract::Utf8(|r| text(&r.record.device.sku))),
    nullable(
        "device_compute_capability",
        Extract::Utf8(|r| opt_text(&r.record.device.compute_capability)),
    ),
    nullable(
        "device_sm_count",
        Extract::UInt32(|r| r.record.device.sm_count),
    ),
    nullable(
        "device_memory_bytes",
        Extract::UInt64(|r| r.record.device.memory_bytes),
    ),
    nullable(
        "device_driver_version",
        Extract::Utf8(|r| opt_text(&r.record.device.driver_version)),
    ),
    nullable(
        "device_cuda_driver_version",
        Extract::Utf8(|r| opt_text(&r.record.device.cuda_driver_version)),
    ),
    nullable(
        "device_nvrtc_version",
        Extract::Utf8(|r| opt_text(&r.record.device.nvrtc_version)),
    ),
    nullable(
        "device_vbios_version",
        Extract::Utf8(|r| opt_text(&r.record.device.vbios_version)),
    ),
    nullable(
        "device_power_limit_w",
        Extract::Float64(|r| r.record.device.power_limit_w),
    ),
    nullable(
        "device_ecc_enabled",
        Extract::Boolean(|r| r.record.device.ecc_enabled),
    ),
    nullable(
        "device_mig_enabled",
        Extract::Boolean(|r| r.record.device.mig_enabled),
    ),
    nullable(
        "device_calibrated_read_gbps",
        Extract::Float64(|r| r.record.device.calibrated_read_gbps),
    ),
    nullable(
        "device_kernel_source_hash",
        Extract::Utf8(|r| opt_text(&r.record.device.kernel_source_hash)),
    ),
    // --- the case
    required("case_id", Extract::Utf8(|r| text(&r.record.case.id))),
    required(
        "batch_size",
        Extract::UInt32(|r| Some(r.record.case.batch_size)),
    ),
    required(
        "max_seq_len",
        Extract::UInt32(|r| Some(r.record.case.max_seq_len)),
    ),
    required(
        "q_dtype",
        Extract::Utf8(|r| text(r.record.case.quant.q.as_str())),
    ),
    required(
        "kv_dtype",
        Extract::Utf8(|r| text(r.record.case.quant.kv.as_str())),
    ),
    required(
        "out_dtype",
        Extract::Utf8(|r| text(r.record.case.quant.out.as_str())),
    ),
    required(
        "num_qo_heads",
        Extract::UInt32(|r| Some(r.record.case.num_qo_heads)),
    ),
    required(
        "num_kv_heads",
        Extract::UInt32(|r| Some(r.record.case.num_kv_heads)),
    ),
    required(
        "head_size",
        Extract::UInt32(|r| Some(r.record.case.head_size)),
    ),
    required(
        "kv_layout",
        Extract::Utf8(|r| text(r.record.case.layout.as_str())),
    ),
    required(
        "block_size",
        Extract::UInt32(|r| Some(r.record.case.block_size)),
    ),
    required(
        "pool",
        Extract::Utf8(|r| {
            text(match r.record.case.pool {
                KvPool::Shared { .. } => "shared",
                KvPool::Unique => "unique",
            })
        }),
    ),
    nullable(
        "pool_tokens",
        Extract::UInt32(|r| match r.record.case.pool {
            KvPool::Shared { tokens } => Some(tokens),
            KvPool::Unique => None,
        }),
    ),
    required("seed", Extract::UInt64(|r| Some(r.record.case.seed))),
    required(
        "warmup",
        Extract::UInt32(|r| Some(r.record.case.method.warmup)),
    ),
    required(
        "trials",
        Extract::UInt32(|r| Some(r.record.case.method.trials)),
    ),
    required(
        "l2",
        Extract::Utf8(|r| text(r.record.case.method.l2.as_str())),
    ),
    required(
        "timing_mode",
        Extract::Utf8(|r| text(r.record.case.method.timing.as_str())),
    ),
    required(
        "graph_launches",
        Extract::UInt32(|r| Some(r.record.case.method.graph_launches)),
    ),
    nullable(
        "target_rse",
        Extract::Float64(|r| r.record.case.method.target_rse),
    ),
    required(
        "max_trials",
        Extract::UInt32(|r| Some(r.record.case.method.max_trials)),
    ),
    required(
        "max_time_s",
        Extract::Float64(|r| Some(r.record.case.method.max_time_s)),
    ),
    required(
        "throttle_retries",
        Extract::UInt32(|r| Some(r.record.case.method.throttle_retries)),
    ),
    // --- the kernel's outcome
    nullable(
        "kernel",
        Extract::Utf8(|r| r.kernel.and_then(|k| k.kernel).map(|k| text(k.as_str()))?),
    ),
    nullable(
        "status",
        Extract::Utf8(|r| r.kernel.and_then(|k| k.status).map(|s| text(s.as_str()))?),
    ),
    required(
        "message",
        Extract::Utf8(|r| match r.kernel {
            Some(k) => text(&k.message),
            None => text(NO_KERNEL_MESSAGE),
        }),
    ),
    // --- timing
    required(
        "n_trials",
        Extract::UInt32(|r| {
            Some(
                r.kernel
                    .map_or(0, |k| u32::try_from(k.samples_ms.len()).unwrap_or(u32::MAX)),
            )
        }),
    ),
    nullable(
        "mean_ms",
        Extract::Float64(|r| r.stats().map(|s| s.mean_ms)),
    ),
    nullable("std_ms", Extract::Float64(|r| r.stats().map(|s| s.std_ms))),
    nullable(
        "median_ms",
        Extract::Float64(|r| r.stats().map(|s| s.median_ms)),
    ),
    nullable("min_ms", Extract::Float64(|r| r.stats().map(|s| s.min_ms))),
    nullable("max_ms", Extract::Float64(|r| r.stats().map(|s| s.max_ms))),
    nullable("p5_ms", Extract::Float64(|r| r.stats().map(|s| s.p5_ms))),
    nullable("p95_ms", Extract::Float64(|r| r.stats().map(|s| s.p95_ms))),
    nullable("rse", Extract::Float64(|r| r.stats().map(|s| s.rse))),
    required(
        SAMPLES_COLUMN,
        Extract::Float64List(|r| Some(r.kernel.map_or(&[][..], |k| &k.samples_ms[..]))),
    ),
    // --- accuracy
    nullable(
        "max_abs_err",
        Extract::Float64(|r| r.kernel.and_then(|k| k.accuracy).map(|a| a.max_abs_err)),
    ),
    nullable(
        "rel_l2_err",
        Extract::Float64(|r| r.kernel.and_then(|k| k.accuracy).map(|a| a.rel_l2_err)),
    ),
    nullable(
        "tolerance",
        Extract::Float64(|r| r.kernel.and_then(|k| k.accuracy).map(|a| a.tolerance)),
    ),
    // --- bytes and bandwidth
    nullable(
        "bytes_per_call",
        // 0 is what a kernel that never got as far as counting reports: unknown, not zero.
        Extract::UInt64(|r| r.kernel.map(|k| k.bytes_per_call).filter(|&b| b > 0)),
    ),
    nullable(
        "bandwidth_gbps",
        Extract::Float64(|r| r.kernel.and_then(|k| k.bandwidth_gbps)),
    ),
    nullable(
        "bandwidth_fraction",
        Extract::Float64(|r| r.kernel.and_then(|k| k.bandwidth_fraction)),
    ),
    // --- telemetry
    nullable(
        "power_avg_w",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.power_avg_w)),
    ),
    nullable(
        "power_max_w",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.power_max_w)),
    ),
    nullable(
        "energy_per_call_j",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.energy_per_call_j)),
    ),
    nullable(
        "temp_avg_c",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.temp_avg_c)),
    ),
    nullable(
        "temp_max_c",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.temp_max_c)),
    ),
    nullable(
        "mem_temp_max_c",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.mem_temp_max_c)),
    ),
    nullable(
        "sm_clock_min_mhz",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.sm_clock_min_mhz)),
    ),
    nullable(
        "sm_clock_avg_mhz",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.sm_clock_avg_mhz)),
    ),
    nullable(
        "mem_clock_min_mhz",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.mem_clock_min_mhz)),
    ),
    nullable(
        "mem_clock_avg_mhz",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.mem_clock_avg_mhz)),
    ),
    nullable(
        "gpu_util_avg_pct",
        Extract::Float64(|r| r.telemetry().and_then(|t| t.gpu_util_avg_pct)),
    ),
    nullable(
        "telemetry_samples",
        Extract::UInt32(|r| r.telemetry().map(|t| t.samples)),
    ),
    nullable(
        "throttle_reasons",
        // No samples and no reasons means no telemetry: unknown, not "none seen".
        Extract::Utf8(|r| {
            let t = r.telemetry()?;
            if t.samples == 0 && t.throttle_reasons.is_empty() {
                return None;
            }
            Some(Cow::Owned(t.throttle_reasons.join(",")))
        }),
    ),
    nullable(
        "throttled",
        Extract::Boolean(|r| r.kernel.map(|k| k.throttled)),
    ),
    nullable(
        "throttle_retries_used",
        Extract::UInt32(|r| r.kernel.map(|k| k.throttle_retries_used)),
    ),
    nullable(
        "rse_target_met",
        Extract::Boolean(|r| r.kernel.and_then(|k| k.rse_target_met)),
    ),
    required(
        "wall_s",
        Extract::Float64(|r| Some(r.record.measurement.wall_s)),
    ),
];

/// The message on the row of a record whose agent reported no kernel measurement.
pub const NO_KERNEL_MESSAGE: &str = "the agent reported no kernel measurement for this case";

/// The column definitions, in output order.
pub fn columns() -> &'static [ColumnDef] {
    COLUMNS
}

/// The element field of the `samples_ms` list column.
fn samples_item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float64, false))
}

/// The result schema (cached; every call returns the same `Arc`).
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let fields: Vec<Field> = COLUMNS.iter().map(ColumnDef::field).collect();
            let metadata =
                HashMap::from([(SCHEMA_VERSION_KEY.to_string(), SCHEMA_VERSION.to_string())]);
            Arc::new(Schema::new_with_metadata(fields, metadata))
        })
        .clone()
}

/// The rows of `records`, one per (record, kernel); a record without kernels gets one row.
pub fn rows(records: &[ResultRecord]) -> Vec<Row<'_>> {
    let mut rows = Vec::with_capacity(records.len() * 2);
    for record in records {
        if record.measurement.kernels.is_empty() {
            rows.push(Row {
                record,
                kernel: None,
            });
        }
        for kernel in &record.measurement.kernels {
            rows.push(Row {
                record,
                kernel: Some(kernel),
            });
        }
    }
    rows
}

/// Flattens records into one Arrow batch of [`schema`]. Fails only if a required column is null,
/// which would be a bug in the extractors.
pub fn record_batch(records: &[ResultRecord]) -> Result<RecordBatch, ArrowError> {
    let rows = rows(records);
    let n = rows.len();
    let arrays: Vec<ArrayRef> = COLUMNS
        .iter()
        .map(|column| -> ArrayRef {
            match column.extract {
                Extract::Utf8(f) => {
                    let mut b = StringBuilder::with_capacity(n, n * 16);
                    for &row in &rows {
                        b.append_option(f(row));
                    }
                    Arc::new(b.finish())
                }
                // Nullable primitive columns: one array from the rows' options.
                Extract::UInt32(f) => {
                    Arc::new(rows.iter().map(|&row| f(row)).collect::<UInt32Array>())
                }
                Extract::UInt64(f) => {
                    Arc::new(rows.iter().map(|&row| f(row)).collect::<UInt64Array>())
                }
                Extract::Int64(f) => {
                    Arc::new(rows.iter().map(|&row| f(row)).collect::<Int64Array>())
                }
                Extract::Float64(f) => {
                    Arc::new(rows.iter().map(|&row| f(row)).collect::<Float64Array>())
                }
                Extract::Boolean(f) => {
                    Arc::new(rows.iter().map(|&row| f(row)).collect::<BooleanArray>())
                }
                Extract::Float64List(f) => {
                    let mut b = ListBuilder::with_capacity(Float64Builder::new(), n)
                        .with_field(samples_item_field());
                    for &row in &rows {
                        match f(row) {
                            Some(values) => {
                                b.values().append_slice(values);
                                b.append(true);
                            }
                            None => b.append(false),
                        }
                    }
                    Arc::new(b.finish())
                }
            }
        })
        .collect();
    RecordBatch::try_new(schema(), arrays)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, UInt32Type};
    use decodebench_kernels::{
        Accuracy, BenchCase, CaseMeasurement, DeviceIdentity, KernelKind, QuantMode, Status,
    };

    /// A record with both kernels: the optimized one ok with `opt_ms` samples, the baseline ok
    /// with `base_ms`; an empty sample list makes that kernel `failed`.
    pub(crate) fn sample_record(batch: u32, opt_ms: &[f64], base_ms: &[f64]) -> ResultRecord {
        let case = BenchCase::reference_shape(batch, 1024, QuantMode::FP8_QKV).with_id();
        let kernel = |kind: KernelKind, samples: &[f64]| {
            if samples.is_empty() {
                return KernelMeasurement::not_timed(kind, Status::Failed, "launch failed, \"x\"");
            }
            let mut k = KernelMeasurement {
                kernel: Some(kind),
                status: Some(Status::Ok),
                samples_ms: samples.to_vec(),
                accuracy: Some(Accuracy {
                    max_abs_err: 0.01,
                    rel_l2_err: 0.002,
                    tolerance: 0.05,
                }),
                bytes_per_call: 1_000_000,
                ..Default::default()
            };
            k.telemetry.samples = 3;
            k.telemetry.power_avg_w = Some(350.0);
            k.telemetry.throttle_reasons = vec!["sw_power_cap".into(), "hw_slowdown".into()];
            k.finish_stats(Some(3100.0));
            k
        };
        ResultRecord {
            run_id: "run-1".into(),
            agent_id: "agent-a".into(),
            attempt: 1,
            received_unix_ms: 1_700_000_000_000,
            git_revision: "abc123".into(),
            device: DeviceIdentity {
                backend: "cuda".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                uuid: "GPU-1234".into(),
                sku: "NVIDIA H100 80GB HBM3".into(),
                sm_count: Some(132),
                host: "node-1".into(),
                ..Default::default()
            },
            measurement: CaseMeasurement {
                case_id: case.id.clone(),
                kernels: vec![
                    kernel(KernelKind::Baseline, base_ms),
                    kernel(KernelKind::Optimized, opt_ms),
                ],
                wall_s: 1.5,
            },
            case,
        }
    }

    #[test]
    fn schema_names_are_unique_and_versioned() {
        let s = schema();
        let mut names: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate column names");
        assert_eq!(
            s.metadata().get(SCHEMA_VERSION_KEY).map(String::as_str),
            Some(SCHEMA_VERSION)
        );
        assert!(Arc::ptr_eq(&s, &schema()));
    }

    #[test]
    fn one_row_per_kernel_with_values_in_place() {
        let records = vec![
            sample_record(4, &[1.0, 2.0, 3.0], &[2.0, 4.0]),
            sample_record(8, &[], &[5.0]),
        ];
        let batch = record_batch(&records).unwrap();
        assert_eq!(batch.num_rows(), 4);
        assert_eq!(batch.num_columns(), COLUMNS.len());
        let kernel = batch.column_by_name("kernel").unwrap().as_string::<i32>();
        assert_eq!(kernel.value(0), "baseline");
        assert_eq!(kernel.value(1), "optimized");
        let batch_size = batch
            .column_by_name("batch_size")
            .unwrap()
            .as_primitive::<UInt32Type>();
        assert_eq!(batch_size.values().to_vec(), vec![4, 4, 8, 8]);
        let mean = batch
            .column_by_name("mean_ms")
            .unwrap()
            .as_primitive::<Float64Type>();
        assert_eq!(mean.value(1), 2.0);
        assert!(mean.is_null(3), "a failed kernel has no mean");
        let samples = batch
            .column_by_name(SAMPLES_COLUMN)
            .unwrap()
            .as_list::<i32>();
        let first = samples.value(1);
        assert_eq!(
            first.as_primitive::<Float64Type>().values().to_vec(),
            vec![1.0, 2.0, 3.0]
        );
        assert_eq!(samples.value(3).len(), 0);
        let status = batch.column_by_name("status").unwrap().as_string::<i32>();
        assert_eq!(status.value(3), "failed");
        let reasons = batch
            .column_by_name("throttle_reasons")
            .unwrap()
            .as_string::<i32>();
        assert_eq!(reasons.value(0), "sw_power_cap,hw_slowdown");
        assert!(reasons.is_null(3), "no telemetry samples: unknown");
        let serial = batch.column_by_name("device_serial").unwrap();
        assert!(serial.is_null(0));
        let bw = batch
            .column_by_name("bandwidth_fraction")
            .unwrap()
            .as_primitive::<Float64Type>();
        assert!((bw.value(1) - 1e6 / 2e-3 / 1e9 / 3100.0).abs() < 1e-12);
    }

    #[test]
    fn a_record_without_kernels_still_leaves_a_row() {
        let mut r = sample_record(4, &[1.0], &[1.0]);
        r.measurement.kernels.clear();
        let batch = record_batch(&[r]).unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert!(batch.column_by_name("kernel").unwrap().is_null(0));
        let msg = batch.column_by_name("message").unwrap().as_string::<i32>();
        assert_eq!(msg.value(0), NO_KERNEL_MESSAGE);
    }

    #[test]
    fn empty_input_gives_an_empty_batch_of_the_schema() {
        let batch = record_batch(&[]).unwrap();
        assert_eq!(batch.num_rows(), 0);
        assert_eq!(batch.schema(), schema());
    }

    #[test]
    fn columns_md_documents_every_column() {
        let doc = include_str!("../../docs/COLUMNS.md");
        let documented: Vec<&str> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        for c in COLUMNS {
            assert!(
                documented.contains(&c.name),
                "docs/COLUMNS.md does not document column `{}`",
                c.name
            );
        }
    }
}
