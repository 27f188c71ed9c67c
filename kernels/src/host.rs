//! The host name recorded with every result (the `host` column), one definition for every
//! backend and the agent.

/// Environment variable that overrides the recorded host name. Under Kubernetes the kernel's host
/// name is the pod's, so the manifests set this to the node's name (downward API `spec.nodeName`),
/// which is what a fleet comparison needs.
pub const HOST_NAME_ENV: &str = "DECODEBENCH_HOST";

/// Fallback host name when the system gives none.
pub const UNKNOWN_HOST: &str = "unknown-host";

/// This machine's host name: `$DECODEBENCH_HOST` when set, else the kernel's (std has no
/// `gethostname`; Linux exposes the same value in `/proc/sys/kernel/hostname`), else
/// `/etc/hostname`, else `$HOSTNAME`. Never fails: `unknown-host` when none gives a name.
pub fn host_name() -> String {
    first_host_name([
        std::env::var(HOST_NAME_ENV).ok(),
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
        std::fs::read_to_string("/etc/hostname").ok(),
        std::env::var("HOSTNAME").ok(),
    ])
}

/// The first usable host name among `candidates` (trimmed, non-empty), else `unknown-host`.
pub fn first_host_name(candidates: impl IntoIterator<Item = Option<String>>) -> String {
    candidates
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_string())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| UNKNOWN_HOST.to_string())
}
