//! The decodebench coordinator: expands and validates the grid, schedules shards over leases,
//! journals every result durably, writes the Parquet/CSV outputs, and serves the gRPC protocol.
pub mod scheduler;
pub mod grid;
pub mod journal;
pub mod record;
pub mod schema;
pub mod sink;
