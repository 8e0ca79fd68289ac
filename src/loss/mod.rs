//! Training losses, one per file. Each is built from differentiable candle ops.

pub mod attention;
pub mod cosine;
pub mod mlm;
pub mod mse;
pub mod soft;

pub use attention::attention_kl;
pub use cosine::cosine_loss;
pub use mlm::{cross_entropy, masked_positions, MaskedTargets};
pub use mse::{masked_mse, mse};
pub use soft::{soft_kl, teacher_probs};
