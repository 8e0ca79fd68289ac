//! The token cache (reuse, invalidation, larger-than-chunk streaming) and sequence cutting
//! (line by line, packed, NSP / SOP pairs, held-out split).

mod data_common;

use std::sync::Arc;

use distil::data::cache::TokenCache;
use distil::data::sequences::{
    cut_sequences, Documents, LongLines, SentencePairs, SequenceMode, PIECE_SEGMENT_B,
};
use distil::data::{
    BatchConfig, Batcher, BertVocabOptions, Corpus, CorpusConfig, Masker, Masking, Position,
    SequenceConfig, Tok, WordSegmentation,
};

fn setup(lines: usize, doc_every: Option<usize>) -> (tempfile::TempDir, Tok, Corpus) {
    let dir = tempfile::tempdir().unwrap();
    let lex = data_common::lexicon(800, 3);
    let vocab = data_common::synth_vocab(dir.path(), &lex[..100]);
    let tok = Tok::from_bert_vocab(&vocab, &BertVocabOptions::default()).unwrap();
    let c = data_common::synth_corpus(&dir.path().join("a.txt"), &lex, lines, 3..60, doc_every, 5);
    let corpus = Corpus::open(&CorpusConfig::new([c.to_string_lossy().to_string()])).unwrap();
    (dir, tok, corpus)
}

#[test]
fn second_run_reuses_the_cache_and_a_changed_file_invalidates_it() {
    let (dir, tok, corpus) = setup(3000, None);
    let root = dir.path().join("cache");
    let (c1, r1) =
        TokenCache::build_or_load(&corpus, &tok, WordSegmentation::Tokenizer, &root).unwrap();
    assert!(!r1.reused);
    assert_eq!(r1.tokenized_units, 3000);
    let (c2, r2) =
        TokenCache::build_or_load(&corpus, &tok, WordSegmentation::Tokenizer, &root).unwrap();
    assert!(r2.reused, "second run did not reuse the cache");
    // a freshly loaded tokenizer (new hash maps, new random hasher seeds) keys the same cache
    let vocab = dir.path().join("vocab.txt");
    let fresh = Tok::from_bert_vocab(&vocab, &BertVocabOptions::default()).unwrap();
    assert_eq!(fresh.json(), tok.json());
    let (_, r2b) =
        TokenCache::build_or_load(&corpus, &fresh, WordSegmentation::Tokenizer, &root).unwrap();
    assert!(r2b.reused);
    assert_eq!(r2.tokenized_units, 0, "second run re-tokenised");
    assert_eq!(c1.tokens(), c2.tokens());
    assert_eq!(c1.key(), c2.key());
    // the cache content equals a direct encoding
    let first_line = std::fs::read_to_string(&corpus.files()[0].0)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let direct = tok.encode_batch(&[first_line.as_str()]).unwrap().remove(0);
    assert_eq!(
        &c2.tokens()[c2.unit_range(0).start as usize..c2.unit_range(0).end as usize],
        &direct[..]
    );
    // counts add up
    assert_eq!(c2.counts().iter().sum::<u64>(), c2.tokens().len() as u64);

    // change one byte of the corpus: new key, re-tokenised
    let path = corpus.files()[0].0.clone();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("ka ro mi.\n");
    std::fs::write(&path, text).unwrap();
    let corpus2 = Corpus::open(corpus.config()).unwrap();
    let (c3, r3) =
        TokenCache::build_or_load(&corpus2, &tok, WordSegmentation::Tokenizer, &root).unwrap();
    assert!(
        !r3.reused,
        "a changed corpus file did not invalidate the cache"
    );
    assert_eq!(r3.tokenized_units, 3001);
    assert_ne!(c3.key(), c1.key());
    // a different segmentation is a different cache too
    let (_, r4) =
        TokenCache::build_or_load(&corpus2, &tok, WordSegmentation::Jieba, &root).unwrap();
    assert!(!r4.reused);
    // no temporary directory is left behind
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn corrupt_cache_is_reported_not_trusted() {
    let (dir, tok, corpus) = setup(200, None);
    let root = dir.path().join("cache");
    let (c, _) =
        TokenCache::build_or_load(&corpus, &tok, WordSegmentation::Tokenizer, &root).unwrap();
    let d = c.dir().to_path_buf();
    drop(c);
    let t = d.join("tokens.u32");
    let bytes = std::fs::read(&t).unwrap();
    std::fs::write(&t, &bytes[..bytes.len() - 4]).unwrap();
    let err = TokenCache::open(&d).unwrap_err().to_string();
    assert!(err.contains("tokens.u32"), "{err}");
    assert!(err.contains("delete the directory"), "{err}");
}

#[test]
fn streams_corpora_larger_than_one_chunk() {
    // 8 MiB chunks: a corpus of ~10 MiB crosses chunk boundaries; ids must be identical to a
    // per-line encoding at both ends.
    let dir = tempfile::tempdir().unwrap();
    let lex = data_common::lexicon(800, 3);
    let vocab = data_common::synth_vocab(dir.path(), &lex[..100]);
    let tok = Tok::from_bert_vocab(&vocab, &BertVocabOptions::default()).unwrap();
    let p = data_common::synth_corpus(
        &dir.path().join("big.txt"),
        &lex,
        120_000,
        10..25,
        Some(50),
        9,
    );
    assert!(std::fs::metadata(&p).unwrap().len() > 9 << 20);
    let corpus = Corpus::open(&CorpusConfig::new([p.to_string_lossy().to_string()])).unwrap();
    let (c, r) = TokenCache::build_or_load(
        &corpus,
        &tok,
        WordSegmentation::Tokenizer,
        dir.path().join("cache"),
    )
    .unwrap();
    assert_eq!(r.tokenized_units, 120_000);
    assert_eq!(c.n_units(), 120_000);
    assert_eq!(c.n_docs(), 2400);
    let text = std::fs::read_to_string(&p).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let last = lines.len() - 1;
    let enc = tok.encode_batch(&[lines[last]]).unwrap().remove(0);
    let r = c.unit_range(last);
    assert_eq!(&c.tokens()[r.start as usize..r.end as usize], &enc[..]);
}

fn cache_of(lines: usize, doc_every: Option<usize>) -> (tempfile::TempDir, Tok, Arc<TokenCache>) {
    let (dir, tok, corpus) = setup(lines, doc_every);
    let (c, _) = TokenCache::build_or_load(
        &corpus,
        &tok,
        WordSegmentation::Tokenizer,
        dir.path().join("cache"),
    )
    .unwrap();
    (dir, tok, Arc::new(c))
}

#[test]
fn line_by_line_truncates_or_splits_and_counts() {
    let (_d, tok, cache) = cache_of(2000, None);
    let long = (0..cache.n_units())
        .filter(|&u| {
            let r = cache.unit_range(u);
            r.end - r.start > 30
        })
        .count() as u64;
    assert!(long > 100);
    let sp = tok.special_ids().clone();
    for long_lines in [LongLines::Truncate, LongLines::Split] {
        let cfg = SequenceConfig {
            mode: SequenceMode::LineByLine,
            block_size: 32,
            long_lines,
            ..SequenceConfig::default()
        };
        let s = cut_sequences(cache.clone(), &tok, &cfg).unwrap();
        match long_lines {
            LongLines::Truncate => {
                assert_eq!(s.stats.truncated_units, long);
                assert_eq!(s.train.len(), cache.n_units());
            }
            LongLines::Split => {
                assert_eq!(s.stats.split_units, long);
                assert!(s.train.len() > cache.n_units());
                // every token appears exactly once
                let total: u64 = (0..s.train.len())
                    .map(|i| s.train.pieces(i).iter().map(|p| p.len as u64).sum::<u64>())
                    .sum();
                assert_eq!(total, cache.tokens().len() as u64);
            }
        }
        for i in 0..s.train.len() {
            let (mut ids, mut ty, mut fl) = (vec![], vec![], vec![]);
            s.train.append_row(i, &mut ids, &mut ty, &mut fl);
            assert!(ids.len() <= 32);
            assert_eq!(ids[0], sp.cls);
            assert_eq!(*ids.last().unwrap(), sp.sep);
            assert_eq!(ids.len(), s.train.lengths()[i] as usize);
        }
        // reused on a second call
        assert!(cut_sequences(cache.clone(), &tok, &cfg).unwrap().reused);
    }
}

#[test]
fn packed_blocks_are_full_and_cover_every_token() {
    let (_d, tok, cache) = cache_of(2000, None);
    let cfg = SequenceConfig {
        mode: SequenceMode::Packed,
        block_size: 64,
        ..SequenceConfig::default()
    };
    let s = cut_sequences(cache.clone(), &tok, &cfg).unwrap();
    let n = s.train.len();
    let sep = tok.special_ids().sep;
    let mut content = 0u64;
    let mut seps = 0u64;
    for i in 0..n {
        let (mut ids, mut ty, mut fl) = (vec![], vec![], vec![]);
        s.train.append_row(i, &mut ids, &mut ty, &mut fl);
        if i + 1 < n {
            assert_eq!(ids.len(), 64, "block {i} is not full");
        }
        assert_eq!(ids[0], tok.special_ids().cls);
        assert!(ty.iter().all(|&t| t == 0));
        seps += ids.iter().filter(|&&t| t == sep).count() as u64;
        content += ids.len() as u64 - 1;
    }
    assert_eq!(
        content - seps,
        cache.tokens().len() as u64,
        "tokens lost or repeated"
    );
    // one separator after each unit, except those that end exactly at a block end
    assert!(seps <= cache.n_units() as u64 && seps + n as u64 >= cache.n_units() as u64);
}

#[test]
fn nsp_and_sop_pairs() {
    let (_d, tok, cache) = cache_of(3000, Some(10));
    let sp = tok.special_ids().clone();
    for task in [SentencePairs::Nsp, SentencePairs::Sop] {
        let cfg = SequenceConfig {
            pairs: Some(task),
            block_size: 96,
            documents: Documents::BlankLines,
            ..SequenceConfig::default()
        };
        let s = cut_sequences(cache.clone(), &tok, &cfg).unwrap();
        let n = s.train.len();
        assert!(n > 500);
        let pos = (0..n)
            .filter(|&i| s.train.sentence_label(i) == Some(1))
            .count();
        let frac = pos as f64 / n as f64;
        println!("{task:?}: {n} pairs, {frac:.3} positive");
        assert!((frac - 0.5).abs() < 0.05, "{task:?} label balance {frac}");
        for i in 0..n {
            let (mut ids, mut ty, mut fl) = (vec![], vec![], vec![]);
            s.train.append_row(i, &mut ids, &mut ty, &mut fl);
            assert!(ids.len() <= 96);
            // [CLS] A [SEP] B [SEP], type ids 0 then 1
            assert_eq!(ids[0], sp.cls);
            assert_eq!(ids.iter().filter(|&&t| t == sp.sep).count(), 2, "pair {i}");
            let first_sep = ids.iter().position(|&t| t == sp.sep).unwrap();
            assert!(first_sep >= 2 && first_sep + 2 < ids.len());
            assert!(ty[..=first_sep].iter().all(|&t| t == 0));
            assert!(ty[first_sep + 1..].iter().all(|&t| t == 1));
            assert_eq!(*ids.last().unwrap(), sp.sep);
            assert!(s
                .train
                .pieces(i)
                .iter()
                .any(|p| p.flags & PIECE_SEGMENT_B != 0));
        }
        if task == SentencePairs::Sop {
            // a swapped pair's A comes after its B in the cache
            for i in 0..n {
                let p = s.train.pieces(i);
                let a = p
                    .iter()
                    .find(|p| p.flags & PIECE_SEGMENT_B == 0)
                    .unwrap()
                    .start;
                let b = p
                    .iter()
                    .find(|p| p.flags & PIECE_SEGMENT_B != 0)
                    .unwrap()
                    .start;
                assert_eq!(s.train.sentence_label(i) == Some(1), a > b, "pair {i}");
            }
        }
        // batches carry the labels
        let masker = Arc::new(Masker::new(&Masking::default(), &tok, None).unwrap());
        let b = Batcher::new(s.train.clone(), masker, BatchConfig::new(4), 1, &tok).unwrap();
        let (_, batch) = b.iter_from(Position::default()).next().unwrap();
        assert_eq!(batch.sentence_labels.as_ref().map(Vec::len), Some(4));
        assert!(batch.token_type_ids.contains(&1));
    }
}

#[test]
fn held_out_split_is_deterministic_and_disjoint() {
    let (_d, tok, cache) = cache_of(3000, None);
    let cfg = SequenceConfig {
        mode: SequenceMode::LineByLine,
        eval_fraction: 0.1,
        seed: 7,
        ..SequenceConfig::default()
    };
    let s = cut_sequences(cache.clone(), &tok, &cfg).unwrap();
    let eval = s.eval.clone().unwrap();
    let frac = eval.len() as f64 / (eval.len() + s.train.len()) as f64;
    assert!((frac - 0.1).abs() < 0.02, "held-out fraction {frac}");
    let starts = |set: &distil::data::SequenceSet| {
        (0..set.len())
            .map(|i| set.pieces(i)[0].start)
            .collect::<std::collections::HashSet<_>>()
    };
    let (tr, ev) = (starts(&s.train), starts(&eval));
    assert!(tr.is_disjoint(&ev));
    assert_eq!(tr.len() + ev.len(), cache.n_units());
    // same seed, same split (rebuilt from scratch in a new cache directory)
    let (_d2, tok2, cache2) = cache_of(3000, None);
    let s2 = cut_sequences(cache2, &tok2, &cfg).unwrap();
    assert_eq!(starts(s2.eval.as_ref().unwrap()), ev);
    // another seed, another split
    let s3 = cut_sequences(cache, &tok, &SequenceConfig { seed: 8, ..cfg }).unwrap();
    assert_ne!(starts(s3.eval.as_ref().unwrap()), ev);
}

#[test]
fn prepare_from_a_yaml_data_section() {
    let d = tempfile::tempdir().unwrap();
    let lex = data_common::lexicon(300, 2);
    let vocab = data_common::synth_vocab(d.path(), &lex[..50]);
    let tok = Tok::from_bert_vocab(&vocab, &BertVocabOptions::default()).unwrap();
    let txt = data_common::synth_corpus(&d.path().join("t.txt"), &lex, 2000, 5..40, None, 1);
    let jsonl = d.path().join("docs.jsonl");
    let text = std::fs::read_to_string(&txt).unwrap();
    let recs: Vec<String> = text
        .lines()
        .collect::<Vec<_>>()
        .chunks(4)
        .map(|c| serde_json::json!({"id": 1, "body": c.join("\n")}).to_string())
        .collect();
    std::fs::write(&jsonl, recs.join("\n") + "\n").unwrap();
    let yaml = format!(
        "corpus: {{paths: ['{}'], text_field: body}}\nsequences: {{mode: packed, block_size: 64, eval_fraction: 0.1}}\nmasking: {{strategy: whole_word, probability: 0.15}}\ncache_dir: '{}'\n",
        jsonl.display(),
        d.path().join("cache").display()
    );
    let cfg: distil::data::DataConfig = serde_yaml::from_str(&yaml).unwrap();
    let p = distil::data::prepare(&cfg, &tok).unwrap();
    assert!(!p.cache_report.reused && !p.splits.reused);
    assert_eq!(p.cache.n_docs(), 500);
    let again = distil::data::prepare(&cfg, &tok).unwrap();
    assert!(again.cache_report.reused && again.splits.reused);
    assert_eq!(again.cache_report.tokenized_units, 0);
    let train = p.train_batcher(&cfg, BatchConfig::new(8), 3, &tok).unwrap();
    let (_, b) = train.iter_from(Position::default()).next().unwrap();
    assert_eq!((b.batch_size, b.seq_len), (8, 64));
    assert!(b.masked_tokens() > 0);
    let eval = p.eval_batcher(&cfg, 8, 3, &tok).unwrap().unwrap();
    let e1: Vec<_> = eval.epoch(0).collect();
    let e2: Vec<_> = eval.epoch(0).collect();
    assert!(!e1.is_empty());
    assert_eq!(e1, e2, "evaluation batches must be identical across reads");
    let unknown =
        serde_yaml::from_str::<distil::data::DataConfig>("corpus: {paths: [a]}\nmask: {}\n")
            .unwrap_err()
            .to_string();
    assert!(unknown.contains("mask"), "{unknown}");
}
