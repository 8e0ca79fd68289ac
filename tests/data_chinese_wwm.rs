//! Chinese whole-word masking on People's Daily (January 1998) against its gold segmentation:
//! how often is a masked unit exactly one gold word? Compared with character-level whole-word
//! masking (each Chinese character a word, as plain WordPiece BERT-Chinese does).

mod data_common;

use std::collections::HashSet;

use distil::data::cache::TokenCache;
use distil::data::masking::MaskStats;
use distil::data::{
    BertVocabOptions, Corpus, CorpusConfig, Masker, Masking, Tok, WordSegmentation,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Report {
    units: u64,
    whole_gold: u64,
    multi_char_units: u64,
    multi_char_whole_gold: u64,
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0xF900..=0xFAFF)
}

fn run(
    tok: &Tok,
    lines: &[&str],
    gold: &[HashSet<(usize, usize)>],
    seg: WordSegmentation,
    strategy: &str,
    dir: &std::path::Path,
    corpus: &Corpus,
) -> Report {
    let (cache, _) = TokenCache::build_or_load(corpus, tok, seg, dir.join("cache")).unwrap();
    assert_eq!(cache.n_units(), lines.len(), "units must align with lines");
    let masking: Masking =
        serde_yaml::from_str(&format!("{{strategy: {strategy}, probability: 0.15}}")).unwrap();
    let masker = Masker::new(&masking, tok, None).unwrap();
    let encs = tok.encode_batch_with_offsets(lines).unwrap();
    let sp = tok.special_ids();
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut rep = Report {
        units: 0,
        whole_gold: 0,
        multi_char_units: 0,
        multi_char_whole_gold: 0,
    };
    for (u, (line, enc)) in lines.iter().zip(&encs).enumerate() {
        let r = cache.unit_range(u);
        let (s, e) = (r.start as usize, r.end as usize);
        assert_eq!(&cache.tokens()[s..e], enc.get_ids(), "line {}", u + 1);
        let mut ids = vec![sp.cls];
        ids.extend_from_slice(&cache.tokens()[s..e]);
        ids.push(sp.sep);
        let mut flags = vec![1u8];
        flags.extend_from_slice(&cache.flags()[s..e]);
        flags.push(1);
        let mut labels = vec![0i64; ids.len()];
        let mut st = MaskStats {
            record_units: true,
            ..MaskStats::default()
        };
        masker.mask_row(&mut ids, &flags, &mut labels, &mut rng, Some(&mut st));
        // byte offset -> char offset
        let char_at: Vec<usize> = {
            let mut v = vec![0; line.len() + 1];
            let mut c = 0;
            for (b, _) in line.char_indices() {
                v[b] = c;
                c += 1;
            }
            v[line.len()] = c;
            v
        };
        let offs = enc.get_offsets();
        for unit in st.units {
            // positions in the row are shifted by the [CLS]
            let first = unit.start as usize - 1;
            let last = first + unit.tokens as usize - 1;
            let span = (char_at[offs[first].0], char_at[offs[last].1]);
            let text: String = line[offs[first].0..offs[last].1].to_string();
            if !text.chars().all(is_cjk) {
                continue; // only Chinese words are compared
            }
            rep.units += 1;
            let whole = gold[u].contains(&span);
            rep.whole_gold += u64::from(whole);
            if span.1 - span.0 > 1 {
                rep.multi_char_units += 1;
                rep.multi_char_whole_gold += u64::from(whole);
            }
        }
    }
    rep
}

#[test]
fn chinese_whole_word_masking_matches_gold_words() {
    let Some(shared) = data_common::shared_dir("Chinese whole-word masking report") else {
        return;
    };
    let zh = shared.join("corpora/zh");
    let text = std::fs::read_to_string(zh.join("peoples-daily-199801.txt")).unwrap();
    let seg = std::fs::read_to_string(zh.join("peoples-daily-199801.seg.txt")).unwrap();
    let tok = Tok::from_bert_vocab(
        shared.join("vocab/bert-base-chinese/vocab.txt"),
        &BertVocabOptions::default(),
    )
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let seg_lines: Vec<&str> = seg.lines().collect();
    assert_eq!(lines.len(), seg_lines.len());
    // gold word spans in characters; lines whose segmentation does not spell the same text
    // are left without gold words (and counted)
    let mut mismatched = 0;
    let gold: Vec<HashSet<(usize, usize)>> = lines
        .iter()
        .zip(&seg_lines)
        .map(|(l, s)| {
            let words: Vec<&str> = s.split(' ').filter(|w| !w.is_empty()).collect();
            if words.concat() != l.replace(' ', "") || l.contains(' ') {
                mismatched += 1;
                return HashSet::new();
            }
            let mut pos = 0;
            words
                .iter()
                .map(|w| {
                    let n = w.chars().count();
                    pos += n;
                    (pos - n, pos)
                })
                .collect()
        })
        .collect();
    println!(
        "{} lines, {mismatched} without usable gold segmentation",
        lines.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open(&CorpusConfig::new([zh
        .join("peoples-daily-199801.txt")
        .to_string_lossy()
        .to_string()]))
    .unwrap();
    let wwm = run(
        &tok,
        &lines,
        &gold,
        WordSegmentation::Jieba,
        "chinese_whole_word",
        dir.path(),
        &corpus,
    );
    let chars = run(
        &tok,
        &lines,
        &gold,
        WordSegmentation::Tokenizer,
        "whole_word",
        dir.path(),
        &corpus,
    );
    let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
    println!(
        "Chinese WWM (jieba): {} masked Chinese units, {:.1}% are exactly one gold word; multi-character units: {}, {:.1}% gold words",
        wwm.units,
        pct(wwm.whole_gold, wwm.units),
        wwm.multi_char_units,
        pct(wwm.multi_char_whole_gold, wwm.multi_char_units)
    );
    println!(
        "character-level masking: {} masked Chinese units, {:.1}% are exactly one gold word",
        chars.units,
        pct(chars.whole_gold, chars.units)
    );
    assert!(
        mismatched * 20 < lines.len(),
        "too many lines without gold segmentation"
    );
    assert!(wwm.units > 20_000);
    assert!(
        wwm.multi_char_units * 2 > wwm.units,
        "jieba units are mostly single characters"
    );
    // bounds measured on this corpus (see the printed report), with margin
    assert!(pct(wwm.whole_gold, wwm.units) > 75.0);
    assert!(pct(wwm.whole_gold, wwm.units) > pct(chars.whole_gold, chars.units) + 20.0);
}
