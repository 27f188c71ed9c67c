//! The decodebench agent: registers its device with a coordinator, pulls shards of cases, runs them
//! on a backend (CUDA or CPU) while sampling NVML telemetry, and reports each result as it
//! finishes.

pub mod backends;
pub mod client;
pub mod failpoint;
pub mod gating;
pub mod identity;
pub mod telemetry;
