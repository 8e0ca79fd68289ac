//! The training engine shared by pretraining and distillation.

pub mod batch;
pub mod distributed;
pub mod eval;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod run_dir;
pub mod schedule;
pub mod setup;
pub mod trainer;
