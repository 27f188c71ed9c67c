//! `results.parquet`: every row of the schema, zstd-compressed, with the per-trial samples kept as
//! a list column, plus the reader that analysis and tests use to get it back.

use super::{ResultSink, SinkError, PARQUET_FILE_NAME};
use crate::record::ResultRecord;
use crate::schema::{self, SCHEMA_VERSION_KEY};
use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::file::properties::WriterProperties;
use arrow::record_batch::RecordBatch;
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// zstd level 3: zstd's own default, a good ratio at a speed far above what a run produces.
const ZSTD_LEVEL: i32 = 3;

/// Writes the Parquet file.
pub struct ParquetSink;

impl ResultSink for ParquetSink {
    fn file_name(&self) -> String {
        PARQUET_FILE_NAME.to_string()
    }

    fn write(
        &self,
        out: &mut (dyn Write + Send),
        _records: &[ResultRecord],
        batch: &RecordBatch,
    ) -> Result<(), SinkError> {
        write_parquet(out, batch)
    }
}

/// Encodes `batch` (of [`schema::schema`]) as a zstd Parquet file into `out`.
pub fn write_parquet<W: Write + Send>(out: W, batch: &RecordBatch) -> Result<(), SinkError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .build();
    let mut writer = ArrowWriter::try_new(out, schema::schema(), Some(props))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(())
}

/// Reads a `results.parquet` back, checking that it carries this build's schema version.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>, SinkError> {
    let file = File::open(path).map_err(|source| SinkError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let not_parquet = |source| SinkError::NotParquet {
        path: path.to_path_buf(),
        source,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(not_parquet)?;
    let found = builder.schema().metadata().get(SCHEMA_VERSION_KEY).cloned();
    if found.as_deref() != Some(schema::SCHEMA_VERSION) {
        return Err(SinkError::SchemaMismatch {
            path: path.to_path_buf(),
            reason: format!(
                "schema version {:?}, this build reads {:?}",
                found.unwrap_or_default(),
                schema::SCHEMA_VERSION
            ),
        });
    }
    let reader = builder.build().map_err(not_parquet)?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_parquet(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::tests::sample_record;
    use crate::schema::SAMPLES_COLUMN;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Float64Type;

    #[test]
    fn round_trip_keeps_rows_columns_and_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.parquet");
        let records = vec![
            sample_record(4, &[1.25, 2.5, 3.75], &[2.0, 4.0]),
            sample_record(8, &[], &[5.0]),
        ];
        let batch = schema::record_batch(&records).unwrap();
        write_parquet(File::create(&path).unwrap(), &batch).unwrap();

        let back = read_parquet(&path).unwrap();
        assert_eq!(back.len(), 1);
        let got = &back[0];
        assert_eq!(got.num_rows(), 4);
        assert_eq!(got.schema().fields(), schema::schema().fields());
        let samples = got.column_by_name(SAMPLES_COLUMN).unwrap().as_list::<i32>();
        assert_eq!(
            samples
                .value(1)
                .as_primitive::<Float64Type>()
                .values()
                .to_vec(),
            vec![1.25, 2.5, 3.75]
        );
        assert_eq!(samples.value(3).len(), 0);
        // Every column survives bit for bit.
        for (i, field) in batch.schema().fields().iter().enumerate() {
            assert_eq!(
                got.column(i).to_data(),
                batch.column(i).to_data(),
                "column {}",
                field.name()
            );
        }
    }

    #[test]
    fn files_without_our_schema_version_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.parquet");
        let batch = schema::record_batch(&[]).unwrap();
        let bare = std::sync::Arc::new(arrow::datatypes::Schema::new(
            batch.schema().fields().clone(),
        ));
        let batch = RecordBatch::try_new(bare.clone(), batch.columns().to_vec()).unwrap();
        let mut w = ArrowWriter::try_new(File::create(&path).unwrap(), bare, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let e = read_parquet(&path).unwrap_err().to_string();
        assert!(e.contains("schema mismatch"), "{e}");
    }
}
