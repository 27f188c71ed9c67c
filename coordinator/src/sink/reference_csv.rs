//! `decode_attention_benchmark_YYYYMMDD_HHMMSS.csv`: exactly the reference script's CSV (vLLM's
//! `benchmark_trtllm_decode_attention.py`), so analysis written for that script keeps working.
//!
//! One row per record (case x device): the optimized kernel in the `trtllm_*` columns, the
//! baseline in `baseline_*`, `speedup_percent` the fraction `(baseline - optimized) / baseline`
//! (the script's name, its definition), dtypes spelled as the script prints them.
//!
//! A kernel without an ok timing (skipped, oom, wrong result, failed) leaves its mean and std
//! cells empty, and then `speedup_percent` is empty too; pandas reads empty cells as NaN. The row
//! stays, so the file still lists every case that was run; the reason is in `results.csv`.

use super::{ResultSink, SinkError};
use crate::record::ResultRecord;
use crate::sink::csv::format_f64;
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Local};
use decodebench_kernels::{KernelKind, Status, TimingStats};
use std::io::Write;

/// The reference script's columns, in its order.
pub const REFERENCE_COLUMNS: [&str; 13] = [
    "batch_size",
    "trtllm_mean",
    "trtllm_std",
    "baseline_mean",
    "baseline_std",
    "speedup_percent",
    "q_dtype",
    "kv_cache_dtype",
    "output_dtype",
    "block_size",
    "num_kv_heads",
    "head_size",
    "max_seq_len",
];

/// Writes the reference-format CSV, named after the run's timestamp.
pub struct ReferenceCsvSink {
    pub timestamp: DateTime<Local>,
}

impl ResultSink for ReferenceCsvSink {
    fn file_name(&self) -> String {
        reference_csv_file_name(self.timestamp)
    }

    fn write(
        &self,
        out: &mut (dyn Write + Send),
        records: &[ResultRecord],
        _batch: &RecordBatch,
    ) -> Result<(), SinkError> {
        write_reference_csv(out, records)
    }
}

/// `decode_attention_benchmark_YYYYMMDD_HHMMSS.csv`
pub fn reference_csv_file_name(timestamp: DateTime<Local>) -> String {
    format!(
        "decode_attention_benchmark_{}.csv",
        timestamp.format("%Y%m%d_%H%M%S")
    )
}

/// The timing statistics of a kernel, only if it ran correctly and was timed.
fn ok_timing(record: &ResultRecord, kind: KernelKind) -> Option<TimingStats> {
    record
        .kernel(kind)
        .filter(|k| k.status == Some(Status::Ok))
        .and_then(|k| k.stats)
}

fn cell(x: Option<f64>) -> String {
    x.map(format_f64).unwrap_or_default()
}

/// Writes the header and one row per record.
pub fn write_reference_csv<W: Write>(out: W, records: &[ResultRecord]) -> Result<(), SinkError> {
    let mut writer = ::csv::Writer::from_writer(out);
    writer.write_record(REFERENCE_COLUMNS)?;
    for record in records {
        let case = &record.case;
        let optimized = ok_timing(record, KernelKind::Optimized);
        let baseline = ok_timing(record, KernelKind::Baseline);
        let speedup = match (optimized, baseline) {
            (Some(o), Some(b)) if b.mean_ms > 0.0 => Some((b.mean_ms - o.mean_ms) / b.mean_ms),
            _ => None,
        };
        writer.write_record([
            case.batch_size.to_string(),
            cell(optimized.map(|s| s.mean_ms)),
            cell(optimized.map(|s| s.std_ms)),
            cell(baseline.map(|s| s.mean_ms)),
            cell(baseline.map(|s| s.std_ms)),
            cell(speedup),
            case.quant.q.torch_name().to_string(),
            case.quant.kv.torch_name().to_string(),
            case.quant.out.torch_name().to_string(),
            case.block_size.to_string(),
            case.num_kv_heads.to_string(),
            case.head_size.to_string(),
            case.max_seq_len.to_string(),
        ])?;
    }
    writer.flush().map_err(::csv::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::tests::sample_record;
    use chrono::TimeZone;
    use decodebench_kernels::QuantMode;

    const HEADER: &str = "batch_size,trtllm_mean,trtllm_std,baseline_mean,baseline_std,\
                          speedup_percent,q_dtype,kv_cache_dtype,output_dtype,block_size,\
                          num_kv_heads,head_size,max_seq_len\n";

    fn render(records: &[ResultRecord]) -> String {
        let mut bytes = Vec::new();
        write_reference_csv(&mut bytes, records).unwrap();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn header_is_byte_exact() {
        assert_eq!(render(&[]), HEADER);
    }

    #[test]
    fn rows_carry_the_scripts_values() {
        let mut nvfp4 = sample_record(4, &[1.0, 3.0], &[4.0, 4.0]);
        nvfp4.case.quant = QuantMode::FP8_QKV_NVFP4_OUT;
        let text = render(&[sample_record(4, &[1.0, 2.0, 3.0], &[4.0, 4.0]), nvfp4]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        // optimized mean 2, std 1; baseline mean 4, std 0; speedup (4-2)/4.
        assert_eq!(
            lines[1],
            "4,2.0,1.0,4.0,0.0,0.5,torch.float8_e4m3fn,torch.float8_e4m3fn,torch.bfloat16,16,8,128,1024"
        );
        assert!(
            lines[2].ends_with("torch.float8_e4m3fn,torch.float8_e4m3fn,torch.uint8,16,8,128,1024")
        );
    }

    #[test]
    fn a_kernel_without_ok_timing_leaves_empty_cells() {
        let mut wrong = sample_record(8, &[1.0], &[2.0]);
        wrong.measurement.kernels[0].status = Some(Status::WrongResult);
        let text = render(&[sample_record(16, &[], &[5.0, 5.0]), wrong]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("16,,,5.0,0.0,,torch."), "{}", lines[1]);
        assert!(lines[2].starts_with("8,1.0,0.0,,,,torch."), "{}", lines[2]);
        // Still a rectangular CSV.
        let mut reader = ::csv::Reader::from_reader(text.as_bytes());
        for row in reader.records() {
            assert_eq!(row.unwrap().len(), 13);
        }
    }

    #[test]
    fn file_name_uses_the_scripts_timestamp_format() {
        let ts = Local.with_ymd_and_hms(2025, 12, 31, 23, 59, 1).unwrap();
        assert_eq!(
            reference_csv_file_name(ts),
            "decode_attention_benchmark_20251231_235901.csv"
        );
    }
}
