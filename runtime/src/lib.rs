#[cfg(feature = "onnx")]
pub mod onnx;
pub mod sampler;
pub mod schedule;
