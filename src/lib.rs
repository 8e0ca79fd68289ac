//! distil: distil and pretrain BERT-family masked language models with candle.
//!
//! Data flows one way: recipe → corpus → token ids → masked batches → teacher / student
//! forward → losses → optimizer → checkpoint.

pub mod cli;
pub mod data;
pub mod distill;
pub mod loss;
pub mod model;
pub mod recipe;
pub mod train;
pub mod util;
