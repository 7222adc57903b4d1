//! The noise-prediction U-Net and what it runs on: the `Ops` trait and its Candle implementation, the CPU
//! tape engine with its fused kernels, and named parameters.

pub mod kernels;
pub mod ops;
pub mod params;
pub mod tape;
pub mod unet;
