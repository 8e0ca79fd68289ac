//! The training engine shared by pretraining and distillation.

pub mod optim;
pub mod schedule;
