//! decodebench's workload and its execution: the benchmark case types, the number formats (BF16,
//! FP8 e4m3, NVFP4), the CPU reference of paged decode attention that is the correctness oracle,
//! and the backends (CPU and CUDA) that run and time cases.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod formats;
pub mod host;
pub mod inputs;
pub mod measurement;
pub mod reference;
pub mod torch_rng;
pub mod workload;

pub use backend::{Backend, NoTelemetry, TelemetryProbe};
pub use cpu::CpuBackend;
pub use cuda::{CudaBackend, CudaError};
pub use formats::Nvfp4Tensor;
pub use inputs::{generate_host_inputs, HostInputs, HostTensor, InputError};
pub use measurement::{
    Accuracy, CaseMeasurement, DeviceIdentity, KernelKind, KernelMeasurement, Status, Telemetry,
    TimingStats,
};
pub use reference::{attention_f64, verify_output, QuantizedOutput, Verification};
pub use workload::{
    BenchCase, Dtype, KernelSelection, KvLayout, KvPool, L2Mode, MeasureMethod, QuantMode, Scales,
    TimingMode,
};
