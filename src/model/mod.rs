//! The BERT-family encoder: configuration, differentiable ops, parameters, checkpoints.

pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod encoder;
pub mod fused;
pub mod hub;
pub mod names;
pub mod ops;
pub mod params;
pub mod student;

pub use checkpoint::{load_encoder, save_encoder, LoadOptions, LoadReport};
pub use config::{Activation, EncoderConfig, Layout};
pub use encoder::{AllReady, Encoder, EncoderInput, EncoderOutput, ForwardOptions, ParamsReady};
pub use params::{Params, Parts};
