//! The decodebench coordinator: expands and validates the grid, schedules shards over leases,
//! journals every result durably, writes the Parquet/CSV outputs, and serves the gRPC protocol.
pub mod analysis;
pub mod auth;
pub mod grid;
pub mod http;
pub mod journal;
pub mod metrics;
pub mod progress;
pub mod record;
pub mod run;
pub mod scheduler;
pub mod schema;
pub mod service;
pub mod sink;
