//! Tokenizers: loading `tokenizer.json` and `vocab.txt` (checked against each other on real
//! text when `../shared` is there), training WordPiece with BERT's id layout and byte-level
//! BPE with RoBERTa's, saving and reloading.

mod data_common;

use std::path::PathBuf;

use distil::data::subword_trainer::SubwordTrainer;
use distil::data::tokenizer::{BpeTrainOptions, WordBoundary, WordPieceTrainOptions};
use distil::data::{BertVocabOptions, Corpus, CorpusConfig, Tok};

fn minilm(shared: &std::path::Path) -> PathBuf {
    let snaps =
        shared.join("hf-home/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots");
    std::fs::read_dir(snaps)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

#[test]
fn minilm_tokenizer_json_and_vocab_txt_agree() {
    let Some(shared) = data_common::shared_dir("minilm tokenizer test") else {
        return;
    };
    let snap = minilm(&shared);
    let tj = Tok::from_tokenizer_json(snap.join("tokenizer.json")).unwrap();
    let vt = Tok::from_bert_vocab(snap.join("vocab.txt"), &BertVocabOptions::default()).unwrap();
    for t in [&tj, &vt] {
        assert_eq!(t.vocab_size(), 30522);
        let sp = t.special_ids();
        assert_eq!(
            (sp.pad, sp.unk, sp.cls, sp.sep, sp.mask),
            (0, Some(100), 101, 102, 103)
        );
        assert!(t.is_special(0) && t.is_special(103) && t.is_special(1) && !t.is_special(2000));
        assert_eq!(
            t.word_boundary(),
            &WordBoundary::ContinuationPrefix("##".into())
        );
        t.check_model_vocab(30522).unwrap();
    }
    // padding/truncation to 128 are off
    let short = tj.encode_batch(&["hello world"]).unwrap();
    assert_eq!(short[0].len(), 2);
    let text = std::fs::read_to_string(shared.join("corpora/en/wikipedia-leads.txt")).unwrap();
    let lines: Vec<&str> = text.lines().take(300).collect();
    let a = tj.encode_batch(&lines).unwrap();
    let b = vt.encode_batch(&lines).unwrap();
    assert_eq!(a, b, "vocab.txt pipeline differs from tokenizer.json");
    let longest = a.iter().map(Vec::len).max().unwrap();
    assert!(
        longest > 128,
        "long lines must not be truncated (longest {longest})"
    );
    let (ids, types) = tj.encode_with_specials("a b", Some("c")).unwrap();
    assert_eq!(ids.first(), Some(&101));
    assert_eq!(ids.iter().filter(|&&i| i == 102).count(), 2);
    assert_eq!(types.last(), Some(&1));
    // word starts
    let ids = tj.encode_batch(&["tokenization"]).unwrap().remove(0);
    let mut ws = Vec::new();
    tj.word_starts(&ids, &mut ws);
    assert!(
        ids.len() > 1 && ws[0] == 1 && ws[1..].iter().all(|&w| w == 0),
        "{ids:?} {ws:?}"
    );
}

#[test]
fn chinese_vocab_splits_characters() {
    let Some(shared) = data_common::shared_dir("chinese vocab test") else {
        return;
    };
    let t = Tok::from_bert_vocab(
        shared.join("vocab/bert-base-chinese/vocab.txt"),
        &BertVocabOptions::default(),
    )
    .unwrap();
    assert_eq!(t.vocab_size(), 21128);
    let ids = t.encode_batch(&["中华人民共和国"]).unwrap().remove(0);
    assert_eq!(ids.len(), 7);
    let off = BertVocabOptions {
        handle_chinese_chars: false,
        ..BertVocabOptions::default()
    };
    let t2 = Tok::from_bert_vocab(shared.join("vocab/bert-base-chinese/vocab.txt"), &off).unwrap();
    let ids2 = t2.encode_batch(&["中华人民共和国"]).unwrap().remove(0);
    assert_ne!(ids, ids2);
}

fn synth_corpus(dir: &std::path::Path) -> Corpus {
    let lex = data_common::lexicon(600, 4);
    let p = data_common::synth_corpus(&dir.join("train.txt"), &lex, 3000, 5..20, None, 8);
    Corpus::open(&CorpusConfig::new([p.to_string_lossy().to_string()])).unwrap()
}

#[test]
fn trained_wordpiece_keeps_bert_ids_and_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let corpus = synth_corpus(d.path());
    let opts = WordPieceTrainOptions {
        vocab_size: 1000,
        min_frequency: 2,
        limit_alphabet: Some(1000),
        normalizer: BertVocabOptions::default(),
        extra_special_tokens: vec!["[E1]".into()],
    };
    let t = Tok::train_wordpiece(&corpus, &opts).unwrap();
    // The same corpus and options give the same ids every time (the trainer alone breaks
    // ties in hash-map order).
    for _ in 0..3 {
        let again = Tok::train_wordpiece(&corpus, &opts).unwrap();
        assert_eq!(again.json(), t.json(), "training is not deterministic");
    }
    let sp = t.special_ids().clone();
    assert_eq!(
        (sp.pad, sp.unk, sp.cls, sp.sep, sp.mask),
        (0, Some(100), 101, 102, 103)
    );
    assert_eq!(t.token_to_id("[unused0]"), Some(1));
    assert_eq!(t.token_to_id("[unused98]"), Some(99));
    assert_eq!(t.token_to_id("[E1]"), Some(104));
    assert!(
        t.vocab_size() <= 1000 && t.vocab_size() > 300,
        "{}",
        t.vocab_size()
    );
    let out = d.path().join("tok");
    let files = t.save(&out).unwrap();
    assert!(files.iter().any(|f| f.ends_with("vocab.txt")));
    let vocab = std::fs::read_to_string(out.join("vocab.txt")).unwrap();
    assert_eq!(vocab.lines().nth(103), Some("[MASK]"));
    assert_eq!(vocab.lines().count(), t.vocab_size());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["tokenizer_class"], "BertTokenizer");
    assert_eq!(cfg["mask_token"], "[MASK]");
    assert_eq!(cfg["do_lower_case"], true);
    let from_json = Tok::load(&out, &BertVocabOptions::default()).unwrap();
    let from_txt =
        Tok::from_bert_vocab(out.join("vocab.txt"), &BertVocabOptions::default()).unwrap();
    let text = std::fs::read_to_string(&corpus.files()[0].0).unwrap();
    let lines: Vec<&str> = text.lines().take(200).collect();
    let a = t.encode_batch(&lines).unwrap();
    assert_eq!(a, from_json.encode_batch(&lines).unwrap());
    assert_eq!(a, from_txt.encode_batch(&lines).unwrap());
    assert!(
        !a.iter().flatten().any(|&i| i == 100),
        "the trained vocab produced [UNK]"
    );
    let (ids, types) = from_json.encode_with_specials("ka ro", Some("mi")).unwrap();
    assert_eq!(ids[0], 101);
    assert_eq!(*ids.last().unwrap(), 102);
    assert_eq!(*types.last().unwrap(), 1);
}

#[test]
fn trained_byte_level_bpe_has_roberta_ids_and_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let corpus = synth_corpus(d.path());
    let opts = BpeTrainOptions {
        vocab_size: 800,
        min_frequency: 2,
        add_prefix_space: false,
        extra_special_tokens: vec![],
    };
    let t = Tok::train_byte_level_bpe(&corpus, &opts).unwrap();
    let sp = t.special_ids().clone();
    assert_eq!(
        (sp.cls, sp.pad, sp.sep, sp.unk, sp.mask),
        (0, 1, 2, Some(3), 4)
    );
    assert_eq!((sp.bos, sp.eos), (Some(0), Some(2)));
    assert_eq!(t.word_boundary(), &WordBoundary::SpacePrefix('Ġ'));
    let out = d.path().join("bpe");
    t.save(&out).unwrap();
    assert!(out.join("vocab.json").is_file() && out.join("merges.txt").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["tokenizer_class"], "RobertaTokenizer");
    assert_eq!(cfg["bos_token"], "<s>");
    let re = Tok::from_bpe_files(out.join("vocab.json"), out.join("merges.txt"), false).unwrap();
    let lines = ["karo mishi tor, quenmal.", "Ünïcödé ok 漢字"];
    let a = t.encode_batch(&lines).unwrap();
    assert_eq!(a, re.encode_batch(&lines).unwrap());
    assert!(
        !a.iter().flatten().any(|&i| i == 3),
        "byte-level BPE never needs <unk>"
    );
    // word starts: every Ġ token starts a word, the first token too
    let mut ws = Vec::new();
    t.word_starts(&a[0], &mut ws);
    let words = ws.iter().filter(|&&w| w == 1).count();
    assert_eq!(
        words,
        4,
        "{:?}",
        a[0].iter()
            .map(|&i| t.id_to_token(i).unwrap())
            .collect::<Vec<_>>()
    );
    let (ids, _) = t.encode_with_specials("karo", None).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (0, 2));
}

#[test]
fn training_on_an_empty_corpus_fails_clearly() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("e.txt");
    std::fs::write(&p, "\n\n").unwrap();
    let corpus = Corpus::open(&CorpusConfig::new([p.to_string_lossy().to_string()])).unwrap();
    let opts = WordPieceTrainOptions {
        vocab_size: 1000,
        min_frequency: 2,
        limit_alphabet: None,
        normalizer: BertVocabOptions::default(),
        extra_special_tokens: vec![],
    };
    let e = Tok::train_wordpiece(&corpus, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty") && e.contains("e.txt"), "{e}");
    let small = WordPieceTrainOptions {
        vocab_size: 50,
        ..opts
    };
    let e = Tok::train_wordpiece(&corpus, &small)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab_size"), "{e}");
}

fn trainer(vocab_size: usize, min_frequency: u64, limit: Option<usize>) -> SubwordTrainer {
    SubwordTrainer::wordpiece(
        vocab_size,
        min_frequency,
        limit,
        vec!["[UNK]".into()],
        "[UNK]",
    )
}

#[test]
fn wordpiece_trainer_merges_the_most_frequent_pair_and_breaks_ties_in_a_fixed_order() {
    let mut t = trainer(100, 2, None);
    for (w, n) in [("cd", 2), ("ab", 2), ("abab", 1), ("e", 1)] {
        t.add_word(w, n);
    }
    // (a, ##b) is seen 3 times (twice in "ab", once at the start of "abab"): merged first.
    // Then (c, ##d), twice; "abab"'s other pairs, (ab, ##a) and (##a, ##b), once each: below
    // min_frequency.
    let v = t.vocabulary();
    assert_eq!(
        v,
        ["[UNK]", "a", "b", "c", "d", "e", "##a", "##b", "##d", "ab", "cd"]
    );
    // Equal counts: the pair of lower ids first, whatever order the words came in.
    let mut t = trainer(100, 2, None);
    for (w, n) in [("yz", 2), ("xy", 2)] {
        t.add_word(w, n);
    }
    assert_eq!(
        t.vocabulary(),
        ["[UNK]", "x", "y", "z", "##y", "##z", "xy", "yz"]
    );
    // vocab_size stops it; min_frequency too.
    let mut t = trainer(7, 2, None);
    t.add_word("xy", 2);
    t.add_word("yz", 2);
    assert_eq!(t.vocabulary().len(), 7);
    let mut t = trainer(100, 3, None);
    t.add_word("xy", 2);
    assert_eq!(t.vocabulary(), ["[UNK]", "x", "y", "##y"]);
}

#[test]
fn wordpiece_trainer_limits_the_alphabet_to_the_most_frequent_characters() {
    let mut t = trainer(100, 2, Some(2));
    t.add_word("a", 5);
    t.add_word("c", 3);
    t.add_word("b", 3);
    t.add_word("ad", 1);
    // a (6 with "ad"), then b and c tied at 3: b by character; d (1) dropped.
    assert_eq!(t.vocabulary(), ["[UNK]", "a", "b"]);
}

#[test]
fn trained_vocabularies_are_the_same_in_every_process() {
    // tokenizers' own trainers numbered pieces in a randomly seeded hash map's order and broke
    // ties by those numbers: some processes got another vocabulary from the same corpus.
    let tmp = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for kind in ["wordpiece", "bpe"] {
        let train = |i: usize| {
            let out = tmp.path().join(format!("{kind}{i}"));
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_distil"))
                .args([
                    "tokenizer",
                    "train",
                    "--vocab-size",
                    "3000",
                    "--kind",
                    kind,
                    "--out",
                ])
                .arg(&out)
                .arg("--data")
                .arg(root.join("data/shakespeare"))
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            std::fs::read_to_string(out.join("tokenizer.json")).unwrap()
        };
        let first = train(0);
        assert_eq!(
            Tok::load(
                tmp.path().join(format!("{kind}0")),
                &BertVocabOptions::default()
            )
            .unwrap()
            .vocab_size(),
            3000
        );
        for i in 1..4 {
            assert!(
                train(i) == first,
                "{kind}: process {i} trained another vocabulary"
            );
        }
    }
}

#[test]
fn bpe_trainer_keeps_its_whole_alphabet_and_records_the_merges() {
    let mut t = SubwordTrainer::byte_level_bpe(100, 2, vec!['z', 'a', 'b'], vec!["<s>".into()]);
    t.add_word("ab", 3);
    t.add_word("abb", 2);
    let l = t.learn();
    // No `##`: (a, b) 5 times, then (ab, b) twice.
    assert_eq!(l.pieces, ["<s>", "a", "b", "z", "ab", "abb"]);
    assert_eq!(
        l.merges,
        [("a".into(), "b".into()), ("ab".into(), "b".into())]
    );
}
