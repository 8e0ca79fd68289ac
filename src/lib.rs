pub mod data;
pub mod x {}
