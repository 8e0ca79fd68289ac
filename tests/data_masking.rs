//! Statistical tests of the masking strategies over more than 100k tokens of a synthetic
//! corpus (Zipf-distributed pseudo-words, WordPiece vocabulary with `##` pieces).

mod data_common;

use std::sync::Arc;

use distil::data::cache::FLAG_WORD_START;
use distil::data::masking::{
    MaskStats, NgramMasking, PhraseMasking, SpanMasking, TokenMasking, WholeWordMasking,
};
use distil::data::sequences::{LongLines, SequenceMode};
use distil::data::{
    prepare, BatchConfig, Batcher, BertVocabOptions, CorpusConfig, DataConfig, Masker, Masking,
    Position, Prepared, SequenceConfig, Tok,
};

struct Fixture {
    _dir: tempfile::TempDir,
    tok: Tok,
    data: Prepared,
    lex: Vec<String>,
}

fn fixture(masking: &Masking, mode: SequenceMode) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let lex = data_common::lexicon(1500, 7);
    // a few frequent words get their own vocabulary entry, the rest split into ## pieces
    let vocab = data_common::synth_vocab(dir.path(), &lex[..200]);
    let tok = Tok::from_bert_vocab(&vocab, &BertVocabOptions::default()).unwrap();
    let corpus = data_common::synth_corpus(&dir.path().join("c.txt"), &lex, 4000, 8..30, None, 11);
    let cfg = DataConfig {
        corpus: CorpusConfig::new([corpus.to_string_lossy().to_string()]),
        sequences: SequenceConfig {
            mode,
            block_size: 128,
            long_lines: LongLines::Split,
            ..SequenceConfig::default()
        },
        masking: masking.clone(),
        cache_dir: Some(dir.path().join("cache")),
    };
    let data = prepare(&cfg, &tok).unwrap();
    assert!(
        data.cache.tokens().len() > 100_000,
        "fixture has only {} tokens",
        data.cache.tokens().len()
    );
    Fixture {
        _dir: dir,
        tok,
        data,
        lex,
    }
}

/// One checked row: (original ids, original flags, masked batch row, labels).
type CheckedRow = (Vec<u32>, Vec<u8>, Vec<u32>, Vec<i64>);

/// Rows of one epoch.
struct Checked {
    stats: MaskStats,
    rows: Vec<CheckedRow>,
}

fn run_epoch(f: &Fixture, masking: &Masking, record: bool) -> Checked {
    let masker = Masker::new(masking, &f.tok, Some(f.data.cache.counts())).unwrap();
    let b = Batcher::new(
        f.data.splits.train.clone(),
        Arc::new(masker),
        BatchConfig::new(16),
        1234,
        &f.tok,
    )
    .unwrap();
    let seqs = b.sequences().clone();
    let mut stats = MaskStats {
        record_units: record,
        ..MaskStats::default()
    };
    let mut rows = Vec::new();
    let pad = f.tok.special_ids().pad;
    for (i, plan) in b.epoch_plan(0).iter().enumerate() {
        let mut unit_stats = MaskStats {
            record_units: record,
            ..MaskStats::default()
        };
        let batch = b.make_batch(
            plan,
            Position {
                epoch: 0,
                index: i as u64,
            },
            Some(&mut unit_stats),
        );
        for (r, &s) in plan.iter().enumerate() {
            let (mut ids, mut ty, mut fl) = (Vec::new(), Vec::new(), Vec::new());
            seqs.append_row(s as usize, &mut ids, &mut ty, &mut fl);
            let o = r * batch.seq_len;
            let row = batch.input_ids[o..o + batch.seq_len].to_vec();
            let lab = batch.labels[o..o + batch.seq_len].to_vec();
            // padding: never labelled, pad id, attention 0
            for j in ids.len()..batch.seq_len {
                assert_eq!(row[j], pad);
                assert_eq!(lab[j], -100, "padding position labelled");
                assert_eq!(batch.attention_mask[o + j], 0);
            }
            rows.push((ids, fl, row, lab));
        }
        stats.candidates += unit_stats.candidates;
        stats.selected += unit_stats.selected;
        stats.replaced_mask += unit_stats.replaced_mask;
        stats.replaced_random += unit_stats.replaced_random;
        stats.kept += unit_stats.kept;
        stats.units.extend(unit_stats.units);
    }
    Checked { stats, rows }
}

/// Checks invariants common to all strategies; returns (selected, candidates, mask, random,
/// kept) counted from the batches themselves.
fn check_invariants(f: &Fixture, c: &Checked) -> (u64, u64, u64, u64, u64) {
    let mask_id = f.tok.special_ids().mask;
    let (mut sel, mut cand, mut m, mut r, mut k) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for (ids, _fl, row, lab) in &c.rows {
        for j in 0..ids.len() {
            let special = f.tok.is_special(ids[j]);
            if !special {
                cand += 1;
            }
            if lab[j] == -100 {
                assert_eq!(row[j], ids[j], "unlabelled position changed");
                continue;
            }
            assert!(!special, "special token {} was masked", ids[j]);
            assert_eq!(lab[j], ids[j] as i64, "label is not the original id");
            sel += 1;
            if row[j] == mask_id {
                m += 1;
            } else if row[j] == ids[j] {
                k += 1;
            } else {
                assert!(!f.tok.is_special(row[j]), "random replacement is special");
                r += 1;
            }
        }
    }
    assert_eq!(sel, c.stats.selected);
    assert_eq!(cand, c.stats.candidates);
    (sel, cand, m, r, k)
}

/// Word spans (over non-special tokens) of a row.
fn word_spans(ids: &[u32], fl: &[u8], tok: &Tok) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut open = false;
    for j in 0..ids.len() {
        if tok.is_special(ids[j]) {
            open = false;
        } else if open && fl[j] & FLAG_WORD_START == 0 {
            out.last_mut().unwrap().1 = j + 1;
        } else {
            out.push((j, j + 1));
            open = true;
        }
    }
    out
}

#[test]
fn token_masking_rate_and_80_10_10() {
    let masking = Masking::Token(TokenMasking::default());
    let f = fixture(&masking, SequenceMode::LineByLine);
    let c = run_epoch(&f, &masking, false);
    let (sel, cand, m, r, k) = check_invariants(&f, &c);
    assert!(cand > 100_000, "only {cand} candidate tokens");
    let frac = sel as f64 / cand as f64;
    let (fm, fr, fk) = (
        m as f64 / sel as f64,
        r as f64 / sel as f64,
        k as f64 / sel as f64,
    );
    println!("token masking over {cand} tokens: selected {frac:.4}, mask {fm:.4} random {fr:.4} keep {fk:.4}");
    assert!((frac - 0.15).abs() < 0.002, "masked fraction {frac}");
    assert!((fm - 0.8).abs() < 0.015, "[MASK] share {fm}");
    assert!((fr - 0.1).abs() < 0.01, "random share {fr}");
    assert!((fk - 0.1).abs() < 0.01, "keep share {fk}");
}

#[test]
fn token_masking_custom_rate_and_split() {
    let masking: Masking = serde_yaml::from_str(
        "{strategy: token, probability: 0.3, replace: {mask: 0.5, random: 0.25}}",
    )
    .unwrap();
    let f = fixture(&masking, SequenceMode::Packed);
    let c = run_epoch(&f, &masking, false);
    let (sel, cand, m, r, k) = check_invariants(&f, &c);
    let frac = sel as f64 / cand as f64;
    assert!((frac - 0.3).abs() < 0.002, "masked fraction {frac}");
    assert!((m as f64 / sel as f64 - 0.5).abs() < 0.015);
    assert!((r as f64 / sel as f64 - 0.25).abs() < 0.015);
    assert!((k as f64 / sel as f64 - 0.25).abs() < 0.015);
}

#[test]
fn whole_word_masking_never_splits_a_word() {
    let masking = Masking::WholeWord(WholeWordMasking::default());
    let f = fixture(&masking, SequenceMode::LineByLine);
    let c = run_epoch(&f, &masking, false);
    let (sel, cand, ..) = check_invariants(&f, &c);
    let mut multi_piece_masked = 0;
    for (ids, fl, _row, lab) in &c.rows {
        for (s, e) in word_spans(ids, fl, &f.tok) {
            let n = lab[s..e].iter().filter(|&&l| l != -100).count();
            assert!(
                n == 0 || n == e - s,
                "word {s}..{e} partly masked: {:?}",
                &lab[s..e]
            );
            if n > 1 {
                multi_piece_masked += 1;
            }
        }
    }
    let frac = sel as f64 / cand as f64;
    println!("whole-word: fraction {frac:.4}, {multi_piece_masked} multi-piece words masked");
    assert!(
        multi_piece_masked > 1000,
        "too few multi-piece words masked"
    );
    assert!((frac - 0.15).abs() < 0.005, "masked fraction {frac}");
}

#[test]
fn span_lengths_follow_the_clipped_geometric_law() {
    let cfg = SpanMasking::default();
    let law = cfg.length_law();
    let masking = Masking::Span(cfg);
    let f = fixture(&masking, SequenceMode::Packed);
    let c = run_epoch(&f, &masking, true);
    let (sel, cand, ..) = check_invariants(&f, &c);
    let mut observed = vec![0u64; law.len()];
    let mut whole = 0u64;
    for u in &c.stats.units {
        assert!(u.words >= 1 && u.words <= u.sampled_words && u.sampled_words <= 10);
        observed[u.sampled_words as usize - 1] += 1;
        whole += u64::from(u.words == u.sampled_words);
    }
    let probs: Vec<f64> = law.iter().map(|x| x.1).collect();
    let chi = data_common::chi_square(&observed, &probs);
    let n: u64 = observed.iter().sum();
    println!("span: {n} spans, chi-square {chi:.2} (df 9), observed {observed:?}, {whole} not truncated, fraction {:.4}", sel as f64 / cand as f64);
    assert!(n > 3000, "only {n} spans");
    // 99.9% quantile of chi-square with 9 degrees of freedom
    assert!(
        chi < 27.88,
        "span lengths do not follow the law: chi-square {chi}"
    );
    assert!(whole as f64 / n as f64 > 0.6, "too many truncated spans");
    assert!((sel as f64 / cand as f64 - 0.15).abs() < 0.005);
    // spans are whole words and contiguous
    for (ids, fl, _row, lab) in &c.rows {
        for (s, e) in word_spans(ids, fl, &f.tok) {
            let n = lab[s..e].iter().filter(|&&l| l != -100).count();
            assert!(n == 0 || n == e - s, "span split a word");
        }
    }
}

#[test]
fn ngram_lengths_follow_one_over_n() {
    let cfg = NgramMasking::default();
    let law = cfg.length_law().unwrap();
    let masking = Masking::Ngram(cfg);
    let f = fixture(&masking, SequenceMode::Packed);
    let c = run_epoch(&f, &masking, true);
    check_invariants(&f, &c);
    let mut observed = vec![0u64; 3];
    for u in &c.stats.units {
        observed[u.sampled_words as usize - 1] += 1;
    }
    let probs: Vec<f64> = law.iter().map(|x| x.1).collect();
    let chi = data_common::chi_square(&observed, &probs);
    println!("ngram: observed {observed:?}, expected {probs:?}, chi-square {chi:.2}");
    // 99.9% quantile, 2 degrees of freedom
    assert!(chi < 13.82, "chi-square {chi}");
}

#[test]
fn smoothing_prefers_rare_tokens() {
    let plain = Masking::Token(TokenMasking::default());
    let smooth = Masking::Token(TokenMasking {
        smoothing: Some(0.7),
        ..TokenMasking::default()
    });
    let f = fixture(&plain, SequenceMode::LineByLine);
    let counts = f.data.cache.counts();
    let top = (0..counts.len()).max_by_key(|&i| counts[i]).unwrap() as u32;
    let share = |c: &Checked| {
        let mut t = 0u64;
        let mut n = 0u64;
        for (ids, _, _, lab) in &c.rows {
            for j in 0..ids.len() {
                if lab[j] != -100 {
                    n += 1;
                    t += u64::from(ids[j] == top);
                }
            }
        }
        t as f64 / n as f64
    };
    let a = share(&run_epoch(&f, &plain, false));
    let cs = run_epoch(&f, &smooth, false);
    check_invariants(&f, &cs);
    let b = share(&cs);
    println!("share of the most frequent token among masked: plain {a:.4}, smoothed {b:.4}");
    assert!(
        b < a * 0.5,
        "smoothing did not lower the most frequent token's share"
    );
}

#[test]
fn phrase_masking_masks_phrases_whole() {
    let f0 = fixture(&Masking::default(), SequenceMode::LineByLine);
    // The three most frequent words in pairs make phrases that occur often.
    let phrases = vec![
        format!("{} {}", f0.lex[0], f0.lex[1]),
        format!("{} {}", f0.lex[1], f0.lex[0]),
        format!("{} {} {}", f0.lex[2], f0.lex[0], f0.lex[1]),
    ];
    let masking = Masking::Phrase(PhraseMasking {
        phrases: phrases.clone(),
        phrases_first: true,
        ..PhraseMasking::default()
    });
    let c = run_epoch(&f0, &masking, true);
    check_invariants(&f0, &c);
    let ptoks: Vec<Vec<u32>> = f0
        .tok
        .encode_batch(&phrases.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let multi_word_units = c.stats.units.iter().filter(|u| u.tokens >= 2).count();
    let mut ptoks = ptoks;
    ptoks.sort_by_key(|p| std::cmp::Reverse(p.len()));
    let mut whole = 0;
    let mut partial = 0;
    for (ids, fl, _row, lab) in &c.rows {
        // leftmost-longest, non-overlapping occurrences ending on a word boundary
        let mut s = 0;
        while s < ids.len() {
            let hit = ptoks.iter().find(|p| {
                let e = s + p.len();
                e <= ids.len()
                    && ids[s..e] == p[..]
                    && (e == ids.len() || fl[e] & distil::data::cache::FLAG_SUBWORD_START != 0)
            });
            match hit {
                Some(p) => {
                    let n = lab[s..s + p.len()].iter().filter(|&&l| l != -100).count();
                    if n == p.len() {
                        whole += 1;
                    } else if n > 0 {
                        partial += 1;
                    }
                    s += p.len();
                }
                None => s += 1,
            }
        }
    }
    println!("phrase masking: {whole} phrase occurrences masked whole, {partial} partly, {multi_word_units} multi-token units");
    assert!(whole > 500, "phrases were rarely masked: {whole}");
    assert_eq!(partial, 0, "a phrase occurrence was partly masked");
}

#[test]
fn masks_are_fresh_per_epoch_and_resumable() {
    let masking = Masking::Token(TokenMasking::default());
    let f = fixture(&masking, SequenceMode::Packed);
    let masker = Arc::new(Masker::new(&masking, &f.tok, None).unwrap());
    let b = Batcher::new(
        f.data.splits.train.clone(),
        masker,
        BatchConfig::new(8),
        99,
        &f.tok,
    )
    .unwrap();
    let per_epoch = b.batches_per_epoch() as u64;
    let all: Vec<_> = b
        .iter_from(Position::default())
        .take(per_epoch as usize + 10)
        .collect();
    // resume in the middle of epoch 1
    let start = Position { epoch: 1, index: 3 };
    let mut resumed = b.iter_from(start);
    for (pos, batch) in all.iter().filter(|(p, _)| *p >= start) {
        let (p2, b2) = resumed.next().unwrap();
        assert_eq!(*pos, p2);
        assert_eq!(*batch, b2, "resumed batch differs at {pos:?}");
    }
    assert_eq!(
        resumed.position(),
        Position {
            epoch: 1,
            index: 10
        }
    );
    // same rows in another epoch get different masks: compare sequence 0's masks
    let unshuffled = BatchConfig {
        shuffle: false,
        ..BatchConfig::new(8)
    };
    let b2 = Batcher::new(
        f.data.splits.train.clone(),
        Arc::new(Masker::new(&masking, &f.tok, None).unwrap()),
        unshuffled,
        99,
        &f.tok,
    )
    .unwrap();
    let e0 = b2.batch_at(Position { epoch: 0, index: 0 }).unwrap();
    let e1 = b2.batch_at(Position { epoch: 1, index: 0 }).unwrap();
    let e0again = b2.batch_at(Position { epoch: 0, index: 0 }).unwrap();
    assert_eq!(e0, e0again, "masks are not deterministic");
    assert_ne!(e0.labels, e1.labels, "masks did not change between epochs");
    // shuffling differs between epochs
    let p0 = b.epoch_plan(0);
    let p1 = b.epoch_plan(1);
    assert_ne!(p0, p1);
}

#[test]
fn length_grouping_cuts_padding() {
    let masking = Masking::default();
    let f = fixture(&masking, SequenceMode::LineByLine);
    let pad_frac = |group: bool| {
        let cfg = BatchConfig {
            group_by_length: group,
            ..BatchConfig::new(16)
        };
        let b = Batcher::new(
            f.data.splits.train.clone(),
            Arc::new(Masker::new(&masking, &f.tok, None).unwrap()),
            cfg,
            5,
            &f.tok,
        )
        .unwrap();
        let (mut real, mut total) = (0usize, 0usize);
        let mut rows = 0;
        for batch in b.epoch(0) {
            real += batch.real_tokens();
            total += batch.input_ids.len();
            rows += batch.batch_size;
        }
        assert_eq!(
            rows,
            f.data.splits.train.len(),
            "an epoch must visit every sequence once"
        );
        1.0 - real as f64 / total as f64
    };
    let plain = pad_frac(false);
    let grouped = pad_frac(true);
    println!("padding: random batches {plain:.3}, length-grouped {grouped:.3}");
    assert!(grouped < plain / 3.0);
}
