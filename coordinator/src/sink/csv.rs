//! `results.csv`: the rows and columns of the schema, flat, for spreadsheets and pandas. The
//! per-trial samples list becomes one `;`-joined string; nulls become empty cells.

use super::{ResultSink, SinkError, CSV_FILE_NAME};
use crate::record::ResultRecord;
use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type, UInt32Type, UInt64Type};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use std::fmt::Write as _;
use std::io::Write;

/// Separator of the values inside the flattened samples cell (`,` is the field separator).
pub const SAMPLES_SEPARATOR: char = ';';

/// Writes the flat CSV.
pub struct CsvSink;

impl ResultSink for CsvSink {
    fn file_name(&self) -> String {
        CSV_FILE_NAME.to_string()
    }

    fn write(
        &self,
        out: &mut (dyn Write + Send),
        _records: &[ResultRecord],
        batch: &RecordBatch,
    ) -> Result<(), SinkError> {
        write_csv(out, batch)
    }
}

/// Writes `batch` as CSV with a header row of the column names.
pub fn write_csv<W: Write>(out: W, batch: &RecordBatch) -> Result<(), SinkError> {
    let mut writer = ::csv::Writer::from_writer(out);
    let schema = batch.schema();
    writer.write_record(schema.fields().iter().map(|f| f.name().as_str()))?;
    let mut row: Vec<String> = Vec::with_capacity(batch.num_columns());
    for i in 0..batch.num_rows() {
        row.clear();
        for column in batch.columns() {
            row.push(format_cell(column, i)?);
        }
        writer.write_record(&row)?;
    }
    writer.flush().map_err(::csv::Error::from)?;
    Ok(())
}

/// A float the way Python's `str(float)` prints it where it matters to pandas: whole numbers keep
/// a `.0` (so a column stays float), and non-finite values read back as NaN/inf.
pub fn format_f64(x: f64) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn format_cell(column: &ArrayRef, i: usize) -> Result<String, ArrowError> {
    if column.is_null(i) {
        return Ok(String::new());
    }
    Ok(match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().value(i).to_string(),
        DataType::UInt32 => column.as_primitive::<UInt32Type>().value(i).to_string(),
        DataType::UInt64 => column.as_primitive::<UInt64Type>().value(i).to_string(),
        DataType::Int64 => column.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::Float64 => format_f64(column.as_primitive::<Float64Type>().value(i)),
        DataType::Boolean => column.as_boolean().value(i).to_string(),
        DataType::List(_) => {
            let values = column.as_list::<i32>().value(i);
            let values = values
                .as_primitive_opt::<Float64Type>()
                .ok_or_else(|| unsupported(values.data_type()))?;
            let mut cell = String::new();
            for (j, v) in values.values().iter().enumerate() {
                if j > 0 {
                    cell.push(SAMPLES_SEPARATOR);
                }
                let _ = write!(cell, "{v}");
            }
            cell
        }
        other => return Err(unsupported(other)),
    })
}

fn unsupported(t: &DataType) -> ArrowError {
    ArrowError::NotYetImplemented(format!(
        "CSV output of a {t} column; add a case to sink::csv::format_cell"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::tests::sample_record;
    use crate::schema::{self, SAMPLES_COLUMN};

    #[test]
    fn csv_parses_back_with_every_row_and_column() {
        let records = vec![
            sample_record(4, &[1.25, 2.5, 3.0], &[2.0, 4.0]),
            sample_record(8, &[], &[5.0]),
        ];
        let batch = schema::record_batch(&records).unwrap();
        let mut bytes = Vec::new();
        write_csv(&mut bytes, &batch).unwrap();

        let mut reader = ::csv::Reader::from_reader(bytes.as_slice());
        let header: Vec<String> = reader
            .headers()
            .unwrap()
            .iter()
            .map(str::to_string)
            .collect();
        let names: Vec<String> = schema::schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(header, names);
        let rows: Vec<::csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 4);
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        assert_eq!(&rows[1][col(SAMPLES_COLUMN)], "1.25;2.5;3");
        assert_eq!(&rows[3][col(SAMPLES_COLUMN)], "");
        assert_eq!(&rows[1][col("kernel")], "optimized");
        assert_eq!(&rows[1][col("mean_ms")], "2.25");
        assert_eq!(&rows[3][col("mean_ms")], "", "null mean is an empty cell");
        assert_eq!(&rows[3][col("message")], "launch failed, \"x\"");
        assert_eq!(
            &rows[0][col("throttle_reasons")],
            "sw_power_cap,hw_slowdown"
        );
        assert_eq!(&rows[0][col("wall_s")], "1.5");
        assert_eq!(&rows[0][col("throttled")], "false");
    }

    #[test]
    fn floats_print_as_python_would() {
        assert_eq!(format_f64(2.0), "2.0");
        assert_eq!(format_f64(0.125), "0.125");
        assert_eq!(format_f64(-3.0), "-3.0");
        assert_eq!(format_f64(f64::NAN), "nan");
        assert_eq!(format_f64(f64::NEG_INFINITY), "-inf");
    }
}
