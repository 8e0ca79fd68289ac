//! Thread-pool setup for candle's CPU backend, and [`run_hot`], which keeps rayon's
//! workers spinning while a step runs.
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

/// Everything a process that trains should set up first: huge pages (which may run the
/// program again, see [`super::alloc::use_huge_pages`]), the allocator and the threads.
pub fn init_runtime() {
    super::alloc::use_huge_pages();
    super::alloc::tune_allocator();
    configure_threads();
}

/// Runs `f` on a worker of rayon's pool while the pool's other workers spin, taking the
/// work `f` hands out (its parallel passes and matmuls) the moment it is queued.
///
/// Without it the calling thread sits outside the pool: every parallel op queues a job,
/// wakes a sleeping worker and sleeps until the job is done, and the workers fall asleep
/// again during each serial stretch of the step. On these virtual machines a wake-up takes
/// tens of microseconds to milliseconds, and a step runs hundreds of parallel ops. Spinning
/// workers are what OpenMP runtimes (PyTorch's) use between parallel regions too; rayon has
/// no setting for how long its workers spin, hence these spinner jobs. On 2
/// threads: small distillation step 9120 -> 10190 tokens/s, small MLM train step 7450 ->
/// 8560, small forward 23010 -> 24450 (`benches/encoder_step.rs`, alternating runs).
///
/// A worker that finds nothing to do for [`SPIN_FOR`] (a checkpoint being written, a batch
/// being read) naps between looks instead of holding its core. Nested calls are fine (the
/// inner spinners run on the outer ones). Use it around CPU compute only: on a GPU the
/// spinning would take cores from the data pipeline for nothing.
pub fn run_hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let n = rayon::current_num_threads();
    if n < 2 {
        return f();
    }
    let stop = AtomicBool::new(false);
    // Set on the way out, also when `f` panics: the scope waits for the spinners to end.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    rayon::scope(|s| {
        for _ in 0..n - 1 {
            s.spawn(|_| {
                let mut idle_since = Instant::now();
                let mut idle_looks = 0u32;
                let mut napping = false;
                while !stop.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        (idle_looks, napping) = (0, false);
                        continue;
                    }
                    if napping {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    // The clock read once every 256 empty looks, not on each.
                    if idle_looks == 0 {
                        idle_since = Instant::now();
                    }
                    idle_looks = idle_looks.wrapping_add(1);
                    napping = idle_looks.is_multiple_of(256) && idle_since.elapsed() > SPIN_FOR;
                    std::hint::spin_loop();
                }
            });
        }
        let _stop = Stop(&stop);
        f()
    })
}

/// [`run_hot`] when `device` is the CPU; `f()` as it is elsewhere (the spinning would only
/// take cores from the data pipeline of a GPU run).
pub fn run_hot_on<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        run_hot(f)
    } else {
        f()
    }
}

/// How long an idle worker spins in [`run_hot`] before it naps between looks for work.
pub const SPIN_FOR: std::time::Duration = std::time::Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::run_hot;
    use rayon::prelude::*;

    #[test]
    fn runs_parallel_work_and_returns_its_value() {
        let sum: u64 = run_hot(|| (0..100_000u64).into_par_iter().sum());
        assert_eq!(sum, 100_000 * 99_999 / 2);
        // Nested: the inner spinners run on the outer ones.
        let v = run_hot(|| run_hot(|| (0..1000u32).into_par_iter().map(|x| x * 2).sum::<u32>()));
        assert_eq!(v, 999_000);
    }

    #[test]
    fn napping_workers_still_take_work() {
        // Past SPIN_FOR the spinners nap between looks; parallel work after that still runs.
        let sum: u64 = run_hot(|| {
            std::thread::sleep(super::SPIN_FOR + std::time::Duration::from_millis(30));
            (0..10_000u64).into_par_iter().sum()
        });
        assert_eq!(sum, 10_000 * 9_999 / 2);
    }

    #[test]
    fn a_panic_in_the_step_ends_the_spinners_and_propagates() {
        let r = std::panic::catch_unwind(|| run_hot(|| -> u32 { panic!("step failed") }));
        assert!(r.is_err());
        // The pool is usable afterwards (a spinner left running would hold a worker).
        assert_eq!(run_hot(|| 7), 7);
    }
}
