//! The diffusion runtime: the DDPM math, the samplers, the model metadata and the ONNX Runtime generator.
//!
//! - [`schedule`]: noise schedules and the closed forms of the forward process and its posterior.
//! - [`sampler`]: DDPM, DDIM and DPM-Solver++(2M) with classifier-free guidance, written once against the
//!   [`sampler::Denoiser`] trait (x_t, t, labels -> eps). ONNX Runtime implements it here; the trainer
//!   implements it with its Candle model, so both run the same sampling code.
//! - [`metadata`]: the self-describing metadata an exported model carries (schedule, image geometry, classes,
//!   recommended sampling), one schema for the writer and the reader.
//! - [`generator`] (feature `onnx`): open an exported model and generate images; [`capi`] is its C ABI.
//! - `serve` (feature `serve`): the models behind a JSON API and a web page (`generate serve`).
//!
//! Features: `onnx` (default: ONNX Runtime, the generator and the C ABI), `png` (image files), `clap` (the
//! named enums as clap `ValueEnum`s, for command lines), `serve` (the HTTP server, on axum and tokio), `cli`
//! (the `generate` binary, with `serve`), `fuzz` (the fuzz
//! targets' allocation probe, for tests). The default library has no command-line or test code.
//!
//! Every fallible function returns [`Result`], whose [`Error`] names the request field or metadata key at
//! fault.
//!
//! ```no_run
//! use runtime::generator::{GenerateRequest, Generator, GeneratorOptions};
//! use runtime::sampler::SamplerKind;
//!
//! let mut g = Generator::open("models/mnist.onnx".as_ref(), &GeneratorOptions::default())?;
//! let req = GenerateRequest { n: 8, class: Some("7".into()), sampler: SamplerKind::DpmSolverPP, steps: 10, ..Default::default() };
//! let images = g.generate(&req, &mut |_step| {})?;
//! images.save_grid("sevens.png".as_ref())?;
//! # Ok::<(), runtime::Error>(())
//! ```

pub mod error;
pub use error::{Error, Result};

#[cfg(feature = "onnx")]
pub mod capi;
/// Helpers of the fuzz targets (test code: feature `fuzz`).
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
#[cfg(feature = "onnx")]
pub mod generator;
#[cfg(feature = "png")]
pub mod images;
pub mod likelihood;
pub mod metadata;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod sampler;
pub mod schedule;
#[cfg(feature = "serve")]
pub mod serve;

#[cfg(feature = "clap")]
#[doc(hidden)]
pub use clap as __clap;
#[doc(hidden)]
pub use serde as __serde;

// unit tests run under the allocation probe, so the fuzz targets can report their largest allocation
#[cfg(test)]
#[global_allocator]
static ALLOC: fuzz::Probe = fuzz::Probe;
