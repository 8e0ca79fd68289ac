//! Helpers shared by the `data_*` integration tests: a synthetic WordPiece vocabulary and
//! corpus (so the statistical tests run anywhere), and the `../shared` lookup.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const SYLLABLES: &[&str] = &[
    "ka", "ro", "mi", "tu", "le", "sa", "no", "vi", "de", "pu", "ga", "ze", "lo", "fi", "ne", "ba",
    "shi", "tor", "mal", "quen",
];

/// Writes a BERT-style vocab.txt: [PAD], [unused0..98], [UNK], [CLS], [SEP], [MASK], letters,
/// `##` letters, syllables and `##` syllables, plus `common` whole words.
pub fn synth_vocab(dir: &Path, common: &[String]) -> PathBuf {
    let mut v = vec!["[PAD]".to_string()];
    v.extend((0..99).map(|i| format!("[unused{i}]")));
    v.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    for c in 'a'..='z' {
        v.push(c.to_string());
        v.push(format!("##{c}"));
    }
    for s in SYLLABLES {
        v.push(s.to_string());
        v.push(format!("##{s}"));
    }
    v.extend([".", ",", "!"].map(String::from));
    for w in common {
        if !v.contains(w) {
            v.push(w.clone());
        }
    }
    let p = dir.join("vocab.txt");
    std::fs::write(&p, v.join("\n") + "\n").unwrap();
    p
}

/// A lexicon of `n` pseudo-words made of 1–4 syllables.
pub fn lexicon(n: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    while out.len() < n {
        let k = rng.random_range(1..=4);
        let w: String = (0..k)
            .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
            .collect();
        if !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

/// Writes `lines` lines of Zipf-distributed words from `lex` (with punctuation), blank lines
/// every `doc_every` lines when given. Returns the path.
pub fn synth_corpus(
    path: &Path,
    lex: &[String],
    lines: usize,
    words_per_line: std::ops::Range<usize>,
    doc_every: Option<usize>,
    seed: u64,
) -> PathBuf {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Zipf(1) weights
    let cdf: Vec<f64> = lex
        .iter()
        .enumerate()
        .scan(0.0, |acc, (i, _)| {
            *acc += 1.0 / (i + 1) as f64;
            Some(*acc)
        })
        .collect();
    let total = *cdf.last().unwrap();
    let mut s = String::new();
    for l in 0..lines {
        if let Some(d) = doc_every {
            if l > 0 && l % d == 0 {
                s.push('\n');
            }
        }
        let n = rng.random_range(words_per_line.clone());
        for i in 0..n {
            let u = rng.random::<f64>() * total;
            let k = cdf.partition_point(|&c| c <= u).min(lex.len() - 1);
            if i > 0 {
                s.push(' ');
            }
            s.push_str(&lex[k]);
            if rng.random::<f64>() < 0.05 {
                s.push(',');
            }
        }
        s.push_str(".\n");
    }
    std::fs::write(path, s).unwrap();
    path.to_path_buf()
}

/// `$DISTIL_SHARED` or `../shared` next to the crate; `None` (with a printed reason) when
/// absent.
pub fn shared_dir(what: &str) -> Option<PathBuf> {
    let p = std::env::var_os("DISTIL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if p.is_dir() {
        Some(p)
    } else {
        let mut msg = String::new();
        let _ = write!(
            msg,
            "SKIPPED {what}: shared data not found at {} (set DISTIL_SHARED)",
            p.display()
        );
        eprintln!("{msg}");
        println!("{msg}");
        None
    }
}

/// Chi-square statistic of observed counts against expected probabilities.
pub fn chi_square(observed: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = observed.iter().sum();
    observed
        .iter()
        .zip(probs)
        .map(|(&o, &p)| {
            let e = p * n as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}
