//! decodebench's workload and its execution: the benchmark case types, the number formats (BF16,
//! FP8 e4m3, NVFP4), the CPU reference of paged decode attention that is the correctness oracle,
//! and the backends (CPU and CUDA) that run and time cases.

pub mod backend;
pub mod measurement;
pub mod workload;

pub use backend::{Backend, NoTelemetry, TelemetryProbe};
pub use measurement::{
    Accuracy, CaseMeasurement, DeviceIdentity, KernelKind, KernelMeasurement, Status, Telemetry,
    TimingStats,
};
pub use workload::{
    BenchCase, Dtype, KvLayout, KvPool, L2Mode, MeasureMethod, QuantMode, Scales, TimingMode,
};
