//! Small shared helpers.

pub mod alloc;
pub mod threads;

use anyhow::{Context, Result};

/// SplitMix64's increment: a stream's values are `splitmix64(state)`, `state` advanced by it.
pub const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: `z` plus [`SPLITMIX_GAMMA`], through its finaliser. A deterministic 64-bit mix,
/// used for held-out splits, the benches' shared batch and the dropout masks
/// ([`dropout_draw`]).
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(SPLITMIX_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `i`'s draw in a dropout mask under `seed`, 24 uniform bits: the top 24 of
/// SplitMix64's `i`-th output from `seed`. The element is kept when `draw / 2²⁴ ≥ p`:
/// [`crate::model::fused::dropout::Mask::draw`] on the CPU, `keep_scale` in
/// `model/cuda/kernels.cu` on a GPU (CPU twin [`crate::model::cuda::reference::keep_scale`]).
#[inline]
pub fn dropout_draw(seed: u64, i: u64) -> u64 {
    splitmix64(seed.wrapping_add(i.wrapping_mul(SPLITMIX_GAMMA))) >> 40
}
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed and
/// synced, then renamed over the target. A crash leaves either the old file or the new one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
