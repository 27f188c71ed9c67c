//! Result sinks: the files a run leaves behind, all written from the one schema.
//!
//! Each sink renders the same records into one file format through [`ResultSink`] (the shape of
//! ripgrep's `Sink`: the caller owns the loop, the sink only formats). [`write_outputs`] writes all
//! of them atomically: each file is written to a temporary name in the output directory, synced,
//! and renamed over the final name, so a reader (or a crash) never sees a half-written file.

pub mod csv;
pub mod parquet;
pub mod reference_csv;

use crate::record::ResultRecord;
use crate::schema;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Local};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// File name of the Parquet output.
pub const PARQUET_FILE_NAME: &str = "results.parquet";
/// File name of the flat CSV output.
pub const CSV_FILE_NAME: &str = "results.csv";

/// Why writing (or reading back) an output failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{}: {source}; check that the output directory exists and is writable", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the result table failed: {0}")]
    Arrow(#[from] ArrowError),
    #[error("Parquet encoding failed: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("CSV encoding failed: {0}")]
    Csv(#[from] ::csv::Error),
    #[error("cannot read {}: {source}; pass a run's --out directory or its results.parquet", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a readable results.parquet ({source}); pass a run's --out directory or its results.parquet", path.display())]
    NotParquet {
        path: PathBuf,
        source: ::parquet::errors::ParquetError,
    },
    #[error("{}: schema mismatch: {reason}; it was written by an incompatible decodebench version", path.display())]
    SchemaMismatch { path: PathBuf, reason: String },
}

/// Renders records into one output format.
pub trait ResultSink {
    /// Name of the file this sink writes inside the output directory.
    fn file_name(&self) -> String;

    /// Writes the whole file. `batch` is `schema::record_batch(records)`, built once and shared by
    /// every sink.
    fn write(
        &self,
        out: &mut (dyn Write + Send),
        records: &[ResultRecord],
        batch: &RecordBatch,
    ) -> Result<(), SinkError>;
}

/// Where [`write_outputs`] put the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPaths {
    pub parquet: PathBuf,
    pub csv: PathBuf,
    pub reference_csv: PathBuf,
}

/// Writes `results.parquet`, `results.csv` and the reference-format CSV (named after `timestamp`)
/// into `dir`, each atomically. Records are written in the order given.
pub fn write_outputs(
    dir: &Path,
    records: &[ResultRecord],
    timestamp: DateTime<Local>,
) -> Result<OutputPaths, SinkError> {
    fs::create_dir_all(dir).map_err(|source| SinkError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let batch = schema::record_batch(records)?;
    let parquet = write_atomically(dir, &parquet::ParquetSink, records, &batch)?;
    let csv = write_atomically(dir, &csv::CsvSink, records, &batch)?;
    let reference_csv = write_atomically(
        dir,
        &reference_csv::ReferenceCsvSink { timestamp },
        records,
        &batch,
    )?;
    Ok(OutputPaths {
        parquet,
        csv,
        reference_csv,
    })
}

/// Writes one sink's file under a temporary name, syncs it, renames it into place and syncs the
/// directory. On failure the temporary file is removed and the previous file (if any) is intact.
pub fn write_atomically(
    dir: &Path,
    sink: &dyn ResultSink,
    records: &[ResultRecord],
    batch: &RecordBatch,
) -> Result<PathBuf, SinkError> {
    let final_path = dir.join(sink.file_name());
    let tmp_path = dir.join(format!(".{}.{}.tmp", sink.file_name(), std::process::id()));
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SinkError::Io { path, source }
    };
    let result = (|| {
        let file = File::create(&tmp_path).map_err(io_err(&tmp_path))?;
        let mut out = BufWriter::new(file);
        sink.write(&mut out, records, batch)?;
        let file = out.into_inner().map_err(|e| SinkError::Io {
            path: tmp_path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&tmp_path))?;
        fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path))?;
        sync_dir(dir).map_err(io_err(dir))
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage now; the error being returned matters more.
        let _ = fs::remove_file(&tmp_path);
    }
    result.map(|()| final_path)
}

/// Makes a rename or a new file in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::tests::sample_record;
    use chrono::TimeZone;

    #[test]
    fn write_outputs_writes_three_files_and_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let records = vec![sample_record(4, &[1.0, 2.0], &[2.0, 3.0])];
        let ts = Local.with_ymd_and_hms(2025, 3, 4, 5, 6, 7).unwrap();
        let out = dir.path().join("out");
        let paths = write_outputs(&out, &records, ts).unwrap();
        assert_eq!(paths.parquet, out.join("results.parquet"));
        assert_eq!(paths.csv, out.join("results.csv"));
        assert_eq!(
            paths.reference_csv,
            out.join("decode_attention_benchmark_20250304_050607.csv")
        );
        let mut names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "decode_attention_benchmark_20250304_050607.csv",
                "results.csv",
                "results.parquet"
            ]
        );
        // Rewriting replaces the files in place.
        let more = vec![records[0].clone(), sample_record(8, &[1.0], &[1.0])];
        write_outputs(&out, &more, ts).unwrap();
        let rows = parquet::read_parquet(&paths.parquet).unwrap();
        assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 4);
    }

    #[test]
    fn unwritable_directory_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"not a directory").unwrap();
        let e = write_outputs(&blocker.join("sub"), &[], Local::now()).unwrap_err();
        assert!(e.to_string().contains("file/sub"), "{e}");
    }
}
