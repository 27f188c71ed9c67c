//! Run-time compilation of the kernel sources with NVRTC, for the device's own architecture, and
//! an on-disk cache of the results so that a second start skips the compiler.
//!
//! The sources (`kernels/cuda/*.cu`, `*.cuh`) are embedded in the binary; they are concatenated
//! into one program (with `#line` markers, so NVRTC's errors name the original file and line).
//! Hopper gets `sm_90a` machine code (CUBIN); another GPU gets CUBIN for its own `sm_XY` when this
//! NVRTC knows the architecture, and otherwise PTX for the newest architecture NVRTC knows that
//! the device can run (the driver then finishes the compilation).
//!
//! Cache entries are keyed by the SHA-256 of the program text, the target, the NVRTC version and
//! the options, so any change to one of them compiles afresh.

use super::launch::all_kernel_names;
use super::library::{guarded, require_nvrtc};
use super::resources::{parse_ptxas_report, ResourceReport};
use super::CudaError;
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use sha2::{Digest, Sha256};
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

/// The kernel sources, in the order they are concatenated (the shared header first).
const SOURCES: [(&str, &str); 6] = [
    ("common.cuh", include_str!("../../cuda/common.cuh")),
    ("generate.cu", include_str!("../../cuda/generate.cu")),
    ("reference.cu", include_str!("../../cuda/reference.cu")),
    ("baseline.cu", include_str!("../../cuda/baseline.cu")),
    ("decode.cu", include_str!("../../cuda/decode.cu")),
    ("decode_mma.cu", include_str!("../../cuda/decode_mma.cu")),
];

/// Name NVRTC gives the program in its messages.
const PROGRAM_NAME: &str = "decodebench_kernels.cu";

/// Environment variable naming the cache directory (overrides the XDG/HOME default).
pub const CACHE_DIR_ENV: &str = "DECODEBENCH_CACHE_DIR";
/// Environment variable naming an include directory for NVRTC (overrides `$CUDA_HOME/include`).
pub const INCLUDE_DIR_ENV: &str = "DECODEBENCH_CUDA_INCLUDE";
/// Environment variable with extra NVRTC options (space-separated), e.g. `-DNAME` for a kernel
/// variant; they are part of the cache key.
pub const EXTRA_OPTIONS_ENV: &str = "DECODEBENCH_NVRTC_OPTIONS";
/// NVRTC option that runs the compiler's optimizations on parallel threads (0: as many as the
/// machine has).
const SPLIT_COMPILE_OPTION: &str = "--split-compile=0";
/// NVRTC option that has ptxas report each kernel's registers, stack, spills and shared memory
/// (CUBIN targets only: for PTX the driver assigns registers at load). The report is checked
/// against the kernels' budgets (resources.rs) and kept in the cache beside the module; the
/// machine code is the same with and without it.
const PTXAS_REPORT_OPTION: &str = "--ptxas-options=-v";
/// Default CUDA install location, used when `CUDA_HOME` is unset.
const DEFAULT_CUDA_HOME: &str = "/usr/local/cuda";

/// The whole program text NVRTC compiles.
pub(crate) fn program_source() -> String {
    let mut text = String::new();
    for (name, body) in SOURCES {
        text.push_str(&format!("#line 1 \"{name}\"\n"));
        text.push_str(body);
        text.push('\n');
    }
    text
}

/// SHA-256 (hex) of the kernel program text: recorded in the device identity, so results say
/// which kernels produced them.
pub fn kernel_source_hash() -> String {
    hex::encode(Sha256::digest(program_source().as_bytes()))
}

/// What NVRTC produces for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CompileTarget {
    /// Machine code for this architecture (e.g. `sm_90a`).
    Cubin(String),
    /// PTX for this virtual architecture (e.g. `compute_90`), finished by the driver.
    Ptx(String),
}

impl CompileTarget {
    pub(crate) fn arch_option(&self) -> String {
        match self {
            CompileTarget::Cubin(a) | CompileTarget::Ptx(a) => format!("--gpu-architecture={a}"),
        }
    }

    pub(crate) fn label(&self) -> String {
        match self {
            CompileTarget::Cubin(a) => format!("cubin:{a}"),
            CompileTarget::Ptx(a) => format!("ptx:{a}"),
        }
    }
}

/// The target for a device of compute capability `major.minor`, given the architectures
/// (`major*10+minor`) this NVRTC supports. Hopper (9.0) gets the arch-specific `sm_90a`, which
/// enables its own instructions.
pub(crate) fn target_for(major: i32, minor: i32, supported: &[i32]) -> CompileTarget {
    let arch = major * 10 + minor;
    let suffix = if arch == 90 { "a" } else { "" };
    if supported.is_empty() || supported.contains(&arch) {
        return CompileTarget::Cubin(format!("sm_{arch}{suffix}"));
    }
    match supported.iter().copied().filter(|&a| a <= arch).max() {
        Some(best) => CompileTarget::Ptx(format!("compute_{best}")),
        // Older than anything NVRTC knows: let NVRTC say so when it compiles.
        None => CompileTarget::Cubin(format!("sm_{arch}")),
    }
}

/// The include directory passed to NVRTC: `DECODEBENCH_CUDA_INCLUDE`, else `$CUDA_HOME/include`,
/// else `/usr/local/cuda/include`; only when it exists (the kernels include no toolkit header,
/// but a modified kernel may).
pub(crate) fn include_dir() -> Option<PathBuf> {
    let dir = std::env::var_os(INCLUDE_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("CUDA_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CUDA_HOME));
            home.join("include")
        });
    dir.is_dir().then_some(dir)
}

/// NVRTC options for `target`. No fast math: the fp8 fallback decoding relies on denormals.
pub(crate) fn compile_options(target: &CompileTarget, include: Option<&Path>) -> Vec<String> {
    let mut options = vec![
        target.arch_option(),
        "--std=c++17".to_string(),
        "--ftz=false".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        // NVVM's optimizations on every core: the module (about 140 kernels, 96 of them the
        // tensor-core kernel at each pipeline depth) compiled in 54 s instead of 100 on 2 cores,
        // and in 21 s instead of 46-59 on an H200 host's 16 (bench/gpu/NOTES.md, run 41);
        // the optimized kernels' SASS came out identical, a few instructions of the baseline and
        // reference kernels were chosen differently (run 40).
        SPLIT_COMPILE_OPTION.to_string(),
    ];
    if matches!(target, CompileTarget::Cubin(_)) {
        options.push(PTXAS_REPORT_OPTION.to_string());
    }
    if let Some(dir) = include {
        options.push(format!("--include-path={}", dir.display()));
    }
    if let Ok(extra) = std::env::var(EXTRA_OPTIONS_ENV) {
        options.extend(extra.split_whitespace().map(str::to_string));
    }
    options
}

/// Cache key of one compilation.
pub(crate) fn cache_key(
    source: &str,
    target: &CompileTarget,
    nvrtc_version: &str,
    options: &[String],
) -> String {
    let mut h = Sha256::new();
    for part in [source, &target.label(), nvrtc_version, &options.join(" ")] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..16])
}

/// The NVRTC version, as "major.minor".
pub(crate) fn nvrtc_version() -> Result<String, CudaError> {
    require_nvrtc()?;
    guarded("reading the NVRTC version", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| CudaError::Nvrtc {
                context: "reading its version".into(),
                message: e.to_string(),
            })?;
        Ok(format!("{major}.{minor}"))
    })
}

/// The architectures this NVRTC can compile for (`major*10+minor`).
pub(crate) fn nvrtc_supported_archs() -> Result<Vec<i32>, CudaError> {
    require_nvrtc()?;
    guarded("listing NVRTC architectures", || {
        let mut n = 0;
        // SAFETY: valid out-pointer; then a buffer of exactly `n` ints.
        unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) }
            .result()
            .map_err(nvrtc_err("counting supported architectures"))?;
        let mut archs = vec![0i32; n.max(0) as usize];
        if n > 0 {
            unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
                .result()
                .map_err(nvrtc_err("listing supported architectures"))?;
        }
        Ok(archs)
    })
}

fn nvrtc_err(context: &'static str) -> impl Fn(nvrtc::NvrtcError) -> CudaError {
    move |e| CudaError::Nvrtc {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// A compiled module: CUBIN bytes or PTX text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CompiledModule {
    Cubin(Vec<u8>),
    Ptx(String),
}

impl CompiledModule {
    /// The module as it is stored: the CUBIN's bytes, or the PTX text's.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            CompiledModule::Cubin(b) => b,
            CompiledModule::Ptx(s) => s.as_bytes(),
        }
    }
}

/// Compiles `source` with NVRTC. On a compile error the NVRTC log is in the error.
pub(crate) fn nvrtc_compile(
    source: &str,
    target: &CompileTarget,
    options: &[String],
) -> Result<(CompiledModule, String), CudaError> {
    require_nvrtc()?;
    guarded("compiling kernels with NVRTC", || {
        let src = CString::new(source).map_err(|_| CudaError::Nvrtc {
            context: "creating the program".into(),
            message: "the kernel source contains a NUL byte".into(),
        })?;
        let name = CString::new(PROGRAM_NAME).unwrap_or_default();
        let prog =
            nvrtc::create_program(&src, Some(&name)).map_err(nvrtc_err("creating the program"))?;
        // SAFETY: `prog` was just created and is destroyed exactly once below; `src` and `name`
        // outlive it.
        let compiled = unsafe { compile_and_extract(prog, target, options) };
        unsafe {
            let _ = nvrtc::destroy_program(prog);
        }
        compiled
    })
}

/// # Safety
/// `prog` must be a live program from `create_program`.
unsafe fn compile_and_extract(
    prog: nvrtc_sys::nvrtcProgram,
    target: &CompileTarget,
    options: &[String],
) -> Result<(CompiledModule, String), CudaError> {
    if let Err(e) = nvrtc::compile_program(prog, options) {
        let log = nvrtc::get_program_log(prog)
            .map(|raw| c_chars_to_string(&raw))
            .unwrap_or_else(|le| format!("(no log: {le})"));
        let arch = match target {
            CompileTarget::Cubin(a) | CompileTarget::Ptx(a) => a.clone(),
        };
        return Err(CudaError::Compile {
            arch,
            options: options.join(" "),
            log: format!("{e}\n{}", without_ptxas_report(&log)),
        });
    }
    let log = nvrtc::get_program_log(prog)
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    let module = match target {
        CompileTarget::Cubin(_) => {
            let mut size = 0usize;
            nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(nvrtc_err("reading the CUBIN size"))?;
            let mut cubin = vec![0u8; size];
            nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char)
                .result()
                .map_err(nvrtc_err("reading the CUBIN"))?;
            CompiledModule::Cubin(cubin)
        }
        CompileTarget::Ptx(_) => {
            let raw = nvrtc::get_ptx(prog).map_err(nvrtc_err("reading the PTX"))?;
            CompiledModule::Ptx(c_chars_to_string(&raw))
        }
    };
    Ok((module, log))
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Compiled modules on disk, one file per cache key.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: Option<PathBuf>,
}

impl CompileCache {
    /// The default cache: `$DECODEBENCH_CACHE_DIR`, else `$XDG_CACHE_HOME/decodebench`, else
    /// `~/.cache/decodebench`; no cache when none of these can be named.
    pub fn from_env() -> CompileCache {
        let dir = std::env::var_os(CACHE_DIR_ENV)
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .filter(|v| !v.is_empty())
                    .map(|x| PathBuf::from(x).join("decodebench"))
            })
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/decodebench"))
            });
        CompileCache { dir }
    }

    /// A cache in `dir` (tests), or none.
    pub fn at(dir: Option<PathBuf>) -> CompileCache {
        CompileCache { dir }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn path_of(&self, key: &str, target: &CompileTarget) -> Option<PathBuf> {
        let ext = match target {
            CompileTarget::Cubin(_) => "cubin",
            CompileTarget::Ptx(_) => "ptx",
        };
        self.dir.as_ref().map(|d| d.join(format!("{key}.{ext}")))
    }

    /// Where the compiler's log of the module under `key` is kept (`<key>.<ext>.log`).
    fn log_path_of(&self, key: &str, target: &CompileTarget) -> Option<PathBuf> {
        let module = self.path_of(key, target)?;
        let mut name = module.file_name()?.to_os_string();
        name.push(".log");
        Some(module.with_file_name(name))
    }

    /// The compiler's log stored with `module` under `key`: empty when there is none (a module
    /// cached before the logs were kept) or when the log names another module (the module file
    /// was replaced, e.g. by an older build for an A/B run: its report would describe kernels
    /// that are not there).
    pub(crate) fn load_log(
        &self,
        key: &str,
        target: &CompileTarget,
        module: &CompiledModule,
    ) -> String {
        let Some(path) = self.log_path_of(key, target) else {
            return String::new();
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            return String::new();
        };
        let (first, log) = text.split_once('\n').unwrap_or((text.as_str(), ""));
        if first != log_header(module) {
            tracing::warn!(
                path = %path.display(),
                "the compile log beside the cached module belongs to another module (the module \
                 was replaced); its ptxas report is not used"
            );
            return String::new();
        }
        log.to_string()
    }

    pub(crate) fn load(&self, key: &str, target: &CompileTarget) -> Option<CompiledModule> {
        let bytes = std::fs::read(self.path_of(key, target)?).ok()?;
        if bytes.is_empty() {
            return None;
        }
        Some(match target {
            CompileTarget::Cubin(_) => CompiledModule::Cubin(bytes),
            CompileTarget::Ptx(_) => CompiledModule::Ptx(String::from_utf8(bytes).ok()?),
        })
    }

    /// Stores a module (written to a temporary file and renamed, so a reader never sees half a
    /// file) and says whether it is there now. A failure is logged as a warning, not an error:
    /// a run goes on without its cache (`precompile`, whose point the cache is, fails on it).
    pub(crate) fn store(
        &self,
        key: &str,
        target: &CompileTarget,
        module: &CompiledModule,
        log: &str,
    ) -> bool {
        let Some(path) = self.path_of(key, target) else {
            return false;
        };
        // The log first: a reader that finds the module finds its log (a log without its module
        // is never read).
        if let Some(log_path) = self.log_path_of(key, target) {
            let text = format!("{}\n{log}", log_header(module));
            if let Err(e) = write_atomically(&log_path, text.as_bytes()) {
                tracing::warn!(path = %log_path.display(), error = %e, "could not cache the compiler's log");
            }
        }
        if let Err(e) = write_atomically(&path, module.bytes()) {
            tracing::warn!(path = %path.display(), error = %e, "could not cache compiled kernels");
            return false;
        }
        true
    }
}

/// The first line of a cached compile log: the SHA-256 of the module it was written with.
fn log_header(module: &CompiledModule) -> String {
    format!(
        "# module sha256 {}",
        hex::encode(Sha256::digest(module.bytes()))
    )
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`, so that a reader
/// never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(&tmp, bytes))
        .and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `log` without ptxas's per-kernel report lines (what is left: warnings, errors).
pub(crate) fn without_ptxas_report(log: &str) -> String {
    log.lines()
        .filter(|l| !(l.starts_with("ptxas info") || l.starts_with("ptxas         .")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The budgets checked on the ptxas report in `log` for `target` (nothing to check for PTX).
pub(crate) fn resource_report(target: &CompileTarget, log: &str) -> ResourceReport {
    let kernels = parse_ptxas_report(log);
    let (arch, expected) = match target {
        CompileTarget::Cubin(a) if !kernels.is_empty() => (a.clone(), all_kernel_names()),
        CompileTarget::Cubin(a) | CompileTarget::Ptx(a) => (a.clone(), Vec::new()),
    };
    ResourceReport::check(&arch, kernels, &expected)
}

/// A compiled module and where it came from.
pub(crate) struct ProgramBuild {
    pub module: CompiledModule,
    /// Taken from the cache rather than compiled.
    pub from_cache: bool,
    /// In the cache now (taken from it, or stored there after compiling).
    pub cached: bool,
    /// NVRTC's messages other than ptxas's report (from the cache: those of the log stored with
    /// the module, if any).
    pub messages: String,
    /// What ptxas gave each kernel, and the budgets it meets or misses.
    pub resources: ResourceReport,
}

/// Compiles the kernel program for `target` (or takes it from `cache`).
pub(crate) fn compile_program_cached(
    cache: &CompileCache,
    target: &CompileTarget,
    nvrtc_version: &str,
) -> Result<ProgramBuild, CudaError> {
    let source = program_source();
    let include = include_dir();
    let options = compile_options(target, include.as_deref());
    let key = cache_key(&source, target, nvrtc_version, &options);
    if let Some(module) = cache.load(&key, target) {
        let log = cache.load_log(&key, target, &module);
        return Ok(ProgramBuild {
            module,
            from_cache: true,
            cached: true,
            messages: without_ptxas_report(&log).trim().to_string(),
            resources: report_resources(target, &log),
        });
    }
    let (module, log) = nvrtc_compile(&source, target, &options)?;
    let messages = without_ptxas_report(&log).trim().to_string();
    if !messages.is_empty() {
        tracing::info!(target = %target.label(), log = %messages, "NVRTC messages");
    }
    let resources = report_resources(target, &log);
    let cached = cache.store(&key, target, &module, &log);
    Ok(ProgramBuild {
        module,
        from_cache: false,
        cached,
        messages,
        resources,
    })
}

/// [`resource_report`], with its first line logged and each missed budget a warning.
fn report_resources(target: &CompileTarget, log: &str) -> ResourceReport {
    let report = resource_report(target, log);
    if let Some(first) = report.summary().lines().next() {
        tracing::info!(target = %target.label(), "{first}");
    }
    for v in &report.violations {
        tracing::warn!(target = %target.label(), "kernel resource budget missed: {v}");
    }
    report
}

/// What [`precompile`] produced for one target.
#[derive(Debug, Clone)]
pub struct Precompiled {
    /// The target, the module's size, whether it came from the cache, and how long it took.
    pub description: String,
    /// NVRTC's messages other than ptxas's report (warnings), if any.
    pub messages: String,
    /// What ptxas gave each kernel, and the budgets it meets or misses.
    pub resources: ResourceReport,
}

/// Compiles the kernels for a device of compute capability `major.minor` without needing that
/// device (NVRTC only) and stores the result in `cache`, e.g. to warm the cache of a container
/// image. Returns what was produced, with the kernels' resources.
pub fn precompile(major: i32, minor: i32, cache: &CompileCache) -> Result<Precompiled, CudaError> {
    let supported = nvrtc_supported_archs()?;
    let target = target_for(major, minor, &supported);
    let started = std::time::Instant::now();
    let build = compile_program_cached(cache, &target, &nvrtc_version()?)?;
    // Storing only warns (a run goes on without its cache); here the cache is the whole point.
    if !build.cached {
        return Err(CudaError::Nvrtc {
            context: "storing the compiled kernels".into(),
            message: format!(
                "the module compiled but could not be written to the cache at {} (see the warning \
                 above): make the directory writable or choose another with DECODEBENCH_CACHE_DIR",
                cache
                    .dir()
                    .map_or("(none)".to_string(), |d| d.display().to_string())
            ),
        });
    }
    let size = build.module.bytes().len();
    Ok(Precompiled {
        description: format!(
            "{} ({size} bytes) {} in {:.2} s",
            target.label(),
            if build.from_cache {
                "from the cache"
            } else {
                "compiled"
            },
            started.elapsed().as_secs_f64(),
        ),
        messages: build.messages,
        resources: build.resources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_shared_memory_is_declared_once_with_the_swizzle_alignment() {
        // Two `extern __shared__` declarations with different alignments leave the compiler to
        // pick one (common.cuh, dynamic_smem): the program has exactly one, in common.cuh.
        let program = program_source();
        let declarations: Vec<&str> = program
            .lines()
            .filter(|l| l.trim_start().starts_with("extern __shared__"))
            .collect();
        assert_eq!(declarations.len(), 1, "{declarations:?}");
        assert!(declarations[0].contains("__align__(DB_DYNAMIC_SMEM_ALIGN)"));
        assert!(program.contains("#define DB_DYNAMIC_SMEM_ALIGN 128"));
        let (common, common_text) = SOURCES[0];
        assert_eq!(common, "common.cuh");
        assert!(common_text.contains(declarations[0]));
    }

    #[test]
    fn hopper_gets_sm_90a_and_others_their_own_arch() {
        let archs = [75, 80, 86, 89, 90, 100, 120];
        assert_eq!(
            target_for(9, 0, &archs),
            CompileTarget::Cubin("sm_90a".into())
        );
        assert_eq!(
            target_for(8, 6, &archs),
            CompileTarget::Cubin("sm_86".into())
        );
        // A device newer than NVRTC knows: PTX for the newest known arch below it.
        assert_eq!(
            target_for(12, 1, &archs),
            CompileTarget::Ptx("compute_120".into())
        );
    }

    #[test]
    fn cache_key_depends_on_every_input() {
        let t = CompileTarget::Cubin("sm_90a".into());
        let o = vec!["--std=c++17".to_string()];
        let k = cache_key("src", &t, "13.0", &o);
        assert_eq!(k, cache_key("src", &t, "13.0", &o));
        assert_ne!(k, cache_key("src2", &t, "13.0", &o));
        assert_ne!(
            k,
            cache_key("src", &CompileTarget::Cubin("sm_89".into()), "13.0", &o)
        );
        assert_ne!(k, cache_key("src", &t, "12.9", &o));
        assert_ne!(k, cache_key("src", &t, "13.0", &["-O2".to_string()]));
        assert_eq!(k.len(), 32);
    }

    #[test]
    fn options_name_the_arch_the_precision_and_parallel_compilation() {
        let o = compile_options(&CompileTarget::Cubin("sm_90a".into()), None);
        for want in [
            "--gpu-architecture=sm_90a",
            "--prec-div=true",
            "--split-compile=0",
            "--ptxas-options=-v",
        ] {
            assert!(o.iter().any(|x| x == want), "{want} in {o:?}");
        }
        // PTX is not assembled here, so there is no ptxas to ask for a report.
        let p = compile_options(&CompileTarget::Ptx("compute_90".into()), None);
        assert!(!p.iter().any(|x| x.starts_with("--ptxas-options")), "{p:?}");
    }

    #[test]
    fn the_ptxas_report_is_read_off_the_log_and_kept_out_of_messages() {
        let log = "ptxas info    : Compiling entry function 'merge_d128_bf16' for 'sm_90a'\n\
                   ptxas info    : Function properties for merge_d128_bf16\n\
                   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 64 registers, used 1 barriers, 4096 bytes smem\n\
                   warning: something worth reading";
        assert_eq!(
            without_ptxas_report(log),
            "warning: something worth reading"
        );
        let t = CompileTarget::Cubin("sm_90a".into());
        let r = resource_report(&t, log);
        assert_eq!(r.kernels.len(), 1);
        assert_eq!(r.kernels[0].registers, 64);
        // Every other kernel of the module is missing from this report, and that is said.
        assert!(
            r.violations.iter().any(|v| v.contains("no entry for")),
            "{:?}",
            r.violations
        );
        // No report at all (PTX, or an older cache's module): nothing to check, no violation.
        let none = resource_report(&t, "");
        assert!(none.kernels.is_empty() && none.violations.is_empty());
    }

    #[test]
    fn program_text_marks_every_file_and_hash_is_stable() {
        let text = program_source();
        for (name, _) in SOURCES {
            assert!(text.contains(&format!("#line 1 \"{name}\"")), "{name}");
        }
        assert_eq!(kernel_source_hash(), kernel_source_hash());
        assert_eq!(kernel_source_hash().len(), 64);
    }

    #[test]
    fn cache_round_trips_and_ignores_missing_entries() {
        let dir =
            std::env::temp_dir().join(format!("decodebench-cache-test-{}", std::process::id()));
        let cache = CompileCache::at(Some(dir.clone()));
        let t = CompileTarget::Cubin("sm_90a".into());
        assert!(cache.load("k1", &t).is_none());
        let m = CompiledModule::Cubin(vec![1, 2, 3]);
        assert!(cache.store("k1", &t, &m, "ptxas info    : Used 8 registers"));
        assert_eq!(cache.load("k1", &t), Some(m.clone()));
        assert_eq!(
            cache.load_log("k1", &t, &m),
            "ptxas info    : Used 8 registers"
        );
        assert!(dir.join("k1.cubin.log").is_file());
        // The module replaced beside its log (an older build put in for an A/B run): the log
        // describes other kernels and is not used.
        std::fs::write(dir.join("k1.cubin"), [9u8, 9, 9]).unwrap();
        let other = cache.load("k1", &t).unwrap();
        assert_eq!(cache.load_log("k1", &t, &other), "");
        std::fs::write(dir.join("k1.cubin"), [1u8, 2, 3]).unwrap();
        let p = CompileTarget::Ptx("compute_90".into());
        let ptx = CompiledModule::Ptx(".version 8.0".into());
        cache.store("k2", &p, &ptx, "");
        assert_eq!(cache.load("k2", &p), Some(ptx));
        // A module cached without a log (an older cache) loads with an empty one.
        std::fs::remove_file(dir.join("k1.cubin.log")).unwrap();
        assert_eq!(cache.load_log("k1", &t, &m), "");
        let _ = std::fs::remove_dir_all(dir);
        // No directory: nothing stored, nothing loaded, no error.
        let none = CompileCache::at(None);
        none.store("k1", &t, &CompiledModule::Cubin(vec![1]), "");
        assert!(none.load("k1", &t).is_none());
    }
}
