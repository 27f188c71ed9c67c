//! Integration tests of the kernels crate: the number formats and the f64 reference reproduce the
//! golden vectors made outside decodebench (PyTorch, ml_dtypes; copied into `tests/fixtures/`),
//! the reference obeys the properties of attention, verification rejects wrong outputs, and the
//! CPU backend runs, verifies and times real kernels.

mod common;
mod cpu_backend;
mod formats;
mod golden;
mod properties;
