//! Build script of the `decodebench` binary: records the git revision it is built from, which every
//! result row carries. Kept out of the library crates so a new commit rebuilds only the binary.

fn main() {
    emit_git_revision();
}

/// Records the git revision the binary is built from (results carry it), or "unknown" outside a
/// checkout (a source tarball, a container build without .git).
fn emit_git_revision() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=DECODEBENCH_GIT_REVISION");
    let rev = std::env::var("DECODEBENCH_GIT_REVISION").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    println!(
        "cargo:rustc-env=DECODEBENCH_GIT_REVISION={}",
        rev.filter(|r| !r.is_empty())
            .unwrap_or_else(|| "unknown".into())
    );
}
