//! The number formats decode attention is benchmarked in: BF16, FP8 e4m3 (OCP "e4m3fn", no
//! infinities, one NaN pattern per sign) and NVFP4 (e2m1 values in 16-element blocks with an e4m3
//! scale factor per block, stored in the 128x4 swizzled layout of DESIGN.md).
//!
//! Everything here is bit-exact software rounding (round to nearest, ties to even; saturating where
//! the format has no infinity), because the CPU reference must reproduce the golden vectors made
//! with PyTorch and ml_dtypes, and because Hopper has no e2m1 conversion instruction either: the
//! CUDA kernels implement the same rounding, and these functions are what they are checked against.

use half::bf16;

/// Largest finite e4m3 magnitude (`0x7e` = 1.75 * 2^8); saturating conversions clamp to it.
pub const E4M3_MAX: f32 = 448.0;

/// The e4m3 NaN bit pattern (positive sign); e4m3fn has no infinities.
pub const E4M3_NAN: u8 = 0x7f;

/// Largest e2m1 magnitude; saturating conversions clamp to it.
pub const E2M1_MAX: f32 = 6.0;

/// Elements that share one NVFP4 scale factor.
pub const NVFP4_BLOCK_ELEMS: usize = 16;

/// Rows of one 128x4 scale-factor tile in the NVFP4 swizzled layout.
pub const NVFP4_SF_TILE_ROWS: usize = 128;

/// Scale-factor columns of one 128x4 tile.
pub const NVFP4_SF_TILE_COLS: usize = 4;

/// Bytes of one 128x4 scale-factor tile (128 rows x 4 columns, one e4m3 byte each).
const NVFP4_SF_TILE_BYTES: usize = NVFP4_SF_TILE_ROWS * NVFP4_SF_TILE_COLS;

/// Magnitudes of the eight non-negative e2m1 codes, indexed by the low 3 bits of the code.
pub const E2M1_MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// `2^exp` as an `f32`, for `exp` in the normal range; usable in const context.
const fn pow2(exp: i32) -> f32 {
    f32::from_bits(((exp + 127) as u32) << 23)
}

/// Decodes one e4m3 byte. `0x7f`/`0xff` are NaN; there are no infinities.
pub const fn e4m3_to_f32(b: u8) -> f32 {
    let negative = b & 0x80 != 0;
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as i32;
    if exp == 0x0f && man == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // Subnormal: man * 2^-9 (the smallest step of the format).
        man as f32 * pow2(-9)
    } else {
        (8 + man) as f32 * pow2(exp - 10)
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// All 256 e4m3 bytes decoded, for table look-up in the kernels' inner loops.
pub const E4M3_TABLE: [f32; 256] = {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = e4m3_to_f32(i as u8);
        i += 1;
    }
    table
};

/// Converts to e4m3 the way `torch.Tensor.to(torch.float8_e4m3fn)` does after clamping to ±448:
/// round to nearest even, saturate at ±448 (infinities too), NaN -> `0x7f`. The sign of zero and
/// of values that round to zero is kept.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    // Below the smallest normal (2^-6) the grid is uniform with step 2^-9, and the code is the
    // number of steps. Multiplying by a power of two is exact, so the rounding is the only one.
    if a < pow2(-6) {
        let steps = (a * pow2(9)).round_ties_even() as u8;
        // steps == 8 is 2^-6, whose code (exponent 1, mantissa 0) is also 8.
        return sign | steps;
    }
    let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
    // a / 2^(exp-3) lies in [8, 16); its rounding is the 1.mmm significand. Exact scaling again.
    let mut significand = (a * pow2(3 - exp)).round_ties_even() as i32;
    let mut exp = exp;
    if significand == 16 {
        significand = 8;
        exp += 1;
    }
    // |a| <= 448 keeps exp + 7 <= 15 and excludes the NaN pattern (1.111 * 2^8 = 480 > 448).
    sign | (((exp + 7) as u8) << 3) | (significand - 8) as u8
}

/// Decodes a 4-bit e2m1 code (bit 3 = sign, low 3 bits index [`E2M1_MAGNITUDES`]).
pub fn e2m1_to_f32(code: u8) -> f32 {
    let magnitude = E2M1_MAGNITUDES[(code & 0x07) as usize];
    if code & 0x08 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Converts to a 4-bit e2m1 code: round to nearest even code, saturating at ±6. The sign bit is
/// kept for values that round to zero (as ml_dtypes does). e2m1 has no NaN; a NaN input becomes
/// +6 (the satfinite convention of saturating to the largest finite value).
pub fn f32_to_e2m1(x: f32) -> u8 {
    if x.is_nan() {
        return 0x07;
    }
    let sign = if x.is_sign_negative() { 0x08u8 } else { 0 };
    let a = x.abs();
    // Midpoints between neighbouring magnitudes; at a tie the even code wins, so a midpoint
    // below an odd code rounds down (`<=`) and one below an even code rounds up (`<`).
    let code = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | code
}

/// Rounds to the nearest bf16 value (ties to even) and returns it as f32.
pub fn bf16_round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Shape of the swizzled NVFP4 scale-factor tensor for `rows` x `sf_cols` scale factors:
/// `(round_up(rows, 128), round_up(sf_cols, 4))`.
pub fn nvfp4_sf_shape(rows: usize, sf_cols: usize) -> (usize, usize) {
    (
        rows.div_ceil(NVFP4_SF_TILE_ROWS) * NVFP4_SF_TILE_ROWS,
        sf_cols.div_ceil(NVFP4_SF_TILE_COLS) * NVFP4_SF_TILE_COLS,
    )
}

/// Byte offset of scale factor (`row`, `sf_col`) in the 128x4 swizzled layout of a tensor with
/// `sf_cols` scale-factor columns (before padding):
/// `(m/128)*(ceil(cols/4)*512) + (k/4)*512 + (m%32)*16 + ((m%128)/32)*4 + (k%4)`.
pub fn nvfp4_sf_offset(row: usize, sf_col: usize, sf_cols: usize) -> usize {
    let col_tiles = sf_cols.div_ceil(NVFP4_SF_TILE_COLS);
    (row / NVFP4_SF_TILE_ROWS) * (col_tiles * NVFP4_SF_TILE_BYTES)
        + (sf_col / NVFP4_SF_TILE_COLS) * NVFP4_SF_TILE_BYTES
        + (row % 32) * 16
        + ((row % NVFP4_SF_TILE_ROWS) / 32) * 4
        + (sf_col % NVFP4_SF_TILE_COLS)
}

/// One quantized NVFP4 block: its e4m3 scale-factor byte and one e2m1 code per element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nvfp4Block {
    pub scale_factor: u8,
    pub codes: [u8; NVFP4_BLOCK_ELEMS],
}

/// Quantizes up to 16 values that share one scale factor with global scale `global_scale`:
/// `SF = e4m3(g * amax / 6)`, `q = e2m1(x * g / SF)`. Codes past `values.len()` are 0. A block
/// whose scale factor rounds to zero encodes every element as a (signed) zero.
pub fn quantize_nvfp4_block(values: &[f32], global_scale: f32) -> Nvfp4Block {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale_factor = f32_to_e4m3(global_scale * amax / E2M1_MAX);
    let sf = e4m3_to_f32(scale_factor);
    let mut codes = [0u8; NVFP4_BLOCK_ELEMS];
    for (code, &x) in codes.iter_mut().zip(values) {
        *code = if sf == 0.0 {
            f32_to_e2m1(x * 0.0)
        } else {
            f32_to_e2m1(x * global_scale / sf)
        };
    }
    Nvfp4Block {
        scale_factor,
        codes,
    }
}

/// A row-major `[rows, cols]` tensor quantized to NVFP4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nvfp4Tensor {
    /// `[rows, ceil(cols/2)]` bytes; element `2k` of a row in the low nibble of byte `k`.
    pub packed: Vec<u8>,
    /// e4m3 scale factors, one per 16 elements of a row, in the 128x4 swizzled layout of shape
    /// [`nvfp4_sf_shape`]`(rows, ceil(cols/16))`; padding is zero.
    pub scales_swizzled: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Nvfp4Tensor {
    /// Scale-factor columns (16-element blocks per row).
    pub fn sf_cols(&self) -> usize {
        self.cols.div_ceil(NVFP4_BLOCK_ELEMS)
    }

    /// Packed bytes per row.
    pub fn packed_row_bytes(&self) -> usize {
        self.cols.div_ceil(2)
    }

    /// The e2m1 code of element (`row`, `col`).
    pub fn code(&self, row: usize, col: usize) -> u8 {
        let byte = self.packed[row * self.packed_row_bytes() + col / 2];
        if col.is_multiple_of(2) {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }

    /// The scale-factor byte of the block holding element (`row`, `col`).
    pub fn scale_factor(&self, row: usize, col: usize) -> u8 {
        self.scales_swizzled[nvfp4_sf_offset(row, col / NVFP4_BLOCK_ELEMS, self.sf_cols())]
    }
}

/// Quantizes a row-major `[rows, cols]` tensor to NVFP4 with global scale `global_scale`. A row
/// whose length is not a multiple of 16 ends in a shorter block. `x.len()` must be `rows * cols`.
pub fn quantize_nvfp4(x: &[f32], rows: usize, cols: usize, global_scale: f32) -> Nvfp4Tensor {
    let sf_cols = cols.div_ceil(NVFP4_BLOCK_ELEMS);
    let (sf_rows_padded, sf_cols_padded) = nvfp4_sf_shape(rows, sf_cols);
    let row_bytes = cols.div_ceil(2);
    let mut packed = vec![0u8; rows * row_bytes];
    let mut scales_swizzled = vec![0u8; sf_rows_padded * sf_cols_padded];
    for (row, values) in x.chunks(cols.max(1)).take(rows).enumerate() {
        let packed_row = &mut packed[row * row_bytes..(row + 1) * row_bytes];
        for (block_index, block_values) in values.chunks(NVFP4_BLOCK_ELEMS).enumerate() {
            let block = quantize_nvfp4_block(block_values, global_scale);
            scales_swizzled[nvfp4_sf_offset(row, block_index, sf_cols)] = block.scale_factor;
            let first = block_index * NVFP4_BLOCK_ELEMS;
            for (i, &code) in block.codes[..block_values.len()].iter().enumerate() {
                let col = first + i;
                packed_row[col / 2] |= if col.is_multiple_of(2) {
                    code
                } else {
                    code << 4
                };
            }
        }
    }
    Nvfp4Tensor {
        packed,
        scales_swizzled,
        rows,
        cols,
    }
}

/// Decodes an NVFP4 tensor back to row-major f32: `e2m1(q) * SF / g`.
pub fn dequantize_nvfp4(t: &Nvfp4Tensor, global_scale: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(t.rows * t.cols);
    for row in 0..t.rows {
        for col in 0..t.cols {
            let sf = e4m3_to_f32(t.scale_factor(row, col));
            out.push(e2m1_to_f32(t.code(row, col)) * sf / global_scale);
        }
    }
    out
}

/// One quantization step of e4m3 at magnitude `|x|` (the distance between the two representable
/// values around it; `2^-9` in the subnormal range).
pub fn e4m3_step(x: f32) -> f32 {
    let a = x.abs().min(E4M3_MAX);
    if a < pow2(-6) {
        return pow2(-9);
    }
    let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
    pow2(exp - 3)
}

/// One quantization step of e2m1 at magnitude `|x|` (0.5 below 2, 1 below 4, 2 above).
pub fn e2m1_step(x: f32) -> f32 {
    let a = x.abs();
    if a < 2.0 {
        0.5
    } else if a < 4.0 {
        1.0
    } else {
        2.0
    }
}

/// One bf16 unit in the last place at magnitude `|x|` (bf16 keeps 8 significant bits).
pub fn bf16_ulp(x: f32) -> f32 {
    let a = x.abs();
    // bf16 shares f32's exponent range; below the smallest normal the step is fixed.
    let min_normal_exp = -126;
    let exp = if a == 0.0 || !a.is_finite() {
        min_normal_exp
    } else {
        (((a.to_bits() >> 23) & 0xff) as i32 - 127).max(min_normal_exp)
    };
    2f32.powi(exp - 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_codes() {
        assert_eq!(f32_to_e4m3(1.0), 0x38);
        assert_eq!(f32_to_e4m3(448.0), 0x7e);
        assert_eq!(f32_to_e4m3(1e9), 0x7e);
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7e);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xfe);
        assert_eq!(f32_to_e4m3(f32::NAN), E4M3_NAN);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        // 2^-10 is exactly half the smallest subnormal: ties to even (zero).
        assert_eq!(f32_to_e4m3(pow2(-10)), 0x00);
        assert_eq!(f32_to_e4m3(3.0 * pow2(-10)), 0x02);
        assert!(e4m3_to_f32(0x7f).is_nan());
        assert!(e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_to_f32(0x01), pow2(-9));
        assert_eq!(e4m3_to_f32(0x08), pow2(-6));
    }

    #[test]
    fn e4m3_table_matches_decoder() {
        for b in 0..=255u8 {
            let (t, d) = (E4M3_TABLE[b as usize], e4m3_to_f32(b));
            assert!(t.to_bits() == d.to_bits() || (t.is_nan() && d.is_nan()));
        }
    }

    #[test]
    fn e2m1_ties_go_to_even_codes() {
        assert_eq!(f32_to_e2m1(0.25), 0);
        assert_eq!(f32_to_e2m1(0.75), 2);
        assert_eq!(f32_to_e2m1(1.25), 2);
        assert_eq!(f32_to_e2m1(1.75), 4);
        assert_eq!(f32_to_e2m1(2.5), 4);
        assert_eq!(f32_to_e2m1(3.5), 6);
        assert_eq!(f32_to_e2m1(5.0), 6);
        assert_eq!(f32_to_e2m1(-100.0), 0x0f);
        assert_eq!(f32_to_e2m1(-0.1), 0x08);
    }

    #[test]
    fn steps_and_ulps() {
        assert_eq!(e4m3_step(1.0), 0.125);
        assert_eq!(e4m3_step(300.0), 32.0);
        assert_eq!(e4m3_step(0.001), pow2(-9));
        assert_eq!(bf16_ulp(1.0), 1.0 / 128.0);
        assert_eq!(bf16_ulp(-3.0), 2.0 / 128.0);
        assert_eq!(e2m1_step(5.0), 2.0);
    }
}
