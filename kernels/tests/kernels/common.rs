//! Shared test fixtures: the golden-case loader, small benchmark cases, and a naive dense
//! formulation of attention to cross-check the paged reference.

use decodebench_kernels::workload::{BenchCase, Dtype, KvLayout, KvPool, MeasureMethod, QuantMode};
use decodebench_kernels::{HostInputs, HostTensor, Scales};
use half::bf16;
use safetensors::SafeTensors;
use std::path::PathBuf;

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One golden decode case: its parameters as a `BenchCase`, its inputs, and what it must produce.
pub struct GoldenCase {
    pub name: String,
    pub case: BenchCase,
    pub inputs: HostInputs,
    pub expected_f64: Vec<f64>,
    pub expected_bf16: Option<Vec<bf16>>,
    pub expected_fp8: Option<Vec<u8>>,
    pub expected_nvfp4_packed: Option<Vec<u8>>,
    pub expected_nvfp4_scales: Option<Vec<u8>>,
}

fn tensor_bytes(st: &SafeTensors<'_>, name: &str) -> Option<Vec<u8>> {
    st.tensor(name).ok().map(|t| t.data().to_vec())
}

fn le_chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes
        .chunks_exact(N)
        .map(|c| c.try_into().expect("chunk of N bytes"))
}

fn bf16s(bytes: &[u8]) -> Vec<bf16> {
    le_chunks::<2>(bytes)
        .map(|c| bf16::from_bits(u16::from_le_bytes(c)))
        .collect()
}

fn dtype_of(value: &serde_json::Value, key: &str) -> Dtype {
    Dtype::parse(value[key].as_str().expect("dtype string")).expect("known dtype")
}

/// Loads every case listed in `decode_cases.json` from the fixtures.
pub fn load_golden_cases() -> Vec<GoldenCase> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&read_fixture("decode_cases.json")).expect("manifest json");
    let cases = manifest["cases"].as_array().expect("cases array");
    cases.iter().map(load_golden_case).collect()
}

fn load_golden_case(m: &serde_json::Value) -> GoldenCase {
    let num = |key: &str| m[key].as_u64().unwrap_or_else(|| panic!("{key}")) as u32;
    let float = |key: &str| m[key].as_f64();
    let name = m["name"].as_str().expect("name").to_string();
    let quant = QuantMode::new(
        dtype_of(m, "q_dtype"),
        dtype_of(m, "kv_dtype"),
        dtype_of(m, "out_dtype"),
    );
    let block_size = num("block_size");
    let pool_pages = num("pool_pages");
    let case = BenchCase {
        id: String::new(),
        batch_size: num("batch"),
        max_seq_len: num("max_seq_len"),
        quant,
        num_qo_heads: num("num_qo_heads"),
        num_kv_heads: num("num_kv_heads"),
        head_size: num("head_size"),
        layout: KvLayout::parse(m["kv_layout"].as_str().expect("layout")).expect("layout"),
        block_size,
        pool: KvPool::Shared {
            tokens: pool_pages * block_size,
        },
        seed: 0,
        method: MeasureMethod::default(),
    }
    .with_id();
    let mut scales = Scales::for_case(&case);
    scales.q_scale = float("q_scale").expect("q_scale") as f32;
    scales.k_scale = float("k_scale").expect("k_scale") as f32;
    scales.v_scale = float("v_scale").expect("v_scale") as f32;
    scales.sm_scale = float("sm_scale").expect("sm_scale") as f32;
    scales.o_scale = float("o_scale").unwrap_or(1.0) as f32;
    if let Some(g) = float("o_sf_scale") {
        scales.o_sf_scale = g as f32;
    }

    let file = read_fixture(m["file"].as_str().expect("file"));
    let st = SafeTensors::deserialize(&file).expect("safetensors");
    let bytes = |name: &str| tensor_bytes(&st, name).unwrap_or_else(|| panic!("{name} missing"));
    let storage = |name: &str, dtype: Dtype| match dtype {
        Dtype::Bf16 => HostTensor::Bf16(bf16s(&bytes(name))),
        _ => HostTensor::Fp8(bytes(name)),
    };
    let seq_lens: Vec<u32> = le_chunks::<4>(&bytes("seq_lens"))
        .map(|c| i32::from_le_bytes(c) as u32)
        .collect();
    let manifest_lens: Vec<u32> = m["seq_lens"]
        .as_array()
        .expect("seq_lens")
        .iter()
        .map(|v| v.as_u64().expect("len") as u32)
        .collect();
    assert_eq!(
        seq_lens, manifest_lens,
        "{name}: manifest and file disagree"
    );
    let block_tables: Vec<i32> = le_chunks::<4>(&bytes("block_tables"))
        .map(i32::from_le_bytes)
        .collect();
    let inputs = HostInputs {
        block_table_width: block_tables.len() / seq_lens.len(),
        seq_lens,
        block_tables,
        scales,
        q: storage("q", quant.q),
        kv_cache: storage("kv_cache", quant.kv),
        num_pages: pool_pages as usize,
    };
    inputs
        .check_matches(&case)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    GoldenCase {
        expected_f64: le_chunks::<8>(&bytes("expected_out_f64"))
            .map(f64::from_le_bytes)
            .collect(),
        expected_bf16: tensor_bytes(&st, "expected_out_bf16").map(|b| bf16s(&b)),
        expected_fp8: tensor_bytes(&st, "expected_out_fp8"),
        expected_nvfp4_packed: tensor_bytes(&st, "expected_out_nvfp4_packed"),
        expected_nvfp4_scales: tensor_bytes(&st, "expected_out_nvfp4_scales_swizzled"),
        name,
        case,
        inputs,
    }
}

/// A small case: 8 query heads over `kv_heads`, head size `head`, block 16, a small shared pool.
pub fn small_case(quant: QuantMode, batch: u32, seq: u32, kv_heads: u32, head: u32) -> BenchCase {
    BenchCase {
        id: String::new(),
        batch_size: batch,
        max_seq_len: seq,
        quant,
        num_qo_heads: 8,
        num_kv_heads: kv_heads,
        head_size: head,
        layout: KvLayout::Hnd,
        block_size: 16,
        pool: KvPool::Shared { tokens: 4096 },
        seed: 7,
        method: MeasureMethod {
            warmup: 1,
            trials: 3,
            ..MeasureMethod::default()
        },
    }
    .with_id()
}

/// Attention written the textbook way: gather each sequence's K and V into dense `[t, d]` arrays
/// (dequantized, in f64), then `softmax(q K^T * sm_scale) V` with explicit weights.
pub fn attention_dense(case: &BenchCase, inputs: &HostInputs) -> Vec<f64> {
    let (qo, kvh, d) = (
        case.num_qo_heads as usize,
        case.num_kv_heads as usize,
        case.head_size as usize,
    );
    let block = case.block_size as usize;
    let group = qo / kvh;
    let s = &inputs.scales;
    // Dequantized in f64 (`HostTensor::dequantize` works in f32) so the two formulations differ
    // only in summation order.
    let dequantize = |t: &HostTensor, scale: f32| -> Vec<f64> {
        (0..t.len())
            .map(|i| t.raw(i) as f64 * scale as f64)
            .collect()
    };
    let q = dequantize(&inputs.q, s.q_scale);
    let k_pool = dequantize(&inputs.kv_cache, s.k_scale);
    let v_pool = dequantize(&inputs.kv_cache, s.v_scale);
    let mut out = Vec::new();
    for (b, &len) in inputs.seq_lens.iter().enumerate() {
        let len = len as usize;
        for h in 0..qo {
            let kv_head = h / group;
            let mut keys = vec![vec![0.0f64; d]; len];
            let mut values = vec![vec![0.0f64; d]; len];
            for t in 0..len {
                let page = inputs.block_tables[b * inputs.block_table_width + t / block] as usize;
                for dim in 0..d {
                    let at = |kv| {
                        case.layout
                            .offset(page, kv, kv_head, t % block, dim, kvh, block, d)
                    };
                    keys[t][dim] = k_pool[at(0)];
                    values[t][dim] = v_pool[at(1)];
                }
            }
            let qv = &q[(b * qo + h) * d..][..d];
            let scores: Vec<f64> = keys
                .iter()
                .map(|k| k.iter().zip(qv).map(|(a, b)| a * b).sum::<f64>() * s.sm_scale as f64)
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            for dim in 0..d {
                out.push(
                    exps.iter()
                        .zip(&values)
                        .map(|(w, v)| w / total * v[dim])
                        .sum(),
                );
            }
        }
    }
    out
}

/// Largest `|a - b| / max(|b|, floor)` over two equally long slices.
pub fn max_rel_diff(a: &[f64], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f64::max)
}
