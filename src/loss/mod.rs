//! Training losses, one per file. Each is built from differentiable candle ops.

pub mod mlm;

pub use mlm::{cross_entropy, masked_positions, MaskedTargets};
