//! The number formats against the golden CSV/JSON files, and encode-decode round trips on known
//! bit patterns.

use crate::common::read_fixture;
use decodebench_kernels::formats::{
    dequantize_nvfp4, e2m1_to_f32, e4m3_to_f32, f32_to_e2m1, f32_to_e4m3, nvfp4_sf_offset,
    nvfp4_sf_shape, quantize_nvfp4, E2M1_MAGNITUDES,
};
use std::collections::HashSet;

fn csv_rows(name: &str) -> Vec<Vec<String>> {
    let text = String::from_utf8(read_fixture(name)).expect("utf-8 csv");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|f| f.trim().to_string()).collect())
        .collect()
}

/// Parses "1.5" and numpy's "np.float64(1.5)" alike.
fn parse_number(field: &str) -> f64 {
    let inner = field
        .strip_prefix("np.float64(")
        .and_then(|f| f.strip_suffix(')'))
        .unwrap_or(field);
    inner
        .parse()
        .unwrap_or_else(|e| panic!("bad number {field:?}: {e}"))
}

fn same_value(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn fp8_e4m3_matches_golden_csv() {
    let rows = csv_rows("fp8_e4m3.csv");
    assert!(
        rows.len() >= 100,
        "expected the full table, got {}",
        rows.len()
    );
    for row in rows {
        let input = f32::from_bits(u32::from_str_radix(&row[0], 16).expect("hex input"));
        let bits: u8 = row[2].parse().expect("e4m3 bits");
        let value = parse_number(&row[3]) as f32;
        assert_eq!(
            f32_to_e4m3(input),
            bits,
            "f32_to_e4m3({input:e}) (row {row:?})"
        );
        assert!(
            same_value(e4m3_to_f32(bits), value),
            "e4m3_to_f32({bits:#04x}) = {}, expected {value}",
            e4m3_to_f32(bits)
        );
    }
}

#[test]
fn fp4_e2m1_matches_golden_csv() {
    let rows = csv_rows("fp4_e2m1.csv");
    assert!(
        rows.len() >= 60,
        "expected the full table, got {}",
        rows.len()
    );
    for row in rows {
        let input = parse_number(&row[0]) as f32;
        let code: u8 = row[1].parse().expect("code");
        let value = parse_number(&row[2]) as f32;
        assert_eq!(
            f32_to_e2m1(input),
            code,
            "f32_to_e2m1({input}) (row {row:?})"
        );
        assert_eq!(e2m1_to_f32(code), value, "e2m1_to_f32({code})");
    }
}

#[test]
fn nvfp4_swizzle_matches_golden_json() {
    let json: serde_json::Value =
        serde_json::from_slice(&read_fixture("nvfp4_swizzle.json")).expect("json");
    let cases = json["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    for c in cases {
        let rows = c["rows"].as_u64().expect("rows") as usize;
        let sf_cols = c["sf_cols"].as_u64().expect("sf_cols") as usize;
        let padded: Vec<usize> = c["padded_shape"]
            .as_array()
            .expect("padded_shape")
            .iter()
            .map(|v| v.as_u64().expect("dim") as usize)
            .collect();
        assert_eq!(nvfp4_sf_shape(rows, sf_cols), (padded[0], padded[1]));
        let points = c["points"].as_array().expect("points");
        assert!(!points.is_empty());
        for p in points {
            let (m, k, offset) = (
                p["m"].as_u64().expect("m") as usize,
                p["k"].as_u64().expect("k") as usize,
                p["offset"].as_u64().expect("offset") as usize,
            );
            assert_eq!(
                nvfp4_sf_offset(m, k, sf_cols),
                offset,
                "rows {rows} sf_cols {sf_cols} (m {m}, k {k})"
            );
        }
        // Every padded position gets its own byte inside the padded tensor.
        let mut seen = HashSet::new();
        for m in 0..padded[0] {
            for k in 0..padded[1] {
                let o = nvfp4_sf_offset(m, k, sf_cols);
                assert!(o < padded[0] * padded[1], "offset {o} past the tensor");
                assert!(seen.insert(o), "offset {o} used twice");
            }
        }
    }
}

#[test]
fn e4m3_round_trips_every_code() {
    for b in 0..=255u8 {
        let v = e4m3_to_f32(b);
        let expect = if v.is_nan() { 0x7f } else { b };
        assert_eq!(f32_to_e4m3(v), expect, "code {b:#04x} -> {v}");
    }
    // Positive codes decode in increasing order (the format is sign-magnitude, monotone).
    let positives: Vec<f32> = (0..0x7fu8).map(e4m3_to_f32).collect();
    assert!(positives.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(e4m3_to_f32(0x7e), 448.0);
}

#[test]
fn e2m1_round_trips_every_code() {
    for code in 0..16u8 {
        let v = e2m1_to_f32(code);
        assert_eq!(f32_to_e2m1(v), code, "code {code} -> {v}");
        assert_eq!(v.abs(), E2M1_MAGNITUDES[(code & 7) as usize]);
        assert_eq!(v.is_sign_negative(), code & 8 != 0);
    }
}

#[test]
fn nvfp4_quantizes_a_known_block_bit_exactly() {
    // Scale factor 2 (e4m3 0x40) with global scale 1: every value is an e2m1 magnitude times 2.
    let mut row = [0.0f32; 16];
    let grid = [6.0, -0.5, 1.0, 1.5, -2.0, 3.0, 4.0, 0.0];
    for (i, &x) in grid.iter().enumerate() {
        row[i] = x * 2.0;
        row[15 - i] = -x * 2.0;
    }
    let t = quantize_nvfp4(&row, 1, 16, 1.0);
    assert_eq!(t.rows, 1);
    assert_eq!(t.cols, 16);
    // Element 0 (6 -> code 7) in the low nibble, element 1 (-0.5 -> code 9) in the high one.
    assert_eq!(t.packed[0], 0x97);
    assert_eq!(t.packed.len(), 8);
    assert_eq!(t.scales_swizzled.len(), 128 * 4);
    assert_eq!(t.scales_swizzled[0], 0x40);
    assert!(
        t.scales_swizzled[1..].iter().all(|&b| b == 0),
        "padding is zero"
    );
    assert_eq!(dequantize_nvfp4(&t, 1.0), row.to_vec());

    // With the reference global scale the decoded values are the same.
    let g = 500.0;
    let scaled: Vec<f32> = row.iter().map(|x| x / g * 4.0).collect();
    let t = quantize_nvfp4(&scaled, 1, 16, g);
    assert_eq!(t.packed[0], 0x97);
    let back = dequantize_nvfp4(&t, g);
    for (a, b) in back.iter().zip(&scaled) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
    }
}

#[test]
fn nvfp4_places_blocks_of_later_rows_and_columns() {
    let (rows, cols) = (3, 64);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i % 13) as f32 - 6.0) * (1 + i / cols) as f32)
        .collect();
    let t = quantize_nvfp4(&x, rows, cols, 1.0);
    for r in 0..rows {
        for blk in 0..cols / 16 {
            let amax = x[r * cols + blk * 16..][..16]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(
                t.scales_swizzled[nvfp4_sf_offset(r, blk, cols / 16)],
                f32_to_e4m3(amax / 6.0),
                "row {r} block {blk}"
            );
        }
        for c in 0..cols {
            let code = t.code(r, c);
            let byte = t.packed[r * cols / 2 + c / 2];
            assert_eq!(code, if c % 2 == 0 { byte & 15 } else { byte >> 4 });
        }
    }
    let back = dequantize_nvfp4(&t, 1.0);
    for (i, (a, b)) in back.iter().zip(&x).enumerate() {
        let sf = e4m3_to_f32(t.scale_factor(i / cols, i % cols));
        assert!((a - b).abs() <= sf, "element {i}: {a} vs {b} (scale {sf})");
    }
}
