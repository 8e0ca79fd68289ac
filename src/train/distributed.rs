//! Data-parallel training: one process per GPU, gradients summed over NCCL.
//!
//! Processes are launched as `torchrun` launches them (`torchrun --no-python --nproc-per-node
//! N distil run RECIPE`, or any launcher that sets the same variables): `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`. Rank 0 creates the NCCL unique id and hands it
//! to the other ranks over TCP ([`serve_id`] / [`fetch_id`]); each rank trains on
//! `cuda:LOCAL_RANK`. Every optimiser step reads `WORLD_SIZE × gradient_accumulation_steps`
//! consecutive batches of the one shared batch plan and rank `r` takes every `WORLD_SIZE`-th
//! of them starting at `r` ([`next_for_rank`]), so the data position saved in a checkpoint is
//! global and a run resumes with any world size. The gradients are summed over the ranks and
//! divided by the world size before clipping and the optimiser ([`Dist::average_gradients`]);
//! every rank then applies the same update to the same weights. Only rank 0 writes the run
//! directory (checkpoints, metrics, the final model) and evaluates.
//!
//! With `WORLD_SIZE` unset or 1 the run is a single process and nothing here does anything.
//! The id exchange, the sharding and the gradient averaging need no GPU and are tested on the
//! CPU ([`LocalGroup`] stands in for NCCL with threads of one process).

use crate::data::{Batch, BatchIter, Position};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// This process's place in a data-parallel run, from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    /// Where rank 0 serves the NCCL id: `MASTER_PORT`, or `MASTER_PORT + 1` under torchrun,
    /// whose agent already listens on `MASTER_PORT` (`TORCHELASTIC_USE_AGENT_STORE=True`);
    /// `DISTIL_NCCL_ID_PORT` overrides both.
    pub id_port: u16,
    /// How long rank 0 waits for the others, and they for it (`DISTIL_DIST_TIMEOUT`
    /// seconds, default 600).
    pub timeout: Duration,
}

impl DistEnv {
    /// The process environment's view; `None` for a single process (`WORLD_SIZE` unset or 1).
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`DistEnv::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let num = |k: &str| -> Result<Option<u64>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("{k}={v:?} is not a non-negative integer")),
            }
        };
        let world = match num("WORLD_SIZE")? {
            None | Some(1) => return Ok(None),
            Some(0) => bail!("WORLD_SIZE=0: the world needs at least one process"),
            Some(w) => w as usize,
        };
        let need = |k: &str| -> Result<u64> {
            num(k)?.with_context(|| {
                format!("WORLD_SIZE={world} but {k} is not set (launch with torchrun, or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
            })
        };
        let rank = need("RANK")? as usize;
        if rank >= world {
            bail!("RANK={rank} is out of range for WORLD_SIZE={world}");
        }
        let local_rank = need("LOCAL_RANK")? as usize;
        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .with_context(|| format!("WORLD_SIZE={world} but MASTER_ADDR is not set"))?;
        let port = |k: &str, v: u64| -> Result<u16> {
            u16::try_from(v).map_err(|_| anyhow::anyhow!("{k}={v} is not a TCP port"))
        };
        let master_port = port("MASTER_PORT", need("MASTER_PORT")?)?;
        let id_port = match num("DISTIL_NCCL_ID_PORT")? {
            Some(p) => port("DISTIL_NCCL_ID_PORT", p)?,
            None if get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") => {
                master_port.checked_add(1).context(
                    "MASTER_PORT=65535 leaves no port for the NCCL id: set DISTIL_NCCL_ID_PORT",
                )?
            }
            None => master_port,
        };
        let timeout = Duration::from_secs(num("DISTIL_DIST_TIMEOUT")?.unwrap_or(600));
        Ok(Some(DistEnv {
            rank,
            world_size: world,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            id_port,
            timeout,
        }))
    }
}

/// Length of an NCCL unique id (`ncclUniqueId`).
pub const ID_LEN: usize = 128;
const MAGIC: &[u8; 8] = b"distil\x01\x00";

/// Rank 0's side of the id exchange: accepts the other `world_size - 1` ranks on `listener`
/// and sends each `id`. Each rank says who it is first; a stranger on the port is ignored.
pub fn serve_id(
    listener: &TcpListener,
    world_size: usize,
    id: &[u8; ID_LEN],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true)?;
    let mut served = vec![false; world_size];
    served[0] = true;
    while served.iter().any(|s| !s) {
        let (mut stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = (0..world_size)
                        .filter(|&r| !served[r])
                        .map(|r| r.to_string())
                        .collect();
                    bail!(
                        "rank 0: ranks {} did not connect within {} s (DISTIL_DIST_TIMEOUT)",
                        missing.join(", "),
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("rank 0: accepting a rank's connection"),
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = [0u8; 16];
        if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
            eprintln!("rank 0: ignoring a connection from {peer} that is not a distil rank");
            continue;
        }
        let rank = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
        let world = u32::from_le_bytes(hello[12..16].try_into().unwrap()) as usize;
        if world != world_size {
            bail!("rank {rank} (at {peer}) has WORLD_SIZE={world}, rank 0 has {world_size}");
        }
        if rank == 0 || rank >= world_size {
            bail!("a process at {peer} claims RANK={rank} in a world of {world_size}");
        }
        stream.write_all(MAGIC)?;
        stream.write_all(id)?;
        stream.flush()?;
        served[rank] = true;
    }
    Ok(())
}

/// The other ranks' side: connects to rank 0 at `addr:port` (retrying until `timeout`: rank
/// 0 may not be listening yet), says who it is and reads the id.
pub fn fetch_id(
    addr: &str,
    port: u16,
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<[u8; ID_LEN]> {
    let deadline = Instant::now() + timeout;
    let mut last_err = String::new();
    let mut stream = loop {
        let addrs: Vec<_> = match (addr, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last_err = format!("cannot resolve {addr}: {e}");
                Vec::new()
            }
        };
        let connected = addrs.iter().find_map(|a| {
            TcpStream::connect_timeout(a, Duration::from_secs(2))
                .map_err(|e| last_err = e.to_string())
                .ok()
        });
        if let Some(s) = connected {
            break s;
        }
        if Instant::now() > deadline {
            bail!(
                "rank {rank}: cannot reach rank 0 at {addr}:{port} within {} s: {last_err}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_read_timeout(Some(left.max(Duration::from_secs(10))))?;
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world_size as u32).to_le_bytes());
    stream.write_all(&hello)?;
    let mut reply = [0u8; 8 + ID_LEN];
    stream.read_exact(&mut reply).with_context(|| {
        format!("rank {rank}: no NCCL id from {addr}:{port} (is something else listening there? set DISTIL_NCCL_ID_PORT)")
    })?;
    if &reply[..8] != MAGIC {
        bail!("rank {rank}: {addr}:{port} is not distil's rank 0 (another service on the port? set DISTIL_NCCL_ID_PORT)");
    }
    Ok(reply[8..].try_into().unwrap())
}

/// The next batch of `rank` out of `world_size`: of the next `world_size` batches of the
/// shared stream it takes the `rank`-th and steps over the others without building them. The
/// stream's position stays global: after each call it is the same on every rank.
pub fn next_for_rank(
    it: &mut BatchIter,
    rank: usize,
    world_size: usize,
) -> Option<(Position, Batch)> {
    let mut mine = None;
    for r in 0..world_size {
        if r == rank {
            mine = Some(it.next()?);
        } else {
            it.advance()?;
        }
    }
    mine
}

/// A sum over the ranks of a data-parallel run.
pub trait Collective {
    /// The element-wise sum of `t` (f32) over every rank, on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
}

/// This process's rank, the world, and the collective that joins them.
pub struct Dist {
    pub rank: usize,
    pub world_size: usize,
    /// Each rank's CUDA device (`cuda:LOCAL_RANK`), when distributed.
    device: Option<Device>,
    group: Option<Box<dyn Collective>>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dist(rank {} of {})", self.rank, self.world_size)
    }
}

impl Dist {
    /// One process: every collective is the identity.
    pub fn single() -> Dist {
        Dist {
            rank: 0,
            world_size: 1,
            device: None,
            group: None,
        }
    }

    /// A rank joined to the others by `group` (tests: [`LocalGroup`]; GPUs: NCCL).
    pub fn with_group(
        rank: usize,
        world_size: usize,
        device: Option<Device>,
        group: Box<dyn Collective>,
    ) -> Dist {
        Dist {
            rank,
            world_size,
            device,
            group: Some(group),
        }
    }

    /// From the launcher's environment: a single process unless `WORLD_SIZE > 1`.
    pub fn from_env() -> Result<Dist> {
        match DistEnv::from_env()? {
            None => Ok(Dist::single()),
            Some(env) => Self::init(&env),
        }
    }

    #[cfg(not(feature = "nccl"))]
    fn init(env: &DistEnv) -> Result<Dist> {
        bail!(
            "WORLD_SIZE={}: data-parallel training needs NCCL, but this distil was built without the nccl feature (cargo build --release --features nccl)",
            env.world_size
        )
    }

    #[cfg(feature = "nccl")]
    fn init(env: &DistEnv) -> Result<Dist> {
        let device = crate::recipe::DeviceSpec::Cuda(env.local_rank)
            .device()
            .with_context(|| format!("rank {}: LOCAL_RANK={}", env.rank, env.local_rank))?;
        let group = nccl::Nccl::init(env, &device)?;
        Ok(Dist::with_group(
            env.rank,
            env.world_size,
            Some(device),
            Box::new(group),
        ))
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// This rank's device when distributed (`cuda:LOCAL_RANK`).
    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref()
    }

    /// The sum of `t` over the ranks (the identity for a single process).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        match &self.group {
            Some(g) if self.world_size > 1 => g.all_reduce_sum(t),
            _ => Ok(t.clone()),
        }
    }

    /// Sums host values over the ranks, in place, through a tensor on `device`.
    pub fn all_reduce_host(&self, xs: &mut [f64], device: &Device) -> Result<()> {
        if self.world_size == 1 || xs.is_empty() {
            return Ok(());
        }
        let v: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
        let t = Tensor::from_vec(v, xs.len(), device)?;
        let sum = self.all_reduce_sum(&t)?.to_vec1::<f32>()?;
        for (x, s) in xs.iter_mut().zip(sum) {
            *x = s as f64;
        }
        Ok(())
    }

    /// Runs `f` on rank 0 first and on the other ranks once it is done: for work that
    /// writes shared files the others then read (the run directory, a trained tokenizer, the
    /// token cache). `f` is told whether it runs on rank 0. If rank 0 fails, so do the others.
    pub fn rank0_first<T>(&self, device: &Device, f: impl FnOnce(bool) -> Result<T>) -> Result<T> {
        if self.world_size == 1 {
            return f(true);
        }
        if self.is_main() {
            let r = f(true);
            let mut failed = [r.is_err() as u8 as f64];
            self.all_reduce_host(&mut failed, device)?;
            r
        } else {
            let mut failed = [0.0];
            self.all_reduce_host(&mut failed, device)?;
            if failed[0] > 0.0 {
                bail!("rank {}: rank 0 failed (see its output)", self.rank);
            }
            f(false)
        }
    }

    /// Replaces each rank's gradients by their mean over the ranks (sum / world size), in
    /// one all-reduce of every gradient laid end to end. A parameter without a gradient on
    /// this rank contributes zeros if another rank has one, and stays without a gradient if
    /// none has. `vars` must list the same parameters in the same order on every rank.
    pub fn average_gradients(
        &self,
        vars: &BTreeMap<String, Var>,
        grads: &mut BTreeMap<String, Tensor>,
    ) -> Result<()> {
        if self.world_size == 1 || vars.is_empty() {
            return Ok(());
        }
        let device = vars.values().next().unwrap().device().clone();
        let mut present: Vec<f64> = vars
            .keys()
            .map(|k| grads.contains_key(k) as u8 as f64)
            .collect();
        self.all_reduce_host(&mut present, &device)?;
        let mut flat = Vec::new();
        let mut layout = Vec::new();
        for ((name, var), p) in vars.iter().zip(&present) {
            if *p == 0.0 {
                continue;
            }
            let g = match grads.get(name) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                None => Tensor::zeros(var.elem_count(), DType::F32, &device)?,
            };
            flat.push(g);
            layout.push((name, var.shape().clone(), var.elem_count()));
        }
        if flat.is_empty() {
            return Ok(());
        }
        let all = Tensor::cat(&flat, 0)?;
        drop(flat);
        let mean = (self.all_reduce_sum(&all)? / self.world_size as f64)?;
        let mut offset = 0;
        for (name, shape, n) in layout {
            grads.insert(name.clone(), mean.narrow(0, offset, n)?.reshape(shape)?);
            offset += n;
        }
        Ok(())
    }
}

thread_local! {
    static CURRENT: std::cell::OnceCell<Rc<Dist>> = const { std::cell::OnceCell::new() };
}

/// This process's [`Dist`], set up from the environment on first use (NCCL is initialised
/// once, however many runs a command makes: a teacher recipe, then the student's).
pub fn current() -> Result<Rc<Dist>> {
    CURRENT.with(|c| {
        if let Some(d) = c.get() {
            return Ok(d.clone());
        }
        let d = Rc::new(Dist::from_env()?);
        let _ = c.set(d.clone());
        Ok(d)
    })
}

/// Ranks as threads of one process, summing through shared memory: a stand-in for NCCL on
/// the CPU, for tests of the data-parallel loop. Every rank must call each collective in the
/// same order, as with NCCL.
pub struct LocalGroup {
    shared: std::sync::Arc<LocalShared>,
}

struct LocalShared {
    barrier: std::sync::Barrier,
    sum: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LocalGroup {
    /// One handle per rank.
    pub fn new(world_size: usize) -> Vec<LocalGroup> {
        let shared = std::sync::Arc::new(LocalShared {
            barrier: std::sync::Barrier::new(world_size),
            sum: std::sync::Mutex::new(None),
        });
        (0..world_size)
            .map(|_| LocalGroup {
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for LocalGroup {
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let s = &self.shared;
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        // Everyone arrives; everyone adds in; everyone reads; the slot is cleared for the next.
        s.barrier.wait();
        {
            let mut sum = s.sum.lock().unwrap();
            match sum.as_mut() {
                None => *sum = Some(v),
                Some(acc) => {
                    if acc.len() != v.len() {
                        bail!(
                            "all-reduce of {} values meets one of {}",
                            v.len(),
                            acc.len()
                        );
                    }
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a += x;
                    }
                }
            }
        }
        s.barrier.wait();
        let out = s.sum.lock().unwrap().clone().unwrap();
        if s.barrier.wait().is_leader() {
            *s.sum.lock().unwrap() = None;
        }
        s.barrier.wait();
        Ok(Tensor::from_vec(out, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    use super::{fetch_id, serve_id, Collective, DistEnv, ID_LEN};
    use anyhow::{Context, Result};
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, Device, Layout, Tensor};

    /// One NCCL communicator over this rank's device stream (the stream candle runs its
    /// kernels on, so the all-reduce is ordered after the backward pass that made the
    /// gradients).
    pub struct Nccl {
        comm: Comm,
    }

    impl Nccl {
        pub fn init(env: &DistEnv, device: &Device) -> Result<Nccl> {
            let cuda = device.as_cuda_device()?;
            let id = if env.rank == 0 {
                let listener = std::net::TcpListener::bind(("0.0.0.0", env.id_port))
                    .with_context(|| {
                        format!(
                            "rank 0: cannot listen on port {} to hand out the NCCL id (MASTER_PORT in use? set DISTIL_NCCL_ID_PORT)",
                            env.id_port
                        )
                    })?;
                let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {:?}", e.0))?;
                let mut bytes = [0u8; ID_LEN];
                for (b, c) in bytes.iter_mut().zip(id.internal()) {
                    *b = *c as u8;
                }
                serve_id(&listener, env.world_size, &bytes, env.timeout)?;
                id
            } else {
                let bytes = fetch_id(
                    &env.master_addr,
                    env.id_port,
                    env.rank,
                    env.world_size,
                    env.timeout,
                )?;
                let mut internal = [0 as std::ffi::c_char; ID_LEN];
                for (c, b) in internal.iter_mut().zip(bytes) {
                    *c = b as std::ffi::c_char;
                }
                Id::uninit(internal)
            };
            let comm = Comm::from_rank(cuda.cuda_stream(), env.rank, env.world_size, id)
                .map_err(|e| anyhow::anyhow!("rank {}: ncclCommInitRank: {:?}", env.rank, e.0))?;
            Ok(Nccl { comm })
        }
    }

    struct AllReduceSum<'a>(&'a Comm);

    impl candle_core::InplaceOp1 for AllReduceSum<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("the NCCL all-reduce takes CUDA tensors")
        }

        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("nccl all-reduce: non-contiguous tensor");
            };
            let slice = s.as_cuda_slice_mut::<f32>()?;
            let mut view = slice.slice_mut(start..end);
            self.0
                .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {:?}", e.0)))?;
            Ok(())
        }
    }

    impl Collective for Nccl {
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            // A fresh contiguous f32 copy, summed in place.
            let out = t.to_dtype(candle_core::DType::F32)?.contiguous()?.copy()?;
            out.inplace_op1(&AllReduceSum(&self.comm))?;
            Ok(out)
        }
    }
}
