//! The benchmark grid: a TOML file (or a built-in preset) naming the values of every workload axis,
//! validated up front and expanded into the [`BenchCase`]s the scheduler hands out.
//!
//! Validation happens here, once, before any GPU is touched: a grid that would fail on the fleet
//! an hour in (a head size no kernel supports, a KV pool larger than any GPU) is refused at load
//! time with a message naming the key, the value and what to do about it.
//!
//! Expansion order is deterministic and follows the reference script's loops (quant mode, then
//! max_seq_len, then batch size innermost), with the extra axes of this project in between; a grid
//! may put the quant mode innermost instead (`order = "modes-adjacent"`, [`CaseOrder`]).

use decodebench_kernels::workload::REFERENCE_POOL_TOKENS;
use decodebench_kernels::{
    BenchCase, Dtype, KernelSelection, KvLayout, KvPool, L2Mode, MeasureMethod, QuantMode,
    TimingMode,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Head sizes the kernels are built for (the CUDA kernels are templated on these).
pub const SUPPORTED_HEAD_SIZES: [u32; 3] = [64, 128, 256];

/// Largest page size accepted: the kernels stage one page per warp pass and the reference
/// script's family of kernels supports at most 128-token pages.
pub const MAX_BLOCK_SIZE_TOKENS: u32 = 128;

/// A case whose KV pool exceeds this cannot fit next to its inputs on any GPU of the fleet
/// (80 GB H100, 141 GB H200 with the baseline's dequantized copy); refuse it at load time instead
/// of reporting `oom` for it on every GPU.
pub const MAX_KV_POOL_BYTES: u64 = 64 << 30;

/// Larger batches are not decode workloads any serving system runs; the limit also keeps the
/// block-table and query buffers far from 32-bit index overflow.
pub const MAX_BATCH_SIZE: u32 = 1 << 16;

/// Longest sequence accepted (16 Mi tokens, beyond any model's context); keeps token counts well
/// inside the kernels' 32-bit arithmetic.
pub const MAX_SEQ_LEN_TOKENS: u32 = 1 << 24;

/// Per-trial samples are stored in every result row; more than this is a typo, not a benchmark.
pub const MAX_TRIALS: u32 = 100_000;

/// Warm-up calls beyond this only burn GPU time.
pub const MAX_WARMUP: u32 = 100_000;

/// Each throttle retry waits for a cool-down; more than this means the GPU should be fixed first.
pub const MAX_THROTTLE_RETRIES: u32 = 10;

/// A grid this large would take weeks on a fleet; it is almost certainly a mistake.
pub const MAX_CASES: usize = 1_000_000;

/// The seed the reference script uses (`torch.manual_seed(0)`).
pub const DEFAULT_SEED: u64 = 0;

/// Built-in grids, embedded so the binary needs no files next to it.
const PRESETS: [(&str, &str); 2] = [
    ("seed", include_str!("../presets/seed.toml")),
    ("smoke", include_str!("../presets/smoke.toml")),
];

/// Keys accepted at the top level of a grid file.
const TOP_LEVEL_KEYS: [&str; 15] = [
    "name",
    "description",
    "batch_sizes",
    "max_seq_lens",
    "quant_modes",
    "heads",
    "head_sizes",
    "layouts",
    "block_sizes",
    "pools",
    "pool_tokens",
    "seed",
    "order",
    "method",
    // Accepted so a grid can carry free-form notes without tripping the unknown-key check.
    "notes",
];

/// Keys accepted in the `[method]` table.
const METHOD_KEYS: [&str; 10] = [
    "warmup",
    "trials",
    "l2",
    "timing",
    "graph_launches",
    "target_rse",
    "max_trials",
    "max_time_s",
    "throttle_retries",
    "kernels",
];

/// Why a grid was refused. Every message names the offending key and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error("grid: TOML error at line {line}, column {column}: {message}")]
    Parse {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("grid: unknown key `{key}`{suggestion}")]
    UnknownKey { key: String, suggestion: String },
    #[error("grid: missing key `{key}`: {hint}")]
    MissingKey { key: String, hint: String },
    #[error("{key} is empty: {hint}")]
    EmptyAxis { key: String, hint: String },
    #[error("{key} = {value}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("{key} = {value}: duplicate of {first}; list each value once")]
    DuplicateValue {
        key: String,
        value: String,
        first: String,
    },
    #[error(
        "grid: case `{label}` needs a KV pool of {pool} (up to), more than the {limit} limit; \
         lower batch_sizes/max_seq_lens for this case, use a smaller shared pool_tokens, or split \
         the grid"
    )]
    CaseTooLarge {
        label: String,
        pool: String,
        limit: String,
    },
    #[error(
        "grid: expands to {cases} cases, more than the {limit} limit; shrink some axes or split \
         the grid into several runs"
    )]
    TooManyCases { cases: usize, limit: usize },
    #[error(
        "grid: cases `{first}` and `{second}` have the same id {id}; change the seed to \
         separate them"
    )]
    DuplicateCaseId {
        id: String,
        first: String,
        second: String,
    },
    #[error("grid: unknown preset `{name}`; known presets: {known}")]
    UnknownPreset { name: String, known: String },
    // The inner error is printed in the message and deliberately not exposed as `source`:
    // anyhow's `{:#}` would print it a second time.
    #[error("cannot read grid file {}: {error}; {}", path.display(), read_hint(error))]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    InFile {
        path: PathBuf,
        error: Box<GridError>,
    },
}

/// What to do about a grid file that cannot be read as text.
fn read_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::InvalidData => {
            "a grid file is UTF-8 TOML text (see `decodebench grid --preset smoke --print-toml`)"
        }
        std::io::ErrorKind::PermissionDenied => "make it readable by this user",
        _ => "check the path",
    }
}

/// A validated grid. Fields are private so that every `Grid` has passed validation; read them
/// through the accessors.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    name: String,
    description: String,
    batch_sizes: Vec<u32>,
    max_seq_lens: Vec<u32>,
    quant_modes: Vec<QuantMode>,
    heads: Vec<(u32, u32)>,
    head_sizes: Vec<u32>,
    layouts: Vec<KvLayout>,
    block_sizes: Vec<u32>,
    pools: Vec<KvPool>,
    seed: u64,
    order: CaseOrder,
    method: MeasureMethod,
}

/// The order in which a grid's cases are handed out (the `order` key). Agents run a shard's cases
/// in this order, and the scheduler keeps it within each KV pool set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaseOrder {
    /// `"script"`: the reference script's nesting, quant mode outermost, then the other axes, and
    /// max_seq_len and batch size innermost. The default.
    #[default]
    Script,
    /// `"modes-adjacent"`: quant mode innermost, so that one cell's modes run back to back. Use it
    /// when modes are compared with each other (FP8 query against FP8 KV, say): under the script's
    /// order a mode's cells run minutes after the other's, on a GPU whose clocks and temperature
    /// have moved in between (a power-capped GPU slows down as it heats up).
    ModesAdjacent,
}

impl CaseOrder {
    fn parse(s: &str) -> Option<CaseOrder> {
        match s {
            "script" => Some(CaseOrder::Script),
            "modes-adjacent" => Some(CaseOrder::ModesAdjacent),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            CaseOrder::Script => "script",
            CaseOrder::ModesAdjacent => "modes-adjacent",
        }
    }
}

/// The grid file as written, before validation. Numbers are read as `i64` so that a negative or
/// zero value gets our message (naming the key) rather than a bare type error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    name: Option<String>,
    description: Option<String>,
    batch_sizes: Option<Vec<i64>>,
    max_seq_lens: Option<Vec<i64>>,
    quant_modes: Option<Vec<toml::Value>>,
    heads: Option<Vec<Vec<i64>>>,
    head_sizes: Option<Vec<i64>>,
    layouts: Option<Vec<String>>,
    block_sizes: Option<Vec<i64>>,
    pools: Option<Vec<String>>,
    pool_tokens: Option<i64>,
    seed: Option<i64>,
    order: Option<String>,
    method: Option<MethodFile>,
    #[allow(dead_code)]
    notes: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MethodFile {
    warmup: Option<i64>,
    trials: Option<i64>,
    l2: Option<String>,
    timing: Option<String>,
    graph_launches: Option<i64>,
    target_rse: Option<f64>,
    max_trials: Option<i64>,
    max_time_s: Option<f64>,
    throttle_retries: Option<i64>,
    kernels: Option<String>,
}

/// One combination of every axis but the quant mode.
struct Cell {
    heads: (u32, u32),
    head_size: u32,
    layout: KvLayout,
    block_size: u32,
    pool: KvPool,
    max_seq_len: u32,
    batch_size: u32,
}

impl Grid {
    /// Parses and validates a grid from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Grid, GridError> {
        // Parse to a generic table first: syntax errors get a position, and unknown keys get a
        // "did you mean" before serde's less helpful message.
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_error(text, &e))?;
        check_known_keys(&table)?;
        let file: GridFile = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        let grid = Grid::from_file_contents(file)?;
        grid.check_cases()?;
        Ok(grid)
    }

    /// Reads, parses and validates a grid file.
    pub fn from_file(path: &Path) -> Result<Grid, GridError> {
        let text = std::fs::read_to_string(path).map_err(|error| GridError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Grid::from_toml_str(&text).map_err(|e| GridError::InFile {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    /// A built-in grid by name (see [`Grid::preset_names`]).
    pub fn preset(name: &str) -> Result<Grid, GridError> {
        let text = PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| *text)
            .ok_or_else(|| GridError::UnknownPreset {
                name: name.to_string(),
                known: Grid::preset_names().join(", "),
            })?;
        Grid::from_toml_str(text)
    }

    /// Names of the built-in grids.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|(n, _)| *n).collect()
    }

    /// The TOML text of a built-in grid, to start a custom grid from.
    pub fn preset_toml(name: &str) -> Option<&'static str> {
        PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    pub fn batch_sizes(&self) -> &[u32] {
        &self.batch_sizes
    }
    pub fn max_seq_lens(&self) -> &[u32] {
        &self.max_seq_lens
    }
    pub fn quant_modes(&self) -> &[QuantMode] {
        &self.quant_modes
    }
    /// `(qo_heads, kv_heads)` pairs.
    pub fn heads(&self) -> &[(u32, u32)] {
        &self.heads
    }
    pub fn head_sizes(&self) -> &[u32] {
        &self.head_sizes
    }
    pub fn layouts(&self) -> &[KvLayout] {
        &self.layouts
    }
    pub fn block_sizes(&self) -> &[u32] {
        &self.block_sizes
    }
    pub fn pools(&self) -> &[KvPool] {
        &self.pools
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    pub fn method(&self) -> &MeasureMethod {
        &self.method
    }
    pub fn order(&self) -> CaseOrder {
        self.order
    }

    /// Number of cases [`Grid::expand`] yields.
    pub fn case_count(&self) -> usize {
        self.batch_sizes.len()
            * self.max_seq_lens.len()
            * self.quant_modes.len()
            * self.heads.len()
            * self.head_sizes.len()
            * self.layouts.len()
            * self.block_sizes.len()
            * self.pools.len()
    }

    /// Every case of the grid, each with its id, in a deterministic order: heads, head size,
    /// layout, block size, pool, max_seq_len, and batch size innermost (the reference script's
    /// max_seq_len / batch nesting), with the quant mode outermost ([`CaseOrder::Script`], the
    /// script's nesting) or innermost ([`CaseOrder::ModesAdjacent`]). Ids are unique: validation refused
    /// any grid where two cases would share one, and duplicates are dropped here regardless.
    pub fn expand(&self) -> Vec<BenchCase> {
        let mut cases = Vec::with_capacity(self.case_count());
        let mut seen = HashSet::with_capacity(self.case_count());
        for case in self.cases_in_order() {
            if seen.insert(case.id.clone()) {
                cases.push(case);
            }
        }
        cases
    }

    fn cases_in_order(&self) -> impl Iterator<Item = BenchCase> + '_ {
        // Every combination of the axes other than the quant mode, in the script's nesting (batch
        // size innermost); the order puts the quant mode outside or inside them.
        let cells: Vec<Cell> = self
            .heads
            .iter()
            .flat_map(|&heads| {
                self.head_sizes.iter().flat_map(move |&head_size| {
                    self.layouts.iter().flat_map(move |&layout| {
                        self.block_sizes.iter().flat_map(move |&block_size| {
                            self.pools.iter().flat_map(move |&pool| {
                                self.max_seq_lens.iter().flat_map(move |&max_seq_len| {
                                    self.batch_sizes.iter().map(move |&batch_size| Cell {
                                        heads,
                                        head_size,
                                        layout,
                                        block_size,
                                        pool,
                                        max_seq_len,
                                        batch_size,
                                    })
                                })
                            })
                        })
                    })
                })
            })
            .collect();
        let (modes, n_cells) = (self.quant_modes.len(), cells.len());
        (0..modes * n_cells).map(move |i| {
            let (quant, cell) = match self.order {
                CaseOrder::Script => (self.quant_modes[i / n_cells], &cells[i % n_cells]),
                CaseOrder::ModesAdjacent => (self.quant_modes[i % modes], &cells[i / modes]),
            };
            BenchCase {
                id: String::new(),
                batch_size: cell.batch_size,
                max_seq_len: cell.max_seq_len,
                quant,
                num_qo_heads: cell.heads.0,
                num_kv_heads: cell.heads.1,
                head_size: cell.head_size,
                layout: cell.layout,
                block_size: cell.block_size,
                pool: cell.pool,
                seed: self.seed,
                method: self.method.clone(),
            }
            .with_id()
        })
    }

    /// A hash of the set of cases (their canonical parameters, order-independent): two grid files
    /// that expand to the same cases have the same hash whatever their names or key order. The
    /// journal records it so a restarted coordinator resumes only the same grid.
    pub fn grid_hash(&self) -> String {
        let params: BTreeSet<String> = self.expand().iter().map(|c| c.canonical_params()).collect();
        let mut h = Sha256::new();
        h.update(b"decodebench-grid-v1\n");
        for p in &params {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        hex::encode(&h.finalize()[..16])
    }

    /// A human summary: case count, every axis, the method, KV pool set-ups and the estimated KV
    /// traffic.
    pub fn summary(&self) -> String {
        let cases = self.expand();
        let mut out = String::new();
        let title = if self.description.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.description)
        };
        let _ = writeln!(out, "grid `{}`{title}: {} cases", self.name, cases.len());
        let axis = |out: &mut String, name: &str, values: Vec<String>| {
            let _ = writeln!(out, "  {name:<16} {} ({})", values.join(", "), values.len());
        };
        axis(&mut out, "batch_sizes", to_strings(&self.batch_sizes));
        axis(&mut out, "max_seq_lens", to_strings(&self.max_seq_lens));
        axis(&mut out, "quant_modes", to_strings(&self.quant_modes));
        axis(
            &mut out,
            "heads (qo/kv)",
            self.heads.iter().map(|(q, k)| format!("{q}/{k}")).collect(),
        );
        axis(&mut out, "head_sizes", to_strings(&self.head_sizes));
        axis(&mut out, "layouts", to_strings(&self.layouts));
        axis(&mut out, "block_sizes", to_strings(&self.block_sizes));
        axis(
            &mut out,
            "pools",
            self.pools.iter().map(|p| p.label()).collect(),
        );
        let _ = writeln!(out, "  {:<16} {}", "seed", self.seed);
        let _ = writeln!(out, "  {:<16} {}", "order", self.order.as_str());
        let _ = writeln!(out, "  {:<16} {}", "method", describe_method(&self.method));

        let pool_setups: HashSet<String> = cases.iter().map(|c| c.pool_key()).collect();
        let _ = writeln!(
            out,
            "  {:<16} {} (cases sharing one KV pool set-up run together)",
            "pool set-ups",
            pool_setups.len()
        );
        if let Some((bytes, case)) = cases
            .iter()
            .map(|c| (kv_pool_bytes_upper_bound(c), c))
            .max_by_key(|(b, _)| *b)
        {
            let _ = writeln!(
                out,
                "  {:<16} {} at most, every sequence at max_seq_len ({})",
                "largest KV pool",
                format_bytes(bytes),
                case.label()
            );
        }
        let per_call: f64 = cases.iter().map(expected_kv_bytes_per_call).sum();
        let calls_per_case = 2.0 * f64::from(self.method.warmup + self.method.trials);
        let _ = writeln!(
            out,
            "  {:<16} {} per call summed over all cases; about {} over a run \
             (2 kernels x {} warm-up + {} trials{})",
            "est. KV read",
            format_bytes(per_call as u64),
            format_bytes((per_call * calls_per_case) as u64),
            self.method.warmup,
            self.method.trials,
            if self.method.target_rse.is_some() {
                ", at least"
            } else {
                ""
            }
        );
        out
    }

    fn from_file_contents(file: GridFile) -> Result<Grid, GridError> {
        let batch_sizes = positive_axis(
            "batch_sizes",
            required(
                file.batch_sizes,
                "batch_sizes",
                "list the batch sizes to sweep, e.g. batch_sizes = [1, 4, 8]",
            )?,
            "batch size",
            MAX_BATCH_SIZE,
        )?;
        let max_seq_lens = positive_axis(
            "max_seq_lens",
            required(
                file.max_seq_lens,
                "max_seq_lens",
                "list the maximum sequence lengths to sweep, e.g. max_seq_lens = [1024, 4096]",
            )?,
            "max_seq_len",
            MAX_SEQ_LEN_TOKENS,
        )?;

        let quant_modes = match file.quant_modes {
            Some(values) => parse_quant_modes(&values)?,
            None => QuantMode::REFERENCE.to_vec(),
        };
        let heads = match file.heads {
            Some(values) => parse_heads(&values)?,
            None => vec![(64, 8)],
        };
        let head_sizes = match file.head_sizes {
            Some(values) => parse_head_sizes(&values)?,
            None => vec![128],
        };
        let layouts = match file.layouts {
            Some(values) => parse_layouts(&values)?,
            None => vec![KvLayout::Hnd],
        };
        let block_sizes = match file.block_sizes {
            Some(values) => parse_block_sizes(&values)?,
            None => vec![16],
        };
        let pools = parse_pools(
            file.pools.as_deref(),
            file.pool_tokens,
            &max_seq_lens,
            &block_sizes,
        )?;
        let seed = match file.seed {
            None => DEFAULT_SEED,
            Some(s) => u64::try_from(s).map_err(|_| GridError::InvalidValue {
                key: "grid.seed".into(),
                value: s.to_string(),
                reason: "the seed must be >= 0".into(),
            })?,
        };
        let order = match file.order {
            None => CaseOrder::default(),
            Some(raw) => CaseOrder::parse(raw.trim()).ok_or_else(|| {
                invalid(
                    "grid.order".to_string(),
                    format!("{raw:?}"),
                    "unknown order; use \"script\" (quant mode outermost, the default) or \
                     \"modes-adjacent\" (each cell's quant modes back to back)",
                )
            })?,
        };
        let method = parse_method(file.method)?;
        let name = file.name.unwrap_or_else(|| "custom".to_string());
        if name.trim().is_empty() {
            return Err(GridError::InvalidValue {
                key: "grid.name".into(),
                value: format!("{name:?}"),
                reason: "the name must not be blank; remove it or give the grid a name".into(),
            });
        }
        Ok(Grid {
            name,
            description: file.description.unwrap_or_default(),
            batch_sizes,
            max_seq_lens,
            quant_modes,
            heads,
            head_sizes,
            layouts,
            block_sizes,
            pools,
            seed,
            order,
            method,
        })
    }

    /// Checks that need the expanded cases: size limits and id uniqueness.
    fn check_cases(&self) -> Result<(), GridError> {
        let count = self.case_count();
        if count > MAX_CASES {
            return Err(GridError::TooManyCases {
                cases: count,
                limit: MAX_CASES,
            });
        }
        let mut seen: std::collections::HashMap<String, String> =
            std::collections::HashMap::with_capacity(count);
        for case in self.cases_in_order() {
            let bytes = kv_pool_bytes_upper_bound(&case);
            if bytes > MAX_KV_POOL_BYTES {
                return Err(GridError::CaseTooLarge {
                    label: case.label(),
                    pool: format_bytes(bytes),
                    limit: format_bytes(MAX_KV_POOL_BYTES),
                });
            }
            if let Some(first) = seen.insert(case.id.clone(), case.label()) {
                return Err(GridError::DuplicateCaseId {
                    id: case.id.clone(),
                    first,
                    second: case.label(),
                });
            }
        }
        Ok(())
    }
}

/// Bytes of the KV pool a case allocates. For a unique pool the sequence lengths are drawn at run
/// time, so this is the bound with every sequence at `max_seq_len`.
pub fn kv_pool_bytes_upper_bound(case: &BenchCase) -> u64 {
    let block = u64::from(case.block_size.max(1));
    let pages = match case.pool {
        KvPool::Shared { tokens } => u64::from(tokens).div_ceil(block),
        KvPool::Unique => u64::from(case.batch_size) * u64::from(case.max_seq_len).div_ceil(block),
    };
    let page_bits = 2
        * u64::from(case.num_kv_heads)
        * block
        * u64::from(case.head_size)
        * u64::from(case.quant.kv.bits());
    pages * page_bits / 8
}

/// K and V bytes one call reads on average: sequence lengths are uniform in `[1, max_seq_len)`
/// with the last one at `max_seq_len`.
fn expected_kv_bytes_per_call(case: &BenchCase) -> f64 {
    let max = f64::from(case.max_seq_len);
    let tokens = f64::from(case.batch_size.saturating_sub(1)) * max / 2.0 + max;
    tokens
        * f64::from(case.num_kv_heads)
        * f64::from(case.head_size)
        * 2.0
        * f64::from(case.quant.kv.bits())
        / 8.0
}

fn describe_method(m: &MeasureMethod) -> String {
    let mut s = format!(
        "warmup {}, trials {}, L2 {}, timing {}",
        m.warmup,
        m.trials,
        m.l2.as_str(),
        m.timing.as_str()
    );
    if m.timing == TimingMode::Graph {
        let _ = write!(s, " ({} launches per graph)", m.graph_launches);
    }
    if let Some(rse) = m.target_rse {
        let _ = write!(
            s,
            ", until RSE < {rse} (at most {} trials / {} s)",
            m.max_trials, m.max_time_s
        );
    }
    let _ = write!(s, ", throttle retries {}", m.throttle_retries);
    if m.kernels != KernelSelection::Both {
        let _ = write!(s, ", kernels: {} only", m.kernels.as_str());
    }
    s
}

/// Bytes in binary units with two decimals, e.g. "1.50 GiB".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

fn to_strings<T: std::fmt::Display>(values: &[T]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

fn parse_error(text: &str, err: &toml::de::Error) -> GridError {
    let (line, column) = match err.span() {
        Some(span) => line_column(text, span.start),
        None => (0, 0),
    };
    // A type error ("invalid type: string, expected a sequence") does not name its key; the
    // offending line does.
    let mut message = err.message().trim().to_string();
    if let Some(src) = line
        .checked_sub(1)
        .and_then(|i| text.lines().nth(i))
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        message = format!("{message} (in `{src}`)");
    }
    GridError::Parse {
        line,
        column,
        message,
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn check_known_keys(table: &toml::Table) -> Result<(), GridError> {
    for key in table.keys() {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            return Err(unknown_key(key, "", &TOP_LEVEL_KEYS));
        }
    }
    if let Some(toml::Value::Table(method)) = table.get("method") {
        for key in method.keys() {
            if !METHOD_KEYS.contains(&key.as_str()) {
                return Err(unknown_key(key, "method.", &METHOD_KEYS));
            }
        }
    }
    Ok(())
}

fn unknown_key(key: &str, prefix: &str, known: &[&str]) -> GridError {
    let best = known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .min_by_key(|(d, _)| *d);
    let suggestion = match best {
        Some((d, k)) if d <= 3 || k.starts_with(key) || key.starts_with(k) => {
            format!(" (did you mean `{prefix}{k}`?)")
        }
        _ => format!("; known keys: {}", known.join(", ")),
    };
    GridError::UnknownKey {
        key: format!("{prefix}{key}"),
        suggestion,
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn required<T>(value: Option<T>, key: &str, hint: &str) -> Result<T, GridError> {
    value.ok_or_else(|| GridError::MissingKey {
        key: key.to_string(),
        hint: hint.to_string(),
    })
}

fn non_empty<T>(key: &str, values: &[T], hint: &str) -> Result<(), GridError> {
    if values.is_empty() {
        return Err(GridError::EmptyAxis {
            key: format!("grid.{key}"),
            hint: hint.to_string(),
        });
    }
    Ok(())
}

/// Refuses the first value that repeats an earlier one (after parsing, so "bf16" and "bfloat16"
/// count as the same).
fn unique<T: PartialEq>(
    key: &str,
    values: &[T],
    show: impl Fn(usize) -> String,
) -> Result<(), GridError> {
    for (i, v) in values.iter().enumerate() {
        if let Some(first) = values[..i].iter().position(|w| w == v) {
            return Err(GridError::DuplicateValue {
                key: format!("grid.{key}[{i}]"),
                value: show(i),
                first: format!("grid.{key}[{first}]"),
            });
        }
    }
    Ok(())
}

fn invalid(key: String, value: impl ToString, reason: impl Into<String>) -> GridError {
    GridError::InvalidValue {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// An integer in `1..=max`, with a message naming `key` otherwise.
fn positive_u32(key: String, value: i64, what: &str, max: u32) -> Result<u32, GridError> {
    if value < 1 {
        return Err(invalid(key, value, format!("{what} must be >= 1")));
    }
    if value > i64::from(max) {
        return Err(invalid(key, value, format!("{what} must be <= {max}")));
    }
    // In range by the two checks above.
    Ok(value as u32)
}

fn positive_axis(key: &str, values: Vec<i64>, what: &str, max: u32) -> Result<Vec<u32>, GridError> {
    non_empty(key, &values, &format!("list at least one {what}"))?;
    let parsed = values
        .iter()
        .enumerate()
        .map(|(i, &v)| positive_u32(format!("grid.{key}[{i}]"), v, what, max))
        .collect::<Result<Vec<_>, _>>()?;
    unique(key, &parsed, |i| values[i].to_string())?;
    Ok(parsed)
}

fn parse_dtype(key: String, raw: &str) -> Result<Dtype, GridError> {
    Dtype::parse(raw.trim()).ok_or_else(|| {
        invalid(
            key,
            format!("{raw:?}"),
            "unknown dtype; use bf16, fp8 or nvfp4",
        )
    })
}

fn parse_quant_modes(values: &[toml::Value]) -> Result<Vec<QuantMode>, GridError> {
    non_empty(
        "quant_modes",
        values,
        "list at least one mode, e.g. quant_modes = [\"bf16/bf16/bf16\"]",
    )?;
    let mut modes = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let key = format!("grid.quant_modes[{i}]");
        let mode = match value {
            toml::Value::String(s) => {
                let parts: Vec<&str> = s.split('/').collect();
                if parts.len() != 3 {
                    return Err(invalid(
                        key,
                        format!("{s:?}"),
                        "expected \"q/kv/out\" dtypes, e.g. \"bf16/fp8/bf16\"",
                    ));
                }
                QuantMode::new(
                    parse_dtype(format!("{key} (q)"), parts[0])?,
                    parse_dtype(format!("{key} (kv)"), parts[1])?,
                    parse_dtype(format!("{key} (out)"), parts[2])?,
                )
            }
            toml::Value::Table(t) => {
                for k in t.keys() {
                    if !["q", "kv", "out"].contains(&k.as_str()) {
                        return Err(invalid(
                            key,
                            value,
                            format!("unknown field `{k}`; a mode table has q, kv and out"),
                        ));
                    }
                }
                let field = |name: &str| -> Result<Dtype, GridError> {
                    match t.get(name) {
                        Some(toml::Value::String(s)) => parse_dtype(format!("{key}.{name}"), s),
                        Some(other) => Err(invalid(
                            format!("{key}.{name}"),
                            other,
                            "expected a dtype string: bf16, fp8 or nvfp4",
                        )),
                        None => Err(invalid(
                            key.clone(),
                            value,
                            format!("missing `{name}`; write {{q = \"bf16\", kv = \"fp8\", out = \"bf16\"}}"),
                        )),
                    }
                };
                QuantMode::new(field("q")?, field("kv")?, field("out")?)
            }
            other => {
                return Err(invalid(
                    key,
                    other,
                    "expected a string \"q/kv/out\" or a table {q = ..., kv = ..., out = ...}",
                ))
            }
        };
        if let Some(reason) = mode.unsupported_reason() {
            return Err(invalid(
                key,
                value,
                format!("unsupported quant mode: {reason}"),
            ));
        }
        modes.push(mode);
    }
    unique("quant_modes", &modes, |i| values[i].to_string())?;
    Ok(modes)
}

fn parse_heads(values: &[Vec<i64>]) -> Result<Vec<(u32, u32)>, GridError> {
    non_empty(
        "heads",
        values,
        "list at least one [qo_heads, kv_heads] pair, e.g. heads = [[64, 8]]",
    )?;
    let show = |v: &[i64]| format!("{v:?}");
    let mut heads = Vec::with_capacity(values.len());
    for (i, pair) in values.iter().enumerate() {
        let key = format!("grid.heads[{i}]");
        let [qo, kv] = pair.as_slice() else {
            return Err(invalid(
                key,
                show(pair),
                "expected a pair [qo_heads, kv_heads], e.g. [64, 8]",
            ));
        };
        const MAX_HEADS: u32 = 1024;
        let qo = positive_u32(key.clone(), *qo, "qo_heads", MAX_HEADS).map_err(|_| {
            invalid(
                key.clone(),
                show(pair),
                format!("qo_heads must be in 1..={MAX_HEADS}"),
            )
        })?;
        let kv = positive_u32(key.clone(), *kv, "kv_heads", MAX_HEADS).map_err(|_| {
            invalid(
                key.clone(),
                show(pair),
                format!("kv_heads must be in 1..={MAX_HEADS}"),
            )
        })?;
        if qo % kv != 0 {
            return Err(invalid(
                key,
                show(pair),
                format!("qo_heads ({qo}) must be divisible by kv_heads ({kv})"),
            ));
        }
        heads.push((qo, kv));
    }
    unique("heads", &heads, |i| show(&values[i]))?;
    Ok(heads)
}

fn parse_head_sizes(values: &[i64]) -> Result<Vec<u32>, GridError> {
    non_empty(
        "head_sizes",
        values,
        "list at least one head size, e.g. head_sizes = [128]",
    )?;
    let supported = to_strings(&SUPPORTED_HEAD_SIZES).join(", ");
    let mut sizes = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        match SUPPORTED_HEAD_SIZES.iter().find(|&&s| i64::from(s) == v) {
            Some(&s) => sizes.push(s),
            None => {
                return Err(invalid(
                    format!("grid.head_sizes[{i}]"),
                    v,
                    format!("unsupported head size; supported: {supported}"),
                ))
            }
        }
    }
    unique("head_sizes", &sizes, |i| values[i].to_string())?;
    Ok(sizes)
}

fn parse_layouts(values: &[String]) -> Result<Vec<KvLayout>, GridError> {
    non_empty(
        "layouts",
        values,
        "list at least one layout, e.g. layouts = [\"HND\"]",
    )?;
    let layouts = values
        .iter()
        .enumerate()
        .map(|(i, s)| {
            KvLayout::parse(s.trim()).ok_or_else(|| {
                invalid(
                    format!("grid.layouts[{i}]"),
                    format!("{s:?}"),
                    "unknown layout; use \"HND\" or \"NHD\"",
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    unique("layouts", &layouts, |i| format!("{:?}", values[i]))?;
    Ok(layouts)
}

fn parse_block_sizes(values: &[i64]) -> Result<Vec<u32>, GridError> {
    non_empty(
        "block_sizes",
        values,
        "list at least one page size, e.g. block_sizes = [16]",
    )?;
    let mut sizes = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        let key = format!("grid.block_sizes[{i}]");
        let size = positive_u32(key.clone(), v, "block size", MAX_BLOCK_SIZE_TOKENS)?;
        if !size.is_power_of_two() {
            return Err(invalid(
                key,
                v,
                format!(
                    "block size must be a power of two (1, 2, 4, ..., {MAX_BLOCK_SIZE_TOKENS})"
                ),
            ));
        }
        sizes.push(size);
    }
    unique("block_sizes", &sizes, |i| values[i].to_string())?;
    Ok(sizes)
}

fn parse_pools(
    values: Option<&[String]>,
    pool_tokens: Option<i64>,
    max_seq_lens: &[u32],
    block_sizes: &[u32],
) -> Result<Vec<KvPool>, GridError> {
    let default = ["shared".to_string()];
    let values = values.unwrap_or(&default);
    non_empty(
        "pools",
        values,
        "list at least one pool: \"shared\" or \"unique\"",
    )?;
    let tokens = match pool_tokens {
        None => REFERENCE_POOL_TOKENS,
        Some(t) => positive_u32("grid.pool_tokens".into(), t, "pool_tokens", u32::MAX)?,
    };
    let mut pools = Vec::with_capacity(values.len());
    for (i, s) in values.iter().enumerate() {
        let pool =
            match s.trim().to_ascii_lowercase().as_str() {
                "shared" => KvPool::Shared { tokens },
                "unique" => KvPool::Unique,
                _ => return Err(invalid(
                    format!("grid.pools[{i}]"),
                    format!("{s:?}"),
                    "unknown pool; use \"shared\" (pool_tokens tokens, pages drawn at random) or \
                     \"unique\" (every page read once)",
                )),
            };
        pools.push(pool);
    }
    unique("pools", &pools, |i| format!("{:?}", values[i]))?;
    let has_shared = pools.iter().any(|p| matches!(p, KvPool::Shared { .. }));
    if let Some(t) = pool_tokens {
        if !has_shared {
            return Err(invalid(
                "grid.pool_tokens".into(),
                t,
                "set, but grid.pools has no \"shared\" pool to size; remove pool_tokens or add \
                 \"shared\" to pools",
            ));
        }
    }
    if has_shared {
        // A shared pool must hold at least one full sequence's pages, or the case is not the
        // workload it claims to be (every page would be re-read within one sequence).
        let longest = max_seq_lens.iter().copied().max().unwrap_or(0);
        for &block in block_sizes {
            let pool_pages = tokens.div_ceil(block);
            let seq_pages = longest.div_ceil(block);
            if pool_pages < seq_pages {
                return Err(invalid(
                    "grid.pool_tokens".into(),
                    tokens,
                    format!(
                        "a shared pool must hold one full sequence, but grid.max_seq_lens has \
                         {longest}; raise pool_tokens to >= {longest} or drop that length"
                    ),
                ));
            }
        }
    }
    Ok(pools)
}

fn parse_method(file: Option<MethodFile>) -> Result<MeasureMethod, GridError> {
    let mut method = MeasureMethod::default();
    let Some(file) = file else {
        return Ok(method);
    };
    let key = |k: &str| format!("grid.method.{k}");
    if let Some(w) = file.warmup {
        if !(0..=i64::from(MAX_WARMUP)).contains(&w) {
            return Err(invalid(
                key("warmup"),
                w,
                format!("warmup must be in 0..={MAX_WARMUP}"),
            ));
        }
        method.warmup = w as u32;
    }
    if let Some(t) = file.trials {
        method.trials = positive_u32(key("trials"), t, "trials", MAX_TRIALS)?;
    }
    if let Some(l2) = file.l2 {
        method.l2 =
            match l2.trim().to_ascii_lowercase().as_str() {
                "hot" => L2Mode::Hot,
                "cold" => L2Mode::Cold,
                _ => return Err(invalid(
                    key("l2"),
                    format!("{l2:?}"),
                    "unknown L2 mode; use \"hot\" (no flush, as the reference script) or \"cold\" \
                     (flush before every trial)",
                )),
            };
    }
    if let Some(timing) = file.timing {
        method.timing = match timing.trim().to_ascii_lowercase().as_str() {
            "events" => TimingMode::Events,
            "graph" => TimingMode::Graph,
            _ => {
                return Err(invalid(
                    key("timing"),
                    format!("{timing:?}"),
                    "unknown timing mode; use \"events\" or \"graph\"",
                ))
            }
        };
    }
    if let Some(g) = file.graph_launches {
        method.graph_launches = positive_u32(key("graph_launches"), g, "graph_launches", 10_000)?;
    }
    if let Some(m) = file.max_trials {
        method.max_trials = positive_u32(key("max_trials"), m, "max_trials", MAX_TRIALS)?;
    }
    if let Some(t) = file.max_time_s {
        if !(t.is_finite() && t > 0.0) {
            return Err(invalid(
                key("max_time_s"),
                t,
                "max_time_s must be a number > 0",
            ));
        }
        method.max_time_s = t;
    }
    if let Some(rse) = file.target_rse {
        if !(rse.is_finite() && rse > 0.0 && rse < 1.0) {
            return Err(invalid(
                key("target_rse"),
                rse,
                "target_rse is a fraction in (0, 1), e.g. 0.005 for 0.5 %; remove it for fixed \
                 trials",
            ));
        }
        if method.max_trials < method.trials {
            return Err(invalid(
                key("max_trials"),
                method.max_trials,
                format!(
                    "max_trials must be >= trials ({}) when target_rse is set",
                    method.trials
                ),
            ));
        }
        method.target_rse = Some(rse);
    }
    if let Some(r) = file.throttle_retries {
        if !(0..=i64::from(MAX_THROTTLE_RETRIES)).contains(&r) {
            return Err(invalid(
                key("throttle_retries"),
                r,
                format!("throttle_retries must be in 0..={MAX_THROTTLE_RETRIES}"),
            ));
        }
        method.throttle_retries = r as u32;
    }
    if let Some(kernels) = file.kernels {
        method.kernels = KernelSelection::parse(kernels.trim().to_ascii_lowercase().as_str())
            .ok_or_else(|| {
                invalid(
                    key("kernels"),
                    format!("{kernels:?}"),
                    "unknown kernel selection; use \"both\" (the default), \"optimized\" or \"baseline\"",
                )
            })?;
    }
    Ok(method)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid grid with one extra line appended.
    fn grid_with(extra: &str) -> Result<Grid, GridError> {
        Grid::from_toml_str(&format!(
            "batch_sizes = [1, 2]\nmax_seq_lens = [128]\n{extra}\n"
        ))
    }

    fn err(extra: &str) -> String {
        match grid_with(extra) {
            Ok(g) => panic!(
                "expected an error for {extra:?}, got a grid of {} cases",
                g.case_count()
            ),
            Err(e) => e.to_string(),
        }
    }

    fn err_text(text: &str) -> String {
        match Grid::from_toml_str(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn seed_preset_is_the_reference_sweep() {
        let g = Grid::preset("seed").unwrap();
        let cases = g.expand();
        assert_eq!(cases.len(), 320);
        assert_eq!(g.case_count(), 320);
        assert_eq!(g.quant_modes(), &QuantMode::REFERENCE);
        assert_eq!(g.heads(), &[(64, 8)]);
        assert_eq!(g.pools(), &[KvPool::Shared { tokens: 256_000 }]);
        assert_eq!(g.method().warmup, 10);
        assert_eq!(g.method().trials, 20);
        // The reference script's nesting: quant outermost, batch innermost.
        assert_eq!((cases[0].batch_size, cases[0].max_seq_len), (1, 1024));
        assert_eq!((cases[1].batch_size, cases[1].max_seq_len), (4, 1024));
        assert_eq!((cases[8].batch_size, cases[8].max_seq_len), (1, 2048));
        assert_eq!(cases[63].quant, QuantMode::BF16);
        assert_eq!(cases[64].quant, QuantMode::FP8_KV);
        let ids: HashSet<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), 320);
        assert!(cases.iter().all(|c| c.id == c.compute_id()));
    }

    #[test]
    fn modes_adjacent_order_runs_each_cells_modes_back_to_back() {
        let text = "batch_sizes = [1, 4]\nmax_seq_lens = [1024, 4096]\n\
                    quant_modes = [\"bf16/fp8/bf16\", \"fp8/fp8/nvfp4\"]\n";
        let script = Grid::from_toml_str(text).unwrap();
        let adjacent = Grid::from_toml_str(&format!("{text}order = \"modes-adjacent\"\n")).unwrap();
        assert_eq!(script.order(), CaseOrder::Script);
        assert_eq!(adjacent.order(), CaseOrder::ModesAdjacent);
        let key = |c: &BenchCase| (c.batch_size, c.max_seq_len, c.quant.out);
        let a: Vec<_> = adjacent.expand().iter().map(key).collect();
        assert_eq!(
            a,
            [
                (1, 1024, Dtype::Bf16),
                (1, 1024, Dtype::Nvfp4),
                (4, 1024, Dtype::Bf16),
                (4, 1024, Dtype::Nvfp4),
                (1, 4096, Dtype::Bf16),
                (1, 4096, Dtype::Nvfp4),
                (4, 4096, Dtype::Bf16),
                (4, 4096, Dtype::Nvfp4),
            ]
        );
        let s: Vec<_> = script.expand().iter().map(key).collect();
        assert_eq!(s[..4].iter().filter(|k| k.2 == Dtype::Bf16).count(), 4);
        // The same cases and ids either way: the order is no part of a case, and a journal
        // written under one order resumes under the other.
        let ids = |g: &Grid| -> BTreeSet<String> { g.expand().into_iter().map(|c| c.id).collect() };
        assert_eq!(ids(&script), ids(&adjacent));
        assert_eq!(script.grid_hash(), adjacent.grid_hash());
        assert!(adjacent.summary().contains("modes-adjacent"));
        let e = err("order = \"random\"");
        assert!(
            e.contains("grid.order") && e.contains("\"random\"") && e.contains("modes-adjacent"),
            "{e}"
        );
        assert!(err("ordr = \"script\"").contains("did you mean `order`"));
    }

    #[test]
    fn smoke_preset_is_small() {
        let g = Grid::preset("smoke").unwrap();
        let cases = g.expand();
        assert_eq!(cases.len(), 20);
        assert!(cases
            .iter()
            .all(|c| c.max_seq_len <= 256 && c.batch_size <= 4));
        // Few trials, but enough for `compare` to reach a verdict at its default alpha.
        let needed = crate::analysis::compare::samples_needed_per_side(0.01);
        assert_eq!(g.method().trials as usize, needed);
    }

    #[test]
    fn unknown_preset_lists_known_ones() {
        let e = Grid::preset("nightly").unwrap_err().to_string();
        assert!(
            e.contains("`nightly`") && e.contains("seed") && e.contains("smoke"),
            "{e}"
        );
    }

    #[test]
    fn ids_are_stable_across_parses_and_key_order() {
        let a = Grid::preset("seed").unwrap();
        let b = Grid::preset("seed").unwrap();
        let ids_a: Vec<String> = a.expand().into_iter().map(|c| c.id).collect();
        let ids_b: Vec<String> = b.expand().into_iter().map(|c| c.id).collect();
        assert_eq!(ids_a, ids_b);
        let x = Grid::from_toml_str("batch_sizes=[1]\nmax_seq_lens=[64]\nseed=3").unwrap();
        let y =
            Grid::from_toml_str("seed=3\nmax_seq_lens=[64]\nbatch_sizes=[1]\nname=\"y\"").unwrap();
        assert_eq!(x.grid_hash(), y.grid_hash());
        let z = Grid::from_toml_str("seed=4\nmax_seq_lens=[64]\nbatch_sizes=[1]").unwrap();
        assert_ne!(x.grid_hash(), z.grid_hash());
        assert_ne!(x.expand()[0].id, z.expand()[0].id);
    }

    #[test]
    fn defaults_follow_the_reference_script() {
        let g = grid_with("").unwrap();
        assert_eq!(g.quant_modes().len(), 5);
        assert_eq!(g.head_sizes(), &[128]);
        assert_eq!(g.layouts(), &[KvLayout::Hnd]);
        assert_eq!(g.block_sizes(), &[16]);
        assert_eq!(g.seed(), 0);
        assert_eq!(g.method(), &MeasureMethod::default());
        assert_eq!(g.case_count(), 10);
    }

    #[test]
    fn quant_modes_accept_strings_and_tables() {
        let g =
            grid_with(r#"quant_modes = ["bf16/fp8/bf16", {q = "fp8", kv = "fp8", out = "nvfp4"}]"#)
                .unwrap();
        assert_eq!(
            g.quant_modes(),
            &[QuantMode::FP8_KV, QuantMode::FP8_QKV_NVFP4_OUT]
        );
    }

    #[test]
    fn method_table_is_read() {
        let g = grid_with(
            "[method]\nwarmup = 0\ntrials = 7\nl2 = \"cold\"\ntiming = \"graph\"\n\
             graph_launches = 4\ntarget_rse = 0.01\nmax_trials = 50\nmax_time_s = 2\n\
             throttle_retries = 2\nkernels = \"optimized\"",
        )
        .unwrap();
        let m = g.method();
        assert_eq!(m.kernels, KernelSelection::Optimized);
        // The selection is part of the case id, and the default leaves ids as they were.
        let both = grid_with("").unwrap().expand();
        let only = g.expand();
        assert!(both
            .iter()
            .all(|c| !c.canonical_params().contains("kernels")));
        assert!(only
            .iter()
            .all(|c| c.canonical_params().ends_with(";kernels=optimized")));
        assert_eq!((m.warmup, m.trials, m.graph_launches), (0, 7, 4));
        assert_eq!((m.l2, m.timing), (L2Mode::Cold, TimingMode::Graph));
        assert_eq!(
            (m.target_rse, m.max_trials, m.max_time_s),
            (Some(0.01), 50, 2.0)
        );
        assert_eq!(m.throttle_retries, 2);
    }

    #[test]
    fn value_errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("", ""), // placeholder so the table reads as pairs; skipped below
            ("batch_sizes = [1, 4, 8, 0]", "grid.batch_sizes[3] = 0: batch size must be >= 1"),
            ("batch_sizes = [1, -2]", "grid.batch_sizes[1] = -2: batch size must be >= 1"),
            ("batch_sizes = [1, 4, 1]", "grid.batch_sizes[2] = 1: duplicate of grid.batch_sizes[0]"),
            ("batch_sizes = []", "grid.batch_sizes is empty"),
            ("batch_sizes = [100000000]", "grid.batch_sizes[0] = 100000000: batch size must be <="),
            ("max_seq_lens = [0]", "grid.max_seq_lens[0] = 0: max_seq_len must be >= 1"),
            ("max_seq_lens = []", "grid.max_seq_lens is empty"),
            ("heads = [[64, 6]]", "grid.heads[0] = [64, 6]: qo_heads (64) must be divisible by kv_heads (6)"),
            ("heads = [[64]]", "grid.heads[0] = [64]: expected a pair"),
            ("heads = [[0, 8]]", "grid.heads[0] = [0, 8]: qo_heads must be in"),
            ("heads = [[64, 8], [64, 8]]", "grid.heads[1] = [64, 8]: duplicate of grid.heads[0]"),
            ("heads = []", "grid.heads is empty"),
            ("head_sizes = [96]", "grid.head_sizes[0] = 96: unsupported head size; supported: 64, 128, 256"),
            ("layouts = [\"HDN\"]", "grid.layouts[0] = \"HDN\": unknown layout"),
            ("layouts = [\"HND\", \"hnd\"]", "grid.layouts[1] = \"hnd\": duplicate of grid.layouts[0]"),
            ("block_sizes = [0]", "grid.block_sizes[0] = 0: block size must be >= 1"),
            ("block_sizes = [16, 24]", "grid.block_sizes[1] = 24: block size must be a power of two"),
            ("block_sizes = [256]", "grid.block_sizes[0] = 256: block size must be <= 128"),
            ("pools = [\"private\"]", "grid.pools[0] = \"private\": unknown pool"),
            ("pools = [\"unique\"]\npool_tokens = 1000", "grid.pool_tokens = 1000: set, but grid.pools has no \"shared\""),
            ("pool_tokens = 64", "grid.pool_tokens = 64: a shared pool must hold one full sequence, but grid.max_seq_lens has 128"),
            ("pool_tokens = 0", "grid.pool_tokens = 0: pool_tokens must be >= 1"),
            ("seed = -1", "grid.seed = -1: the seed must be >= 0"),
            ("quant_modes = [\"bf16/bf16\"]", "grid.quant_modes[0] = \"bf16/bf16\": expected \"q/kv/out\""),
            ("quant_modes = [\"bf16/int8/bf16\"]", "grid.quant_modes[0] (kv) = \"int8\": unknown dtype"),
            ("quant_modes = [\"fp8/bf16/bf16\"]", "grid.quant_modes[0] = \"fp8/bf16/bf16\": unsupported quant mode: fp8/bf16/bf16: an fp8 query needs an fp8 KV cache"),
            ("quant_modes = [\"bf16/nvfp4/bf16\"]", "unsupported quant mode: bf16/nvfp4/bf16: nvfp4 is supported only as an output dtype"),
            ("quant_modes = [{q = \"bf16\", kv = \"fp8\"}]", ": missing `out`; write {q = \"bf16\", kv = \"fp8\", out = \"bf16\"}"),
            ("quant_modes = [\"bf16/bf16/bf16\", \"bfloat16/bf16/bf16\"]", "grid.quant_modes[1] = \"bfloat16/bf16/bf16\": duplicate of grid.quant_modes[0]"),
            ("quant_modes = [3]", "grid.quant_modes[0] = 3: expected a string"),
            ("quant_modes = []", "grid.quant_modes is empty"),
            ("[method]\ntrials = 0", "grid.method.trials = 0: trials must be >= 1"),
            ("[method]\nkernels = \"fast\"", "grid.method.kernels = \"fast\": unknown kernel selection"),
            ("[method]\nwarmup = -1", "grid.method.warmup = -1: warmup must be in 0..="),
            ("[method]\nl2 = \"warm\"", "grid.method.l2 = \"warm\": unknown L2 mode"),
            ("[method]\ntiming = \"wall\"", "grid.method.timing = \"wall\": unknown timing mode"),
            ("[method]\ngraph_launches = 0", "grid.method.graph_launches = 0: graph_launches must be >= 1"),
            ("[method]\ntarget_rse = 1.5", "grid.method.target_rse = 1.5: target_rse is a fraction in (0, 1)"),
            ("[method]\ntarget_rse = 0.01\ntrials = 30\nmax_trials = 20", "grid.method.max_trials = 20: max_trials must be >= trials (30)"),
            ("[method]\nmax_time_s = 0", "grid.method.max_time_s = 0: max_time_s must be a number > 0"),
            ("[method]\nthrottle_retries = 99", "grid.method.throttle_retries = 99: throttle_retries must be in 0..=10"),
            ("name = \" \"", "grid.name = \" \": the name must not be blank"),
        ];
        for (extra, expected) in cases.iter().skip(1) {
            // Axis lines replace the base grid's, so build the text per case.
            let text = if extra.starts_with("batch_sizes") {
                format!("{extra}\nmax_seq_lens = [128]\n")
            } else if extra.starts_with("max_seq_lens") {
                format!("batch_sizes = [1]\n{extra}\n")
            } else {
                format!("batch_sizes = [1, 2]\nmax_seq_lens = [128]\n{extra}\n")
            };
            let e = err_text(&text);
            assert!(
                e.contains(expected),
                "for {extra:?}\n  got:      {e}\n  expected: {expected}"
            );
        }
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        let e = err_text("batch_size = [1]\nmax_seq_lens = [128]");
        assert_eq!(
            e,
            "grid: unknown key `batch_size` (did you mean `batch_sizes`?)"
        );
        let e = err("[method]\ntrails = 3");
        assert_eq!(
            e,
            "grid: unknown key `method.trails` (did you mean `method.trials`?)"
        );
        let e = err("colour = \"blue\"");
        assert!(e.contains("unknown key `colour`; known keys: name"), "{e}");
    }

    #[test]
    fn missing_required_axes_are_named() {
        let e = err_text("max_seq_lens = [128]");
        assert!(e.starts_with("grid: missing key `batch_sizes`"), "{e}");
        let e = err_text("batch_sizes = [1]");
        assert!(e.starts_with("grid: missing key `max_seq_lens`"), "{e}");
    }

    #[test]
    fn syntax_and_type_errors_carry_line_and_column() {
        let e = err_text("batch_sizes = [1, 2\nmax_seq_lens = [128]");
        assert!(e.starts_with("grid: TOML error at line "), "{e}");
        let e = err_text("batch_sizes = [1]\nmax_seq_lens = \"long\"\n");
        assert!(
            e.starts_with("grid: TOML error at line 2, column 16"),
            "{e}"
        );
        let e = err_text("batch_sizes = [1]\nmax_seq_lens = [128]\n[method]\ntrials = \"many\"\n");
        assert!(
            e.starts_with("grid: TOML error at line 4, column 10"),
            "{e}"
        );
    }

    #[test]
    fn absurd_cases_are_refused() {
        // 256 sequences x 131072 tokens x 8 heads x 128 x 2 (K, V) x 2 bytes = 128 GiB unique pool.
        let e = err_text(
            "batch_sizes = [256]\nmax_seq_lens = [131072]\npools = [\"unique\"]\n\
             quant_modes = [\"bf16/bf16/bf16\"]",
        );
        assert!(
            e.contains("needs a KV pool of 128.00 GiB") && e.contains("64.00 GiB limit"),
            "{e}"
        );
        // The same with an fp8 cache is exactly 64 GiB: allowed.
        grid_with("").unwrap();
        Grid::from_toml_str(
            "batch_sizes = [256]\nmax_seq_lens = [131072]\npools = [\"unique\"]\n\
             quant_modes = [\"bf16/fp8/bf16\"]",
        )
        .unwrap();
        let e = err_text(
            "batch_sizes = [256]\nmax_seq_lens = [131072]\npool_tokens = 4000000000\n\
             quant_modes = [\"bf16/bf16/bf16\"]",
        );
        assert!(e.contains("needs a KV pool of"), "{e}");
    }

    #[test]
    fn too_many_cases_are_refused() {
        let batches: Vec<String> = (1..=1000).map(|b| b.to_string()).collect();
        let seqs: Vec<String> = (1..=1001).map(|s| s.to_string()).collect();
        let e = err_text(&format!(
            "batch_sizes = [{}]\nmax_seq_lens = [{}]\nquant_modes = [\"bf16/bf16/bf16\"]",
            batches.join(","),
            seqs.join(",")
        ));
        assert!(e.contains("expands to 1001000 cases"), "{e}");
    }

    #[test]
    fn summary_reports_counts_and_traffic() {
        let s = Grid::preset("seed").unwrap().summary();
        assert!(s.starts_with("grid `seed`"), "{s}");
        assert!(s.contains("320 cases"), "{s}");
        assert!(s.contains("fp8/fp8/nvfp4"), "{s}");
        // One pool set-up per KV dtype (bf16, fp8): the shared pool does not depend on batch/seq.
        assert!(s.contains("pool set-ups     2 "), "{s}");
        assert!(s.contains("est. KV read"), "{s}");
    }

    #[test]
    fn grid_files_load_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, Grid::preset_toml("smoke").unwrap()).unwrap();
        assert_eq!(
            Grid::from_file(&path).unwrap(),
            Grid::preset("smoke").unwrap()
        );
        std::fs::write(&path, "batch_sizes = [0]\nmax_seq_lens = [1]").unwrap();
        let e = Grid::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("g.toml: grid.batch_sizes[0] = 0"), "{e}");
        let e = Grid::from_file(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read grid file"), "{e}");
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("batch_size", "batch_sizes"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
