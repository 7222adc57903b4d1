//! The noise-prediction U-Net and what it runs on: the `Ops` trait and its Candle implementation, the CPU
//! tape engine with its fused kernels, and named parameters.
//!
//! The layers import downwards only: `kernels` (the fused CPU kernels, one family a file) uses none of the
//! others; `ops` (the `Ops` trait, `CandleOps`) and `tape` (the CPU autograd, each op's forward beside its
//! backward) call the kernels; `unet` is written once against `Ops`. `profile` (wall time per op kind, for
//! `trainer bench --profile`) imports nothing of the crate.

pub mod kernels;
pub mod ops;
pub mod params;
pub mod profile;
pub mod random;
pub mod tape;
pub mod unet;
pub mod workers;
