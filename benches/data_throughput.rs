//! Throughput of tokenise + mask + batch on `../shared/corpora/en/wikipedia-leads.txt` with the
//! all-MiniLM-L6-v2 tokenizer: line by line, block 128, batch 16, token-level and whole-word
//! masking. Compare with `benches/data_throughput.py` (Hugging Face tokenizers + collators).
//!
//! Run: `cargo bench --bench data_throughput` (set `DISTIL_SHARED` if `../shared` is elsewhere).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use distil::data::sequences::{LongLines, SequenceMode};
use distil::data::{
    cut_sequences, BatchConfig, Batcher, Corpus, CorpusConfig, Masker, Masking, SequenceConfig,
    Tok, TokenCache, WordSegmentation,
};

fn shared() -> Option<PathBuf> {
    let p = std::env::var_os("DISTIL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    p.is_dir().then_some(p)
}

fn main() {
    let Some(shared) = shared() else {
        println!("SKIPPED data_throughput: ../shared not found (set DISTIL_SHARED)");
        return;
    };
    let snaps =
        shared.join("hf-home/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots");
    let snap = std::fs::read_dir(snaps)
        .expect("snapshots")
        .next()
        .expect("a snapshot")
        .expect("entry")
        .path();
    let tok = Tok::from_tokenizer_json(snap.join("tokenizer.json")).expect("tokenizer");
    let text = shared.join("corpora/en/wikipedia-leads.txt");
    let corpus =
        Corpus::open(&CorpusConfig::new([text.to_string_lossy().to_string()])).expect("corpus");
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!(
        "corpus {} ({:.1} MB), rayon threads {}",
        text.display(),
        corpus.total_bytes().unwrap() as f64 / 1e6,
        rayon::current_num_threads()
    );
    for strategy in ["token", "whole_word"] {
        let masking: Masking =
            serde_yaml::from_str(&format!("{{strategy: {strategy}, probability: 0.15}}")).unwrap();
        let mut best = (f64::MAX, f64::MAX, 0usize, 0usize);
        let mut warm = f64::MAX;
        for _ in 0..rounds {
            let dir = tempfile::tempdir().unwrap();
            let t0 = Instant::now();
            let (cache, report) =
                TokenCache::build_or_load(&corpus, &tok, WordSegmentation::Tokenizer, dir.path())
                    .expect("cache");
            assert!(!report.reused);
            let splits = cut_sequences(
                Arc::new(cache),
                &tok,
                &SequenceConfig {
                    mode: SequenceMode::LineByLine,
                    block_size: 128,
                    long_lines: LongLines::Truncate,
                    ..SequenceConfig::default()
                },
            )
            .expect("sequences");
            let t_tok = t0.elapsed().as_secs_f64();
            let masker = Arc::new(Masker::new(&masking, &tok, None).unwrap());
            let b = Batcher::new(splits.train, masker, BatchConfig::new(16), 0, &tok).unwrap();
            let t1 = Instant::now();
            let mut real = 0usize;
            let mut batches = 0usize;
            for batch in b.epoch(0) {
                real += batch.real_tokens();
                batches += 1;
                std::hint::black_box(&batch);
            }
            let t_batch = t1.elapsed().as_secs_f64();
            // a second run finds the cache: only the corpus hash is computed
            let t2 = Instant::now();
            let (_, again) =
                TokenCache::build_or_load(&corpus, &tok, WordSegmentation::Tokenizer, dir.path())
                    .expect("cache");
            assert!(again.reused && again.tokenized_units == 0);
            warm = warm.min(t2.elapsed().as_secs_f64());
            if t_tok + t_batch < best.0 + best.1 {
                best = (t_tok, t_batch, real, batches);
            }
        }
        let (t_tok, t_batch, real, batches) = best;
        println!(
            "rust {strategy:<10}: {real} tokens in {batches} batches of 16x<=128 | tokenise+cache {t_tok:.3}s, mask+batch {t_batch:.3}s | end-to-end {:.0} tokens/s, mask+batch alone {:.0} tokens/s",
            real as f64 / (t_tok + t_batch),
            real as f64 / t_batch
        );
        println!(
            "rust {strategy:<10}: warm cache (second run, nothing re-tokenised) opens in {warm:.3}s -> {:.0} tokens/s end-to-end",
            real as f64 / (warm + t_batch)
        );
    }
}
