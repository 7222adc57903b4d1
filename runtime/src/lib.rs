pub mod schedule;
pub mod sampler;
