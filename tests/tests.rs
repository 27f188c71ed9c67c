//! decodebench's integration tests, one binary (as ripgrep does): real `decodebench` coordinator
//! and agent processes on loopback, with faults injected (kill -9, SIGSTOP, SIGTERM, bad tokens,
//! garbage on the port), each test ending by reading the output files and checking that every
//! case of the grid came back exactly once.

mod agent_connect;
mod analysis;
mod deploy_cli;
mod faults;
mod fleet;
mod grid_errors;
mod local_run;
mod security;
mod tls;
mod util;
