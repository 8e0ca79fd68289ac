//! Compiling `kernels.cu` with NVRTC and launching its kernels on candle's CUDA stream.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, Layout, Shape, Storage};
use std::sync::OnceLock;

pub(super) type CResult<T> = candle_core::Result<T>;

const SOURCE: &str = include_str!("kernels.cu");
pub(super) const MODULE: &str = "distil_kernels";
/// Threads a block; the row kernels give each row a warp, so 8 rows a block.
pub(super) const THREADS: u32 = 256;
const ROWS_PER_BLOCK: u64 = (THREADS / 32) as u64;

pub(super) fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// The kernels' PTX, compiled on first use (once per process).
pub(super) fn ptx() -> CResult<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(|e| {
        err(format!(
            "compiling distil's CUDA kernels with NVRTC failed: {e}"
        ))
    })
}

/// Launches kernel `$name` on `$dev` with `$grid` blocks of [`THREADS`], passing the buffers,
/// then the scalars, in the kernel's order. (A macro, not a function: the launcher holds
/// references to the scalars, which must live until the launch.)
macro_rules! launch {
    ($dev:expr, $name:expr, $grid:expr, [$($buf:expr),*], [$($val:expr),*]) => {{
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let func = $dev.get_or_load_custom_func($name, $crate::model::cuda::launch::MODULE,
            $crate::model::cuda::launch::ptx()?)?;
        let mut b = func.builder();
        $( b.arg($buf); )*
        $( let v = $val; b.arg(&v); )*
        let (gx, gy): (u32, u32) = $grid;
        let cfg = LaunchConfig {
            grid_dim: (gx.max(1), gy.max(1), 1),
            block_dim: ($crate::model::cuda::launch::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each caller passes the arguments `kernels.cu` declares, with buffers of the
        // sizes the kernel reads and writes.
        unsafe { b.launch(cfg) }.w()?;
    }};
}
pub(super) use launch;

/// Blocks for an element-wise grid-stride kernel over `n` elements.
pub(super) fn elementwise_grid(n: usize) -> (u32, u32) {
    (n.div_ceil(THREADS as usize).min(1 << 16) as u32, 1)
}

/// Blocks for a row kernel over `rows` rows.
pub(super) fn row_grid(rows: usize) -> CResult<(u32, u32)> {
    let blocks = (rows as u64).div_ceil(ROWS_PER_BLOCK);
    // CUDA's limit on a grid's x dimension.
    if blocks > i32::MAX as u64 {
        return Err(err(format!("{rows} rows exceed one launch")));
    }
    Ok((blocks as u32, 1))
}

/// Blocks for a column-sum kernel: 256 columns by `chunks` chunks of rows.
pub(super) fn column_grid(cols: usize, chunks: usize) -> (u32, u32) {
    (cols.div_ceil(THREADS as usize) as u32, chunks as u32)
}

/// A contiguous `f32` view of a CUDA storage.
pub(super) fn view<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> CResult<CudaView<'a, f32>> {
    typed_view(s, l, op)
}

/// [`view`] of a tensor's storage held by the op (`storage_and_layout`'s guard).
pub(super) fn view_of<'a>(s: &'a Storage, l: &Layout, op: &str) -> CResult<CudaView<'a, f32>> {
    typed_view_of(s, l, op)
}

/// [`view`] with elements of type `T` (bf16 products, u32 ids).
pub(super) fn typed_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> CResult<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| err(format!("{op}: the CUDA kernels take contiguous tensors")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// [`view_of`] with elements of type `T`.
pub(super) fn typed_view_of<'a, T: CudaDType>(
    s: &'a Storage,
    l: &Layout,
    op: &str,
) -> CResult<CudaView<'a, T>> {
    match s {
        Storage::Cuda(s) => typed_view(s, l, op),
        _ => Err(err(format!("{op}: a tensor it holds is not on the GPU"))),
    }
}

/// An output buffer of `n` elements; every kernel writes each element of its output.
pub(super) fn out(dev: &CudaDevice, n: usize) -> CResult<CudaSlice<f32>> {
    // SAFETY: the kernel launched next writes every element.
    unsafe { dev.alloc::<f32>(n) }
}

pub(super) fn wrap(slice: CudaSlice<f32>, dev: &CudaDevice, shape: Shape) -> (CudaStorage, Shape) {
    (CudaStorage::wrap_cuda_slice(slice, dev.clone()), shape)
}

/// Sets the release threshold of `dev`'s default memory pool (the one candle's stream-ordered
/// allocations come from) to "never": memory a step frees stays in the pool for the next
/// step, as in PyTorch's caching allocator. At the driver's default, 0, every synchronisation
/// (each step reads its loss) hands the step's memory back to the driver, and the next step
/// maps it again.
pub(super) fn keep_freed_memory(dev: &CudaDevice) -> CResult<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let fail = |what: &str, e: result::DriverError| err(format!("{what}: {e:?}"));
    ctx.bind_to_thread()
        .map_err(|e| fail("binding the CUDA context", e))?;
    let mut never = u64::MAX;
    // SAFETY: the device comes from the context; the attribute takes a u64 (cuMemPoolSetAttribute).
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())
            .map_err(|e| fail("getting the default memory pool", e))?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut never as *mut u64 as *mut std::ffi::c_void,
        )
        .map_err(|e| fail("setting the memory pool's release threshold", e))
    }
}
