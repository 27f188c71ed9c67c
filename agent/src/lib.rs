//! placeholder

pub mod identity;
pub mod telemetry;
