//! The `decodebench` command: argument handling and the glue between the coordinator and agent
//! libraries. `main.rs` only parses flags and calls [`commands::execute`].

pub mod cli;
pub mod commands;
pub mod supervise;
