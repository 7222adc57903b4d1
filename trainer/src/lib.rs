//! Trains DDPM noise-prediction U-Nets with Candle and exports them to ONNX.
//!
//! The diffusion math (schedules, q(x_t|x_0), posteriors, samplers) lives in the `runtime` crate; this crate
//! owns the data, the U-Net, the training loop, checkpoints and the ONNX writer.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod denoise;
pub mod eval;
pub mod export;
pub mod inception;
pub mod kernels;
pub mod ops;
pub mod optim;
pub mod params;
pub mod plot;
pub mod tape;
pub mod train;
pub mod unet;
