//! The decodebench agent: registers its device with a coordinator, pulls shards of cases, runs them
//! on a backend (CUDA or CPU) while sampling NVML telemetry, and reports each result as it
//! finishes.

pub mod identity;
pub mod telemetry;
pub mod client;
pub mod backends;
pub mod gating;
