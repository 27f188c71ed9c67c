//! Reading `results.parquet` into the rows that analysis works on.
//!
//! The file is read through [`crate::sink::parquet::read_parquet`], which checks the schema
//! version. Only the columns analysis needs are extracted, each looked up by its name in
//! [`crate::schema::columns`] and checked against the type declared there, so a schema change
//! surfaces as a clear error here (and in this module's tests), never as a misread column.

use super::AnalysisError;
use crate::schema::{self, SAMPLES_COLUMN};
use crate::sink::{parquet::read_parquet, PARQUET_FILE_NAME};
use arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, GenericListArray, Int64Array, StringArray,
    UInt32Array,
};
use arrow::datatypes::{Float64Type, Int64Type, UInt32Type};
use arrow::record_batch::RecordBatch;
use decodebench_kernels::{Dtype, KernelKind, QuantMode, Status};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The names of the columns analysis reads. Each must be a column of [`schema::columns`] (a test
/// checks it); types come from there too.
mod column {
    pub const RUN_ID: &str = "run_id";
    pub const GIT_REVISION: &str = "git_revision";
    pub const ATTEMPT: &str = "attempt";
    pub const RECEIVED_UNIX_MS: &str = "received_unix_ms";
    pub const HOST: &str = "host";
    pub const DEVICE_NAME: &str = "device_name";
    pub const DEVICE_UUID: &str = "device_uuid";
    pub const DEVICE_SKU: &str = "device_sku";
    pub const CASE_ID: &str = "case_id";
    pub const BATCH_SIZE: &str = "batch_size";
    pub const MAX_SEQ_LEN: &str = "max_seq_len";
    pub const Q_DTYPE: &str = "q_dtype";
    pub const KV_DTYPE: &str = "kv_dtype";
    pub const OUT_DTYPE: &str = "out_dtype";
    pub const KV_LAYOUT: &str = "kv_layout";
    pub const BLOCK_SIZE: &str = "block_size";
    pub const POOL: &str = "pool";
    pub const KERNEL: &str = "kernel";
    pub const STATUS: &str = "status";
    pub const MESSAGE: &str = "message";
    pub const MEDIAN_MS: &str = "median_ms";
    pub const BANDWIDTH_FRACTION: &str = "bandwidth_fraction";
    pub const POWER_AVG_W: &str = "power_avg_w";
    pub const ENERGY_PER_CALL_J: &str = "energy_per_call_j";
    pub const THROTTLED: &str = "throttled";

    /// Every name above plus the samples column, for the schema test.
    #[cfg(test)]
    pub const ALL: &[&str] = &[
        RUN_ID,
        GIT_REVISION,
        ATTEMPT,
        RECEIVED_UNIX_MS,
        HOST,
        DEVICE_NAME,
        DEVICE_UUID,
        DEVICE_SKU,
        CASE_ID,
        BATCH_SIZE,
        MAX_SEQ_LEN,
        Q_DTYPE,
        KV_DTYPE,
        OUT_DTYPE,
        KV_LAYOUT,
        BLOCK_SIZE,
        POOL,
        KERNEL,
        STATUS,
        MESSAGE,
        MEDIAN_MS,
        BANDWIDTH_FRACTION,
        POWER_AVG_W,
        ENERGY_PER_CALL_J,
        THROTTLED,
        super::SAMPLES_COLUMN,
    ];
}

/// The workload parameters of a case that people read in a table (the rest is in its id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct CaseParams {
    #[serde(serialize_with = "serialize_quant")]
    pub quant: QuantMode,
    pub batch_size: u32,
    pub max_seq_len: u32,
    pub kv_layout: String,
    pub block_size: u32,
    pub pool: String,
}

fn serialize_quant<S: serde::Serializer>(q: &QuantMode, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(q)
}

impl CaseParams {
    /// "b4 s1024 fp8/fp8/bf16 HND blk16 shared", as `BenchCase::label` without the heads.
    pub fn label(&self) -> String {
        format!(
            "b{} s{} {} {} blk{} {}",
            self.batch_size,
            self.max_seq_len,
            self.quant,
            self.kv_layout,
            self.block_size,
            self.pool
        )
    }
}

/// One row of `results.parquet`: one kernel of one case on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub run_id: String,
    pub git_revision: String,
    pub attempt: u32,
    pub received_unix_ms: i64,
    pub host: String,
    pub device_name: String,
    pub device_uuid: String,
    pub device_sku: String,
    pub case_id: String,
    pub case: CaseParams,
    /// `None` when the agent reported no kernel at all for the case.
    pub kernel: Option<KernelKind>,
    /// `None` with `kernel`; analysis treats it as [`Status::Failed`].
    pub status: Option<Status>,
    pub message: String,
    pub median_ms: Option<f64>,
    pub samples_ms: Vec<f64>,
    pub bandwidth_fraction: Option<f64>,
    pub power_avg_w: Option<f64>,
    pub energy_per_call_j: Option<f64>,
    /// `None` when there was no telemetry to tell.
    pub throttled: Option<bool>,
}

impl ResultRow {
    /// The status analysis uses: a row without one is a case the agent could not measure.
    pub fn effective_status(&self) -> Status {
        self.status.unwrap_or(Status::Failed)
    }

    /// Median time per call: from the raw samples when there are any, else the summary column.
    pub fn median_time_ms(&self) -> Option<f64> {
        super::stats::median(&self.samples_ms).or(self.median_ms)
    }

    /// Whether the row was timed as valid and has a usable time.
    pub fn is_timed_ok(&self) -> bool {
        self.effective_status() == Status::Ok && self.median_time_ms().is_some_and(|m| m > 0.0)
    }
}

/// The rows of one results file.
#[derive(Debug, Clone)]
pub struct LoadedResults {
    /// The file that was read.
    pub path: PathBuf,
    pub rows: Vec<ResultRow>,
    /// Rows dropped because a later row had the same (case, kernel, GPU): a result received twice
    /// keeps its latest copy.
    pub duplicates_dropped: usize,
}

/// Resolves a run directory to its `results.parquet`; a file path is taken as is.
pub fn results_file(path: &Path) -> Result<PathBuf, AnalysisError> {
    if path.is_dir() {
        let file = path.join(PARQUET_FILE_NAME);
        if !file.is_file() {
            return Err(AnalysisError::NoResults {
                path: path.to_path_buf(),
            });
        }
        return Ok(file);
    }
    Ok(path.to_path_buf())
}

/// Reads a run directory (or a `results.parquet` file) into rows, one per (case, kernel, GPU).
pub fn load_results(path: &Path) -> Result<LoadedResults, AnalysisError> {
    let file = results_file(path)?;
    let batches = read_parquet(&file).map_err(|source| AnalysisError::Read {
        path: file.clone(),
        source,
    })?;
    let mut rows = Vec::new();
    for batch in &batches {
        read_batch(&file, batch, rows.len(), &mut rows)?;
    }
    let before = rows.len();
    let rows = keep_latest(rows);
    Ok(LoadedResults {
        duplicates_dropped: before - rows.len(),
        path: file,
        rows,
    })
}

/// Keeps one row per (case, kernel, GPU): the latest received (then the highest attempt), in
/// the file's order otherwise.
fn keep_latest(rows: Vec<ResultRow>) -> Vec<ResultRow> {
    let mut best: HashMap<(String, Option<KernelKind>, String), usize> = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        let key = (row.case_id.clone(), row.kernel, row.device_uuid.clone());
        let entry = best.entry(key).or_insert(i);
        let kept = &rows[*entry];
        if (row.received_unix_ms, row.attempt) >= (kept.received_unix_ms, kept.attempt) {
            *entry = i;
        }
    }
    let mut keep: Vec<usize> = best.into_values().collect();
    keep.sort_unstable();
    let mut rows: Vec<Option<ResultRow>> = rows.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| rows[i].take()).collect()
}

/// Typed, schema-checked access to one batch's columns.
struct BatchColumns<'a> {
    path: &'a Path,
    batch: &'a RecordBatch,
}

impl<'a> BatchColumns<'a> {
    fn error(&self, column: &'static str, reason: impl Into<String>) -> AnalysisError {
        AnalysisError::Column {
            path: self.path.to_path_buf(),
            column,
            reason: reason.into(),
        }
    }

    /// The column, after checking that the schema declares it with the type the file has.
    fn get(&self, name: &'static str) -> Result<&'a dyn Array, AnalysisError> {
        let def = schema::columns()
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| self.error(name, "is not in the result schema"))?;
        let array = self
            .batch
            .column_by_name(name)
            .ok_or_else(|| self.error(name, "is missing"))?;
        if array.data_type() != &def.data_type() {
            return Err(self.error(
                name,
                format!(
                    "has type {}, the schema declares {}",
                    array.data_type(),
                    def.data_type()
                ),
            ));
        }
        Ok(array.as_ref())
    }

    fn utf8(&self, name: &'static str) -> Result<&'a StringArray, AnalysisError> {
        self.get(name)?
            .as_string_opt::<i32>()
            .ok_or_else(|| self.error(name, "is not utf8"))
    }

    fn u32(&self, name: &'static str) -> Result<&'a UInt32Array, AnalysisError> {
        self.get(name)?
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| self.error(name, "is not uint32"))
    }

    fn i64(&self, name: &'static str) -> Result<&'a Int64Array, AnalysisError> {
        self.get(name)?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| self.error(name, "is not int64"))
    }

    fn f64(&self, name: &'static str) -> Result<&'a Float64Array, AnalysisError> {
        self.get(name)?
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| self.error(name, "is not float64"))
    }

    fn bool(&self, name: &'static str) -> Result<&'a BooleanArray, AnalysisError> {
        self.get(name)?
            .as_boolean_opt()
            .ok_or_else(|| self.error(name, "is not boolean"))
    }

    fn list(&self, name: &'static str) -> Result<&'a GenericListArray<i32>, AnalysisError> {
        self.get(name)?
            .as_list_opt::<i32>()
            .ok_or_else(|| self.error(name, "is not a list"))
    }
}

fn text(a: &StringArray, i: usize) -> String {
    if a.is_null(i) {
        String::new()
    } else {
        a.value(i).to_string()
    }
}

fn opt_text(a: &StringArray, i: usize) -> Option<&str> {
    (!a.is_null(i)).then(|| a.value(i))
}

fn opt_f64(a: &Float64Array, i: usize) -> Option<f64> {
    (!a.is_null(i)).then(|| a.value(i))
}

fn u32_or_zero(a: &UInt32Array, i: usize) -> u32 {
    if a.is_null(i) {
        0
    } else {
        a.value(i)
    }
}

/// Appends the rows of `batch`; `first_row` numbers rows across batches for error messages.
fn read_batch(
    path: &Path,
    batch: &RecordBatch,
    first_row: usize,
    out: &mut Vec<ResultRow>,
) -> Result<(), AnalysisError> {
    let cols = BatchColumns { path, batch };
    let run_id = cols.utf8(column::RUN_ID)?;
    let git_revision = cols.utf8(column::GIT_REVISION)?;
    let attempt = cols.u32(column::ATTEMPT)?;
    let received = cols.i64(column::RECEIVED_UNIX_MS)?;
    let host = cols.utf8(column::HOST)?;
    let device_name = cols.utf8(column::DEVICE_NAME)?;
    let device_uuid = cols.utf8(column::DEVICE_UUID)?;
    let device_sku = cols.utf8(column::DEVICE_SKU)?;
    let case_id = cols.utf8(column::CASE_ID)?;
    let batch_size = cols.u32(column::BATCH_SIZE)?;
    let max_seq_len = cols.u32(column::MAX_SEQ_LEN)?;
    let q_dtype = cols.utf8(column::Q_DTYPE)?;
    let kv_dtype = cols.utf8(column::KV_DTYPE)?;
    let out_dtype = cols.utf8(column::OUT_DTYPE)?;
    let kv_layout = cols.utf8(column::KV_LAYOUT)?;
    let block_size = cols.u32(column::BLOCK_SIZE)?;
    let pool = cols.utf8(column::POOL)?;
    let kernel = cols.utf8(column::KERNEL)?;
    let status = cols.utf8(column::STATUS)?;
    let message = cols.utf8(column::MESSAGE)?;
    let median_ms = cols.f64(column::MEDIAN_MS)?;
    let samples = cols.list(SAMPLES_COLUMN)?;
    let bandwidth_fraction = cols.f64(column::BANDWIDTH_FRACTION)?;
    let power_avg_w = cols.f64(column::POWER_AVG_W)?;
    let energy = cols.f64(column::ENERGY_PER_CALL_J)?;
    let throttled = cols.bool(column::THROTTLED)?;

    let unknown = |i: usize, column: &'static str, value: &str| AnalysisError::UnknownValue {
        path: path.to_path_buf(),
        row: first_row + i,
        column,
        value: value.to_string(),
    };
    let dtype = |i: usize, column: &'static str, a: &StringArray| -> Result<Dtype, AnalysisError> {
        let s = text(a, i);
        Dtype::parse(&s).ok_or_else(|| unknown(i, column, &s))
    };

    out.reserve(batch.num_rows());
    for i in 0..batch.num_rows() {
        let kernel = match opt_text(kernel, i) {
            None => None,
            Some(s) => Some(KernelKind::parse(s).ok_or_else(|| unknown(i, column::KERNEL, s))?),
        };
        let status = match opt_text(status, i) {
            None => None,
            Some(s) => Some(Status::parse(s).ok_or_else(|| unknown(i, column::STATUS, s))?),
        };
        let samples_ms = if samples.is_null(i) {
            Vec::new()
        } else {
            let values = samples.value(i);
            let values = values
                .as_primitive_opt::<Float64Type>()
                .ok_or_else(|| cols.error(SAMPLES_COLUMN, "does not hold float64 values"))?;
            values.iter().flatten().collect()
        };
        out.push(ResultRow {
            run_id: text(run_id, i),
            git_revision: text(git_revision, i),
            attempt: u32_or_zero(attempt, i),
            received_unix_ms: if received.is_null(i) {
                0
            } else {
                received.value(i)
            },
            host: text(host, i),
            device_name: text(device_name, i),
            device_uuid: text(device_uuid, i),
            device_sku: text(device_sku, i),
            case_id: text(case_id, i),
            case: CaseParams {
                quant: QuantMode::new(
                    dtype(i, column::Q_DTYPE, q_dtype)?,
                    dtype(i, column::KV_DTYPE, kv_dtype)?,
                    dtype(i, column::OUT_DTYPE, out_dtype)?,
                ),
                batch_size: u32_or_zero(batch_size, i),
                max_seq_len: u32_or_zero(max_seq_len, i),
                kv_layout: text(kv_layout, i),
                block_size: u32_or_zero(block_size, i),
                pool: text(pool, i),
            },
            kernel,
            status,
            message: text(message, i),
            median_ms: opt_f64(median_ms, i),
            samples_ms,
            bandwidth_fraction: opt_f64(bandwidth_fraction, i),
            power_avg_w: opt_f64(power_avg_w, i),
            energy_per_call_j: opt_f64(energy, i),
            throttled: (!throttled.is_null(i)).then(|| throttled.value(i)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::fixtures::{record, write_run, Gpu};
    use decodebench_kernels::KernelKind;

    #[test]
    fn analysis_columns_exist_in_the_schema() {
        for name in column::ALL {
            assert!(
                schema::columns().iter().any(|c| c.name == *name),
                "analysis reads `{name}`, which the result schema does not define"
            );
        }
    }

    #[test]
    fn analysis_load_round_trips_rows_from_a_run_directory() {
        let gpu = Gpu::h100(0);
        let mut failed = record(&gpu, 8, 2048, &[1.0, 1.1, 1.2], &[2.0, 2.1]);
        failed.measurement.kernels[1] = decodebench_kernels::KernelMeasurement::not_timed(
            KernelKind::Optimized,
            Status::WrongResult,
            "max abs err 0.5 > 0.05",
        );
        let records = vec![record(&gpu, 4, 1024, &[1.0, 1.5, 2.0], &[3.0, 4.0]), failed];
        let dir = write_run(&records);
        let loaded = load_results(dir.path()).unwrap();
        assert_eq!(loaded.rows.len(), 4);
        assert_eq!(loaded.duplicates_dropped, 0);
        let r = &loaded.rows[1];
        assert_eq!(r.kernel, Some(KernelKind::Optimized));
        assert_eq!(r.samples_ms, vec![1.0, 1.5, 2.0]);
        assert_eq!(r.median_time_ms(), Some(1.5));
        assert_eq!(r.device_uuid, gpu.uuid);
        assert_eq!(r.case.label(), "b4 s1024 fp8/fp8/bf16 HND blk16 shared");
        assert_eq!(r.case_id, records[0].case.id);
        let bad = &loaded.rows[3];
        assert_eq!(bad.status, Some(Status::WrongResult));
        assert!(!bad.is_timed_ok());
        assert!(bad.samples_ms.is_empty());
    }

    #[test]
    fn analysis_load_keeps_the_latest_copy_of_a_result() {
        let gpu = Gpu::h100(0);
        let old = record(&gpu, 4, 1024, &[9.0], &[9.0]);
        let mut new = record(&gpu, 4, 1024, &[1.0], &[2.0]);
        new.received_unix_ms += 1000;
        new.attempt = 2;
        let dir = write_run(&[new, old]);
        let loaded = load_results(dir.path()).unwrap();
        assert_eq!(loaded.rows.len(), 2);
        assert_eq!(loaded.duplicates_dropped, 2);
        assert!(loaded.rows.iter().all(|r| r.attempt == 2));
    }

    #[test]
    fn analysis_load_names_a_directory_without_results() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_results(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no results.parquet"), "{e}");
        let e = load_results(&dir.path().join("nope.parquet"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.parquet"), "{e}");
    }
}
