//! Data-parallel training, the parts that need no GPU: the launcher's environment, the TCP
//! exchange of the NCCL id, the sharding of the batch stream, and the whole loop with ranks
//! as threads summing through shared memory (`LocalGroup` in place of NCCL): two ranks
//! train as one process taking both ranks' batches in turn does, and a run resumes with
//! another world size.

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use distil::data::Position;
use distil::recipe::{self, LoadedRecipe};
use distil::train::distributed::{
    fetch_id, next_for_rank, serve_id, Dist, DistEnv, LocalGroup, ID_LEN,
};
use distil::train::run_dir::RunDir;
use distil::train::setup;
use distil::train::trainer::Trainer;
use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

fn env(vars: &[(&str, &str)]) -> anyhow::Result<Option<DistEnv>> {
    let m: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    DistEnv::from_lookup(|k| m.get(k).cloned())
}

#[test]
fn launcher_environment() {
    assert_eq!(env(&[]).unwrap(), None);
    assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
    let full = [
        ("WORLD_SIZE", "4"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ];
    let e = env(&full).unwrap().unwrap();
    assert_eq!(
        (
            e.rank,
            e.world_size,
            e.local_rank,
            e.master_addr.as_str(),
            e.id_port
        ),
        (3, 4, 1, "node0", 29500)
    );
    assert_eq!(e.timeout, Duration::from_secs(600));
    // Under torchrun its agent holds MASTER_PORT: the id goes over the next port, unless
    // DISTIL_NCCL_ID_PORT says otherwise.
    let mut torchrun = full.to_vec();
    torchrun.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
    assert_eq!(env(&torchrun).unwrap().unwrap().id_port, 29501);
    torchrun.push(("DISTIL_NCCL_ID_PORT", "40000"));
    assert_eq!(env(&torchrun).unwrap().unwrap().id_port, 40000);
    let err = |vars: &[(&str, &str)]| env(vars).unwrap_err().to_string();
    let without =
        |k: &str| -> Vec<(&str, &str)> { full.iter().copied().filter(|(n, _)| *n != k).collect() };
    assert!(err(&without("RANK")).contains("WORLD_SIZE=4 but RANK is not set"));
    assert!(err(&without("LOCAL_RANK")).contains("LOCAL_RANK is not set"));
    assert!(err(&without("MASTER_ADDR")).contains("MASTER_ADDR is not set"));
    assert!(err(&without("MASTER_PORT")).contains("MASTER_PORT is not set"));
    let mut bad = full.to_vec();
    bad[1] = ("RANK", "4");
    assert!(err(&bad).contains("RANK=4 is out of range for WORLD_SIZE=4"));
    bad[1] = ("RANK", "one");
    assert!(err(&bad).contains("RANK=\"one\" is not a non-negative integer"));
    let mut bad = full.to_vec();
    bad[4] = ("MASTER_PORT", "70000");
    assert!(err(&bad).contains("MASTER_PORT=70000 is not a TCP port"));
}

#[test]
fn rank0_hands_the_nccl_id_to_every_rank_over_tcp() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut id = [0u8; ID_LEN];
    for (i, b) in id.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let world = 4;
    let timeout = Duration::from_secs(20);
    let server = std::thread::spawn(move || serve_id(&listener, world, &id, timeout));
    // Something that is not a rank connects first and is ignored.
    let mut stranger = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut stranger, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let clients: Vec<_> = (1..world)
        .map(|rank| std::thread::spawn(move || fetch_id("localhost", port, rank, world, timeout)))
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), id);
    }
    server.join().unwrap().unwrap();

    // A rank with another idea of the world size is an error on rank 0.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || serve_id(&listener, 2, &id, timeout));
    let client = std::thread::spawn(move || fetch_id("127.0.0.1", port, 1, 3, timeout));
    let e = server.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("has WORLD_SIZE=3, rank 0 has 2"), "{e}");
    assert!(client.join().unwrap().is_err());

    // Nobody listening: the rank gives up after the timeout, saying where it looked.
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let e = fetch_id("127.0.0.1", port, 2, 3, Duration::from_millis(500))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("rank 2: cannot reach rank 0 at 127.0.0.1:{port}")),
        "{e}"
    );
    // And rank 0 reports the ranks that never came.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = serve_id(&listener, 3, &id, Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ranks 1, 2 did not connect"), "{e}");
}

fn recipe_text(tmp: &Path, out: &str, accum: usize, max_steps: u64) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    format!(
        "task: pretrain
model:
  config: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}}
tokenizer: {{load: {root}/tests/fixtures/tokenizer}}
data:
  corpus: {{paths: [{root}/data/shakespeare/tempest.txt]}}
  sequences: {{block_size: 32}}
  cache_dir: {tmp}/cache
training:
  output_dir: {tmp}/{out}
  per_device_train_batch_size: 4
  gradient_accumulation_steps: {accum}
  learning_rate: 1.0e-3
  weight_decay: 0.01
  max_steps: {max_steps}
  save_steps: 2
  logging_steps: 1
",
        root = root.display(),
        tmp = tmp.display(),
    )
}

fn load(tmp: &Path, out: &str, accum: usize, max_steps: u64) -> LoadedRecipe {
    recipe::parse(
        &recipe_text(tmp, out, accum, max_steps),
        Path::new("dp.yaml"),
        &[],
    )
    .unwrap()
}

#[test]
fn ranks_share_the_batch_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = load(tmp.path(), "run", 1, 1);
    let r = &loaded.recipe;
    let tok = setup::tokenizer(r, tmp.path(), false).unwrap();
    let data = setup::data(r, &tok).unwrap();
    let per_epoch = data.train.batches_per_epoch() as u64;
    assert!(per_epoch > 10, "{per_epoch} batches an epoch");
    // The single stream, into the second epoch.
    let all: Vec<_> = data
        .train
        .iter_from(Position::default())
        .take(per_epoch as usize + 12)
        .collect();
    let world = 3;
    let mut iters: Vec<_> = (0..world)
        .map(|_| data.train.iter_from(Position::default()))
        .collect();
    let mut single = data.train.iter_from(Position::default());
    let mut k = 0;
    while k + world <= all.len() {
        for (rank, it) in iters.iter_mut().enumerate() {
            let (pos, batch) = next_for_rank(it, rank, world).unwrap();
            assert_eq!(pos, all[k + rank].0, "rank {rank}");
            assert_eq!(batch, all[k + rank].1, "rank {rank} at {pos:?}");
        }
        k += world;
        // The position is global: the same on every rank, where one process would be.
        for _ in 0..world {
            single.next();
        }
        for it in &iters {
            assert_eq!(it.position(), single.position());
        }
    }
    assert_eq!(all[k - 1].0.epoch, 1, "the test crosses an epoch boundary");
}

/// Trains `loaded` as `world` ranks on threads (or one process for `world == 1`) and returns
/// rank 0's final weights. `resume` continues from the run directory's latest checkpoint.
fn train(loaded: &LoadedRecipe, world: usize, resume: bool) -> BTreeMap<String, Tensor> {
    let groups = LocalGroup::new(world);
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(rank, group)| {
            let loaded = loaded.clone();
            std::thread::spawn(move || {
                let r = &loaded.recipe;
                let dist = if world == 1 {
                    Dist::single()
                } else {
                    Dist::with_group(rank, world, None, Box::new(group))
                };
                let run_dir = if rank == 0 {
                    RunDir::open(&r.training.output_dir, false, resume).unwrap()
                } else {
                    RunDir {
                        root: r.training.output_dir.clone(),
                    }
                };
                let tok = setup::tokenizer(r, &run_dir.root, false).unwrap();
                let data = setup::data(r, &tok).unwrap();
                let model = setup::model(r, &tok, &Device::Cpu, false).unwrap();
                let stop = AtomicBool::new(false);
                let trainer = Trainer::mlm(&model, &tok, &data.train, None, &r.training, &stop);
                let s = trainer.run_on(&run_dir, resume, &dist).unwrap();
                assert_eq!(s.steps, r.training.max_steps.unwrap());
                model.params.snapshot(DType::F32).unwrap()
            })
        })
        .collect();
    let mut weights: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Every rank applied the same updates to the same weights.
    for (rank, w) in weights.iter().enumerate().skip(1) {
        for (k, v) in w {
            assert_eq!(max_abs_diff(v, &weights[0][k]), 0.0, "rank {rank}: {k}");
        }
    }
    weights.swap_remove(0)
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

fn assert_close(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, what: &str) {
    assert_eq!(a.len(), b.len());
    for (k, v) in a {
        let d = max_abs_diff(v, &b[k]);
        assert!(d < 2e-5, "{what}: {k} differs by {d}");
    }
}

#[test]
fn two_ranks_train_as_one_process_with_twice_the_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    // One process, accumulating 2 micro-batches a step, 6 steps.
    let single = train(&load(tmp.path(), "single", 2, 6), 1, false);
    // Two ranks, one micro-batch each: the same batches, the same dropout masks, the
    // gradients summed in another order.
    let dp = load(tmp.path(), "dp", 1, 6);
    let two = train(&dp, 2, false);
    assert_close(&single, &two, "2 ranks vs 1 process");
    let (l1, l2) = (
        losses(&tmp.path().join("single")),
        losses(&tmp.path().join("dp")),
    );
    assert_eq!(l1.len(), 6);
    assert_eq!(l2.len(), 6, "rank 0 alone writes the metrics");
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() < 1e-4, "losses {l1:?} vs {l2:?}");
    }
    // Rank 0 alone wrote the run: checkpoints 2 and 4, the final model.
    let dp_dir = tmp.path().join("dp");
    assert!(dp_dir.join("checkpoint-2/trainer_state.json").is_file());
    assert!(dp_dir.join("checkpoint-4/trainer_state.json").is_file());
    assert!(dp_dir.join("model.safetensors").is_file());

    // Resume with another world size: the 2-rank run's checkpoint at step 4, continued by
    // one process (accumulating 2) to step 6, ends where both uninterrupted runs did. (Without
    // the final trainer state, as if the runs had stopped at step 4: a finished run's resume
    // only evaluates its final model.)
    for run in ["dp", "single"] {
        std::fs::remove_file(tmp.path().join(run).join("trainer_state.json")).unwrap();
    }
    let resumed = train(&load(tmp.path(), "dp", 2, 6), 1, true);
    assert_close(&two, &resumed, "2 ranks, resumed by 1 process");
    // And the other way: the single run's checkpoint at step 4, continued by 2 ranks.
    let again = train(&load(tmp.path(), "single", 1, 6), 2, true);
    assert_close(&single, &again, "1 process, resumed by 2 ranks");
}

#[cfg(not(feature = "nccl"))]
#[test]
fn world_size_above_one_needs_the_nccl_feature() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("r.yaml");
    std::fs::write(&p, recipe_text(tmp.path(), "run", 1, 2)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_distil"))
        .args(["run", p.to_str().unwrap(), "--quiet"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "29500")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("WORLD_SIZE=2: data-parallel training needs NCCL, but this distil was built without the nccl feature"),
        "{err}"
    );
    // WORLD_SIZE=1 is a single process, as without the variables.
    let o = Command::new(env!("CARGO_BIN_EXE_distil"))
        .args(["run", p.to_str().unwrap(), "--quiet"])
        .env("WORLD_SIZE", "1")
        .env("RANK", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
