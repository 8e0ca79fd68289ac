//! Distillation: a frozen teacher, a student, and the losses that tie them.

pub mod objective;
pub mod run;
pub mod section;

pub use objective::DistillObjective;
pub use section::{Annealing, DistillSection, LossWeights, SoftPositions, StudentInit};
