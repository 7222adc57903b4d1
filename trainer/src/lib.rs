//! Trains DDPM noise-prediction U-Nets with Candle and exports them to ONNX.
//!
//! The diffusion math (schedules, q(x_t|x_0), posteriors, samplers) lives in the `runtime` crate; this crate
//! owns the data, the U-Net, the training loop, checkpoints and the ONNX writer:
//!
//! - [`data`]: datasets (IDX, CIFAR-10, image folders) and augmentation;
//! - [`model`]: the U-Net, the `Ops` it is written against, the CPU tape engine and its kernels, parameters;
//! - [`train`]: configuration, batches, the loop, AdamW and EMA, checkpoints;
//! - [`onnx`]: the graph writer, `trainer export` and the model card;
//! - [`eval`]: the evaluation classifier, Inception-v3, FID, `trainer eval` and its sweeps; [`report`]: what it
//!   measured (RUN/eval.json), read by the model card;
//! - [`denoise`]: the U-Net as the runtime's `Denoiser` (previews, evaluation); [`plot`], [`bench`];
//!   [`progress`]: how long work reports progress without printing.

pub mod bench;
pub mod data;
pub mod denoise;
pub mod dist;
pub mod distill;
pub mod eval;
pub mod model;
pub mod onnx;
pub mod plot;
pub mod progress;
pub mod report;
pub mod sweep;
pub mod train;

// unit tests run under the allocation probe, so the fuzz targets can report their largest allocation
#[cfg(test)]
#[global_allocator]
static ALLOC: runtime::fuzz::Probe = runtime::fuzz::Probe;
