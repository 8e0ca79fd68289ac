//! Thread-pool setup for candle's CPU backend.
//!
//! candle 0.11 runs its element-wise ops on a pool of its own whose workers spin between
//! tasks, next to the rayon pool its matmuls (and distil's fused kernels) use. On a machine
//! with few cores the spinning workers take the cores the rayon threads need: on 2 cores a
//! small training step spent a quarter of its samples in the pool's spin-wait. With the
//! fused kernels doing the heavy element-wise work on rayon, the few element-wise ops left
//! to candle (residual adds, gradient sums) run faster on the calling thread alone:
//! `CANDLE_NUM_THREADS=1` took the small training step from 2256 to 3623 tokens/s
//! (`benches/encoder_step.rs --shape small --mode train --threads 2`).

/// Sets `CANDLE_NUM_THREADS=1` unless the user set it. Call before any candle op (candle
/// reads it once, when its pool starts).
pub fn configure_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any other thread exists (the first thing main does).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Everything a process that trains should set up first: the allocator and the threads.
pub fn init_runtime() {
    super::alloc::tune_allocator();
    configure_threads();
}
