//! Allocator tuning for the training loop.
//!
//! candle allocates a fresh buffer for every op's output; with glibc's defaults, buffers above
//! the mmap threshold are mapped and unmapped each time, and freed memory is trimmed back to
//! the OS, so every step pays page faults for memory it just released. Keeping large blocks
//! on the heap (no mmap, no trimming) cut system time tenfold and raised tokens/s by about a
//! fifth on the quickstart (measured with the equivalent `MALLOC_MMAP_MAX_=0
//! MALLOC_TRIM_THRESHOLD_=…` environment).

/// Tunes glibc's malloc for many large, short-lived buffers. A no-op elsewhere, and when the
/// user set `MALLOC_MMAP_MAX_` or `MALLOC_TRIM_THRESHOLD_` themselves.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: libc::c_int = -1;
        const M_MMAP_MAX: libc::c_int = -4;
        const M_ARENA_MAX: libc::c_int = -8;
        if std::env::var_os("MALLOC_MMAP_MAX_").is_none()
            && std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none()
        {
            // SAFETY: mallopt only adjusts glibc allocator parameters; called before threads start.
            unsafe {
                libc::mallopt(M_MMAP_MAX, 0);
                libc::mallopt(M_TRIM_THRESHOLD, libc::c_int::MAX);
                // One arena for every thread. The steps run on rayon's workers
                // (`threads::run_hot`), and a worker's own arena grows in heaps of at most
                // 64 MB: larger buffers (a BERT-base decoder gradient, 94 MB) were mapped
                // and unmapped every step anyway, ~29k page faults a step; 1.3k with this.
                libc::mallopt(M_ARENA_MAX, 1);
            }
        }
    }
}
