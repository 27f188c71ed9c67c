//! Reading `results.parquet` into the rows that analysis works on.
//!
//! The file is read through [`crate::sink::parquet::read_parquet`], which checks the schema
//! version. Only the columns analysis needs are extracted, each looked up by its name in
//! [`crate::schema::columns`] and checked against the type declared there, so a schema change
//! surfaces as a clear error here (and in this module's tests), never as a misread column.
//!
//! Everything analysis decides from is checked on the way in, because a nightly gate must fail
//! loudly on a bad file rather than pass on it: a file that is not Parquet (a `results.csv`
//! passed by mistake), one without this build's schema version (rewritten by pandas, or from
//! another decodebench), one without rows, a null where decodebench always writes a value (in a
//! required column, or inside a row's `samples_ms`: the file was made or edited by another tool,
//! and reading the null as "nothing" would drop a sample or a row's identity without a word), and
//! an `ok` row whose timing is not a positive finite number (a zero time would read as a 100 %
//! speed-up) are all refused with what to do.

use super::AnalysisError;
use crate::schema::{self, SAMPLES_COLUMN, SCHEMA_VERSION, SCHEMA_VERSION_KEY};
use crate::sink::{parquet::read_parquet, SinkError, PARQUET_FILE_NAME};
use arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, GenericListArray, Int64Array, StringArray,
    UInt32Array,
};
use arrow::datatypes::{DataType, Float64Type, Int64Type, UInt32Type};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use decodebench_kernels::{Dtype, KernelKind, QuantMode, Status};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The first bytes of every Parquet file; a file without them was never Parquet (as opposed to a
/// damaged one).
const PARQUET_MAGIC: &[u8] = b"PAR1";
/// Bytes of a non-Parquet file looked at to tell a CSV file from other content.
const SNIFF_BYTES: usize = 4096;

/// The columns the case id hashes besides those in [`CaseParams`]: the rest of the shape, the seed
/// and the measurement method. They are kept per case (as text) so that `compare` can say which
/// of them differ when two runs share no case.
pub const CASE_SETTING_COLUMNS: &[&str] = &[
    "num_qo_heads",
    "num_kv_heads",
    "head_size",
    "pool_tokens",
    "seed",
    "warmup",
    "trials",
    "l2",
    "timing_mode",
    "graph_launches",
    "target_rse",
    "max_trials",
    "max_time_s",
    "throttle_retries",
];

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
    /// Rows dropped because a later report of the same case on the same GPU superseded them: a
    /// result received twice keeps its latest copy.
    pub duplicates_dropped: usize,
    /// Per case id, the values of [`CASE_SETTING_COLUMNS`] in that order, as text (empty for
    /// null).
    pub case_settings: BTreeMap<String, Vec<String>>,
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
    let batches = read_parquet(&file).map_err(|source| explain_read_error(&file, source))?;
    let mut rows = Vec::new();
    let mut case_settings = BTreeMap::new();
    for batch in &batches {
        read_batch(&file, batch, rows.len(), &mut rows, &mut case_settings)?;
    }
    if rows.is_empty() {
        return Err(AnalysisError::Empty { path: file });
    }
    let before = rows.len();
    let rows = keep_latest(rows);
    Ok(LoadedResults {
        duplicates_dropped: before - rows.len(),
        path: file,
        rows,
        case_settings,
    })
}

/// Turns the sink's read error into one that says what the file is and what to pass instead:
/// a CSV file given by mistake, a file without this build's schema version, a damaged copy.
fn explain_read_error(file: &Path, source: SinkError) -> AnalysisError {
    match source {
        SinkError::NotParquet { .. } => {
            let head = file_head(file);
            if head.is_empty() && std::fs::metadata(file).is_ok_and(|m| m.len() == 0) {
                AnalysisError::ZeroBytes {
                    path: file.to_path_buf(),
                }
            } else if !head.starts_with(PARQUET_MAGIC) && looks_like_csv(file, &head) {
                let parquet = file
                    .parent()
                    .map(|d| d.join(PARQUET_FILE_NAME))
                    .filter(|p| p.is_file());
                AnalysisError::CsvGiven {
                    path: file.to_path_buf(),
                    parquet,
                }
            } else if head.starts_with(PARQUET_MAGIC) {
                AnalysisError::Damaged {
                    path: file.to_path_buf(),
                    source,
                }
            } else {
                AnalysisError::Read {
                    path: file.to_path_buf(),
                    source,
                }
            }
        }
        SinkError::SchemaMismatch { .. } => AnalysisError::Schema {
            path: file.to_path_buf(),
            reason: schema_version_reason(schema_version_of(file)),
        },
        source => AnalysisError::Read {
            path: file.to_path_buf(),
            source,
        },
    }
}

/// The first [`SNIFF_BYTES`] of `file` (fewer when it is shorter or unreadable).
fn file_head(file: &Path) -> Vec<u8> {
    let mut head = Vec::new();
    if let Ok(f) = std::fs::File::open(file) {
        let _ = f.take(SNIFF_BYTES as u64).read_to_end(&mut head);
    }
    head
}

/// A `.csv` name, or text whose first line has a comma (a CSV header).
fn looks_like_csv(file: &Path, head: &[u8]) -> bool {
    let named_csv = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let first_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    named_csv || (std::str::from_utf8(first_line).is_ok() && first_line.contains(&b','))
}

/// The schema version a Parquet file carries: `Some(None)` when it has none, `None` when the
/// file cannot be opened as Parquet at all.
fn schema_version_of(file: &Path) -> Option<Option<String>> {
    let f = std::fs::File::open(file).ok()?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).ok()?;
    Some(builder.schema().metadata().get(SCHEMA_VERSION_KEY).cloned())
}

/// Why a file's schema version is not this build's, and what to do about it.
fn schema_version_reason(found: Option<Option<String>>) -> String {
    match found {
        Some(Some(v)) => {
            let newer = match (v.parse::<u32>(), SCHEMA_VERSION.parse::<u32>()) {
                (Ok(theirs), Ok(ours)) => Some(theirs > ours),
                _ => None,
            };
            let (who, what_to_do) = match newer {
                Some(true) => (
                    "a newer decodebench",
                    "upgrade decodebench to analyse it".to_string(),
                ),
                Some(false) => (
                    "an older decodebench",
                    "analyse it with the decodebench version that wrote it (its git_revision \
                     column names the build), or rerun that benchmark with this version"
                        .to_string(),
                ),
                None => (
                    "another decodebench",
                    "analyse it with the decodebench version that wrote it".to_string(),
                ),
            };
            format!(
                "result schema version {v:?}, written by {who}; this build reads version \
                 {SCHEMA_VERSION:?}. Both files of a comparison must be read by one build: \
                 {what_to_do}"
            )
        }
        Some(None) => format!(
            "no decodebench schema version (Parquet metadata key {SCHEMA_VERSION_KEY}): the file \
             was not written by decodebench, or another tool rewrote it (pandas and pyarrow drop \
             the key). Pass the results.parquet that the run wrote, unmodified"
        ),
        None => format!("not readable as this build's schema (version {SCHEMA_VERSION:?})"),
    }
}

/// Keeps the latest report of each case on each GPU: the rows of the latest received (then the
/// highest attempt) report, one per kernel, in the file's order otherwise. A whole report is
/// superseded, not a row: a retry that timed both kernels must also drop the earlier attempt's
/// kernel-less failure row, or that failure would still count.
fn keep_latest(rows: Vec<ResultRow>) -> Vec<ResultRow> {
    let mut latest: HashMap<(&str, &str), (i64, u32)> = HashMap::new();
    for row in &rows {
        let version = (row.received_unix_ms, row.attempt);
        latest
            .entry((row.case_id.as_str(), row.device_uuid.as_str()))
            .and_modify(|v| *v = (*v).max(version))
            .or_insert(version);
    }
    // Among rows of the latest report, the last one of each kernel in the file wins.
    let mut keep: HashMap<(&str, Option<KernelKind>, &str), usize> = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        let key = (row.case_id.as_str(), row.device_uuid.as_str());
        if latest.get(&key) == Some(&(row.received_unix_ms, row.attempt)) {
            keep.insert((key.0, row.kernel, key.1), i);
        }
    }
    let mut keep: Vec<usize> = keep.into_values().collect();
    keep.sort_unstable();
    let mut rows: Vec<Option<ResultRow>> = rows.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| rows[i].take()).collect()
}

/// Typed, schema-checked access to one batch's columns.
struct BatchColumns<'a> {
    path: &'a Path,
    batch: &'a RecordBatch,
    /// Number of the batch's first row in the file, for error messages.
    first_row: usize,
}

impl<'a> BatchColumns<'a> {
    fn error(&self, column: &'static str, reason: impl Into<String>) -> AnalysisError {
        AnalysisError::Column {
            path: self.path.to_path_buf(),
            column,
            reason: reason.into(),
        }
    }

    /// The column, after checking that the schema declares it with the type the file has, and
    /// that a column the schema declares required holds no null.
    fn get(&self, name: &'static str) -> Result<&'a dyn Array, AnalysisError> {
        let def = schema::columns()
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| self.error(name, "is not in the result schema"))?;
        let array = self
            .batch
            .column_by_name(name)
            .ok_or_else(|| self.error(name, "is missing"))?;
        if !same_type(array.data_type(), &def.data_type()) {
            return Err(self.error(
                name,
                format!(
                    "has type {}, the schema declares {}",
                    array.data_type(),
                    def.data_type()
                ),
            ));
        }
        if !def.nullable {
            if let Some(i) = (0..array.len()).find(|&i| array.is_null(i)) {
                return Err(self.not_written_by_decodebench(
                    i,
                    format!(
                        "column `{name}` is null, and the result schema declares it required \
                         (decodebench writes a value in every row)"
                    ),
                ));
            }
        }
        Ok(array.as_ref())
    }

    /// A value decodebench never writes, in row `i` of the batch: the file was made or changed by
    /// something else, and analysing it would decide from values that are not the run's.
    fn not_written_by_decodebench(&self, i: usize, what: String) -> AnalysisError {
        let case = self
            .batch
            .column_by_name(column::CASE_ID)
            .and_then(|c| c.as_string_opt::<i32>())
            .filter(|c| c.is_valid(i))
            .map_or(String::new(), |c| format!(" (case {})", c.value(i)));
        AnalysisError::Schema {
            path: self.path.to_path_buf(),
            reason: format!(
                "row {}{case}: {what}. The file was not written by decodebench, or was edited \
                 after the run; pass the results.parquet the run wrote, unmodified (or rerun the \
                 run)",
                self.first_row + i
            ),
        }
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

/// Whether a column's type in the file is the one the schema declares. A list whose items are
/// declared nullable passes (other tools write lists that way): a null item in it is refused with
/// its row by [`read_batch`], which says more than a type mismatch would.
fn same_type(found: &DataType, declared: &DataType) -> bool {
    match (found, declared) {
        (DataType::List(f), DataType::List(d)) => {
            f.name() == d.name() && f.data_type() == d.data_type()
        }
        _ => found == declared,
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

/// Appends the rows of `batch`, and the settings of cases not seen before; `first_row` numbers
/// rows across batches for error messages.
fn read_batch(
    path: &Path,
    batch: &RecordBatch,
    first_row: usize,
    out: &mut Vec<ResultRow>,
    case_settings: &mut BTreeMap<String, Vec<String>>,
) -> Result<(), AnalysisError> {
    let cols = BatchColumns {
        path,
        batch,
        first_row,
    };
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
    let format = FormatOptions::default();
    let settings = CASE_SETTING_COLUMNS
        .iter()
        .map(|&name| {
            ArrayFormatter::try_new(cols.get(name)?, &format)
                .map_err(|e| cols.error(name, format!("cannot be printed: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;

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
        // `cols.list` refused a null list; a null inside one is refused here, with its place.
        let values = samples.value(i);
        let values = values
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| cols.error(SAMPLES_COLUMN, "does not hold float64 values"))?;
        if let Some(j) = (0..values.len()).find(|&j| values.is_null(j)) {
            let kernel = kernel.map_or("unknown", |k| k.as_str());
            return Err(cols.not_written_by_decodebench(
                i,
                format!(
                    "{SAMPLES_COLUMN}[{j}] of the {kernel} kernel on GPU {} is null, and \
                     decodebench writes every sample as a number",
                    text(device_uuid, i)
                ),
            ));
        }
        let samples_ms = values.values().to_vec();
        let row = ResultRow {
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
        };
        check_timing(path, first_row + i, &row)?;
        if !case_settings.contains_key(&row.case_id) {
            let values = settings.iter().map(|f| f.value(i).to_string()).collect();
            case_settings.insert(row.case_id.clone(), values);
        }
        out.push(row);
    }
    Ok(())
}

/// Refuses an `ok` row whose timing cannot be a time: a sample or median that is NaN, infinite,
/// zero or negative, or no timing at all. Such a row is a damaged file or a broken timer, and
/// analysis would misread it (a zero time is a 100 % speed-up, a NaN sorts as the slowest trial).
fn check_timing(path: &Path, row_index: usize, row: &ResultRow) -> Result<(), AnalysisError> {
    if row.effective_status() != Status::Ok {
        return Ok(());
    }
    let valid = |v: f64| v.is_finite() && v > 0.0;
    let problem = if let Some((i, v)) = row.samples_ms.iter().enumerate().find(|(_, v)| !valid(**v))
    {
        Some(format!("{SAMPLES_COLUMN}[{i}] = {v}"))
    } else if let Some(m) = row.median_ms.filter(|m| !valid(*m)) {
        Some(format!("{} = {m}", column::MEDIAN_MS))
    } else if row.samples_ms.is_empty() && row.median_ms.is_none() {
        Some(format!("no {SAMPLES_COLUMN} and no {}", column::MEDIAN_MS))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(AnalysisError::BadTiming {
            path: path.to_path_buf(),
            row: row_index,
            what: format!(
                "the {} kernel of case {} ({}) on GPU {}",
                row.kernel.map_or("unknown", |k| k.as_str()),
                row.case_id,
                row.case.label(),
                row.device_uuid
            ),
            problem,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::fixtures::{record, write_run, Gpu};
    use decodebench_kernels::KernelKind;

    #[test]
    fn analysis_columns_exist_in_the_schema() {
        for name in column::ALL.iter().chain(CASE_SETTING_COLUMNS) {
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

    #[test]
    fn analysis_load_a_later_report_supersedes_the_whole_earlier_one() {
        // The first attempt reported no kernel at all (one kernel-less row), the retry timed both:
        // the failure row must go too, or it would still count as a failed kernel.
        let gpu = Gpu::h100(0);
        let mut lost = record(&gpu, 4, 1024, &[9.0], &[9.0]);
        lost.measurement.kernels.clear();
        let mut retry = record(&gpu, 4, 1024, &[1.0, 1.1, 1.2], &[2.0, 2.1, 2.2]);
        retry.attempt = 2;
        retry.received_unix_ms += 1000;
        let dir = write_run(&[lost, retry]);
        let loaded = load_results(dir.path()).unwrap();
        assert_eq!(loaded.duplicates_dropped, 1);
        assert_eq!(loaded.rows.len(), 2);
        assert!(
            loaded
                .rows
                .iter()
                .all(|r| r.kernel.is_some() && r.attempt == 2),
            "{:?}",
            loaded.rows
        );
    }

    #[test]
    fn analysis_load_refuses_timings_that_are_not_times() {
        let gpu = Gpu::h100(0);
        for (bad, shown) in [
            (f64::NAN, "NaN"),
            (0.0, "0"),
            (-1.0, "-1"),
            (f64::INFINITY, "inf"),
        ] {
            let dir = write_run(&[record(&gpu, 4, 1024, &[1.0, bad, 1.2], &[2.0, 2.1])]);
            let e = load_results(dir.path()).unwrap_err();
            assert!(matches!(e, AnalysisError::BadTiming { .. }), "{e}");
            let e = e.to_string();
            assert!(e.contains(&format!("samples_ms[1] = {shown}")), "{e}");
            assert!(
                e.contains("the optimized kernel of case") && e.contains(&gpu.uuid),
                "{e}"
            );
            assert!(e.contains("rerun that case"), "{e}");
        }
        // A kernel that did not time is not held to it.
        let mut failed = record(&gpu, 4, 1024, &[1.0, 1.1, 1.2], &[2.0, 2.1]);
        failed.measurement.kernels[1] = decodebench_kernels::KernelMeasurement::not_timed(
            KernelKind::Optimized,
            Status::Failed,
            "launch failed",
        );
        assert!(load_results(write_run(&[failed]).path()).is_ok());
    }

    /// `parquet` rewritten to `to` with column `name` replaced by what `replace` makes of it
    /// (its field made nullable), keeping this build's schema version: a file edited by a tool
    /// that keeps the metadata.
    fn rewrite_column(
        parquet: &Path,
        to: &Path,
        name: &str,
        replace: impl Fn(&dyn Array) -> arrow::array::ArrayRef,
    ) {
        use arrow::datatypes::{Field, Schema};
        use std::sync::Arc;
        let batches = read_parquet(parquet).unwrap();
        let old = batches[0].schema();
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (f, c) in old.fields().iter().zip(batches[0].columns()) {
            if f.name() == name {
                let c = replace(c.as_ref());
                fields.push(Field::new(name, c.data_type().clone(), true));
                columns.push(c);
            } else {
                fields.push(f.as_ref().clone());
                columns.push(c.clone());
            }
        }
        let schema = Arc::new(Schema::new_with_metadata(
            fields,
            schema::schema().metadata().clone(),
        ));
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(to).unwrap(),
            schema.clone(),
            None,
        )
        .unwrap();
        w.write(&RecordBatch::try_new(schema, columns).unwrap())
            .unwrap();
        w.close().unwrap();
    }

    /// The samples column with list `row` made null (`item` None) or its item `item` made null.
    fn samples_with_null(
        samples: &dyn Array,
        row: usize,
        item: Option<usize>,
    ) -> arrow::array::ArrayRef {
        use arrow::array::{Float64Builder, ListBuilder};
        use arrow::datatypes::Field;
        let samples = samples.as_list::<i32>();
        let nullable_items = item.is_some();
        let mut b = ListBuilder::new(Float64Builder::new()).with_field(Field::new(
            "item",
            arrow::datatypes::DataType::Float64,
            nullable_items,
        ));
        for r in 0..samples.len() {
            let values = samples.value(r);
            let values = values.as_primitive::<Float64Type>();
            for (j, v) in values.values().iter().enumerate() {
                if r == row && item == Some(j) {
                    b.values().append_null();
                } else {
                    b.values().append_value(*v);
                }
            }
            b.append(!(r == row && item.is_none()));
        }
        std::sync::Arc::new(b.finish())
    }

    #[test]
    fn analysis_load_refuses_a_null_sample_naming_the_file_and_row() {
        let gpu = Gpu::h100(0);
        let records = [record(&gpu, 4, 1024, &[1.0, 1.1, 1.2], &[2.0, 2.1])];
        let dir = write_run(&records);
        let parquet = dir.path().join(PARQUET_FILE_NAME);
        let to = dir.path().join("edited.parquet");
        // Row 1 is the optimized kernel; its second sample becomes null.
        rewrite_column(&parquet, &to, SAMPLES_COLUMN, |c| {
            samples_with_null(c, 1, Some(1))
        });
        let e = load_results(&to).unwrap_err();
        assert!(matches!(e, AnalysisError::Schema { .. }), "{e}");
        let e = e.to_string();
        for part in [
            to.display().to_string(),
            format!("row 1 (case {})", records[0].case.id),
            format!(
                "samples_ms[1] of the optimized kernel on GPU {} is null",
                gpu.uuid
            ),
            "not written by decodebench, or was edited after the run".to_string(),
        ] {
            assert!(e.contains(&part), "missing {part:?} in: {e}");
        }
        // Items declared nullable but none null: read as written.
        rewrite_column(&parquet, &to, SAMPLES_COLUMN, |c| {
            samples_with_null(c, 1, Some(99))
        });
        assert_eq!(
            load_results(&to).unwrap().rows[1].samples_ms,
            [1.0, 1.1, 1.2]
        );
    }

    #[test]
    fn analysis_load_refuses_a_null_in_a_required_column() {
        let gpu = Gpu::h100(0);
        let records = [record(&gpu, 4, 1024, &[1.0, 1.1, 1.2], &[2.0, 2.1])];
        let dir = write_run(&records);
        let parquet = dir.path().join(PARQUET_FILE_NAME);
        let to = dir.path().join("edited.parquet");
        // A null samples list on an ok row (read as "no samples", it would fall back to the
        // median column), and a null attempt (read as 0, it would lose to any other copy).
        rewrite_column(&parquet, &to, SAMPLES_COLUMN, |c| {
            samples_with_null(c, 1, None)
        });
        let e = load_results(&to).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "row 1 (case {}): column `samples_ms` is null",
                records[0].case.id
            )) && e.contains("was edited after the run"),
            "{e}"
        );
        rewrite_column(&parquet, &to, column::ATTEMPT, |_| {
            std::sync::Arc::new(UInt32Array::from(vec![Some(1), None]))
        });
        let e = load_results(&to).unwrap_err().to_string();
        assert!(
            e.contains("row 1 (case ") && e.contains("column `attempt` is null"),
            "{e}"
        );
        // A null case id: the row is named without one.
        rewrite_column(&parquet, &to, column::CASE_ID, |c| {
            let ids = c.as_string::<i32>();
            std::sync::Arc::new(StringArray::from(vec![None, Some(ids.value(1))]))
        });
        let e = load_results(&to).unwrap_err().to_string();
        assert!(e.contains("row 0: column `case_id` is null"), "{e}");
    }

    #[test]
    fn analysis_load_refuses_a_file_without_rows() {
        let dir = write_run(&[]);
        let e = load_results(dir.path()).unwrap_err();
        assert!(matches!(e, AnalysisError::Empty { .. }), "{e}");
        assert!(e.to_string().contains("holds no result rows"), "{e}");
    }

    /// `parquet` rewritten to `to` with `version` as its schema version (none: the key dropped,
    /// as pandas does).
    fn rewrite_with_version(parquet: &Path, to: &Path, version: Option<&str>) {
        use std::sync::Arc;
        let batches = read_parquet(parquet).unwrap();
        let mut metadata = HashMap::new();
        if let Some(v) = version {
            metadata.insert(SCHEMA_VERSION_KEY.to_string(), v.to_string());
        }
        let schema = Arc::new(arrow::datatypes::Schema::new_with_metadata(
            batches[0].schema().fields().clone(),
            metadata,
        ));
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(to).unwrap(),
            schema.clone(),
            None,
        )
        .unwrap();
        for b in &batches {
            w.write(&RecordBatch::try_new(schema.clone(), b.columns().to_vec()).unwrap())
                .unwrap();
        }
        w.close().unwrap();
    }

    #[test]
    fn analysis_load_explains_files_it_cannot_read() {
        let gpu = Gpu::h100(0);
        let dir = write_run(&[record(&gpu, 4, 1024, &[1.0, 1.1, 1.2], &[2.0, 2.1])]);
        let parquet = dir.path().join(PARQUET_FILE_NAME);
        let err = |p: &Path| load_results(p).unwrap_err();

        // The run's results.csv, and the reference-format CSV: the Parquet file is named.
        let e = err(&dir.path().join(crate::sink::CSV_FILE_NAME));
        assert!(
            matches!(
                e,
                AnalysisError::CsvGiven {
                    parquet: Some(_),
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .ends_with(&format!("pass {}", parquet.display())),
            "{e}"
        );
        let alone = tempfile::tempdir().unwrap();
        let csv = alone.path().join("numbers.txt");
        std::fs::write(&csv, "batch_size,trtllm_mean\n1,0.5\n").unwrap();
        let e = err(&csv).to_string();
        assert!(
            e.contains("is a CSV file") && e.contains("pass the run's --out directory"),
            "{e}"
        );

        // A copy cut short, and an empty file.
        let bytes = std::fs::read(&parquet).unwrap();
        let cut = alone.path().join("cut.parquet");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = err(&cut);
        assert!(matches!(e, AnalysisError::Damaged { .. }), "{e}");
        assert!(e.to_string().contains("damaged or truncated"), "{e}");
        let empty = alone.path().join("empty.parquet");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(err(&empty), AnalysisError::ZeroBytes { .. }));

        // Schema versions: none (rewritten by another tool), newer, older.
        let newer = (SCHEMA_VERSION.parse::<u32>().unwrap() + 1).to_string();
        for (version, expected) in [
            (None, "no decodebench schema version"),
            (Some(newer.as_str()), "written by a newer decodebench"),
            (Some("0"), "written by an older decodebench"),
        ] {
            let to = alone.path().join("rewritten.parquet");
            rewrite_with_version(&parquet, &to, version);
            let e = err(&to);
            assert!(matches!(e, AnalysisError::Schema { .. }), "{e}");
            assert!(e.to_string().contains(expected), "{version:?}: {e}");
        }
        // The same rewrite with this build's version reads (the test's writer is sound).
        let to = alone.path().join("same.parquet");
        rewrite_with_version(&parquet, &to, Some(SCHEMA_VERSION));
        assert_eq!(load_results(&to).unwrap().rows.len(), 2);
    }
}
