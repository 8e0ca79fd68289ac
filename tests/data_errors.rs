//! Bad input gives a clear error naming the file, the line or the key; nothing panics.

mod data_common;

use std::path::Path;
use std::sync::Arc;

use distil::data::masking::PhraseMasking;
use distil::data::sequences::{Documents, SentencePairs};
use distil::data::{
    cut_sequences, prepare, BatchConfig, Batcher, BertVocabOptions, Corpus, CorpusConfig,
    DataConfig, DataError, Masker, Masking, SequenceConfig, Tok, TokenCache, Utf8Policy,
    WordSegmentation,
};

fn tok(dir: &Path) -> Tok {
    let lex = data_common::lexicon(50, 1);
    let v = data_common::synth_vocab(dir, &lex);
    Tok::from_bert_vocab(v, &BertVocabOptions::default()).unwrap()
}

fn build(dir: &Path, cfg: CorpusConfig) -> distil::data::Result<TokenCache> {
    let t = tok(dir);
    let c = Corpus::open(&cfg)?;
    TokenCache::build_or_load(&c, &t, WordSegmentation::Tokenizer, dir.join("cache")).map(|x| x.0)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn missing_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("nope.txt");
    let e = Corpus::open(&CorpusConfig::new([s(&p)])).unwrap_err();
    assert!(matches!(e, DataError::MissingPath { .. }));
    let m = e.to_string();
    assert!(
        m.contains("nope.txt") && m.contains("does not exist"),
        "{m}"
    );
}

#[test]
fn glob_matching_nothing_and_empty_directory() {
    let d = tempfile::tempdir().unwrap();
    let m = Corpus::open(&CorpusConfig::new([format!(
        "{}/*.txt",
        d.path().display()
    )]))
    .unwrap_err()
    .to_string();
    assert!(m.contains("*.txt") && m.contains("matched no file"), "{m}");
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let m = Corpus::open(&CorpusConfig::new([s(&empty)]))
        .unwrap_err()
        .to_string();
    assert!(m.contains("empty") && m.contains("holds no file"), "{m}");
    let m = Corpus::open(&CorpusConfig::new(Vec::<String>::new()))
        .unwrap_err()
        .to_string();
    assert!(m.contains("data.paths"), "{m}");
}

#[test]
fn empty_corpus() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("blank.txt");
    std::fs::write(&p, "\n   \n\n").unwrap();
    let e = build(d.path(), CorpusConfig::new([s(&p)])).unwrap_err();
    assert!(matches!(e, DataError::EmptyCorpus { .. }));
    let m = e.to_string();
    assert!(m.contains("blank.txt") && m.contains("3 lines read"), "{m}");
}

#[test]
fn invalid_utf8_names_file_and_line_or_is_skipped_and_counted() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.txt");
    std::fs::write(&p, b"ka ro\nmi tu\nle \xff\xfe sa\nno vi\n").unwrap();
    let e = build(d.path(), CorpusConfig::new([s(&p)])).unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(
            e,
            DataError::InvalidUtf8 {
                line: 3,
                byte: 3,
                ..
            }
        ),
        "{m}"
    );
    assert!(m.contains("bad.txt:3:") && m.contains("UTF-8"), "{m}");
    let cfg = CorpusConfig {
        on_invalid_utf8: Utf8Policy::Skip,
        ..CorpusConfig::new([s(&p)])
    };
    let c = build(d.path(), cfg).unwrap();
    assert_eq!(c.meta().read.skipped_invalid_utf8, 1);
    assert_eq!(c.n_units(), 3);
}

#[test]
fn jsonl_missing_field_bad_json_and_wrong_type() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.jsonl");
    std::fs::write(
        &p,
        "{\"text\": \"ka ro\"}\n{\"title\": \"t\", \"body\": \"mi\"}\n",
    )
    .unwrap();
    let m = build(d.path(), CorpusConfig::new([s(&p)]))
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("x.jsonl:2:") && m.contains("no field `text`") && m.contains("body, title"),
        "{m}"
    );

    std::fs::write(
        &p,
        "{\"text\": \"ka\"}\n\n{\"text\": \"ro\"}\n{\"text\": \"mi\"\n",
    )
    .unwrap();
    let m = build(d.path(), CorpusConfig::new([s(&p)]))
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("x.jsonl:4:") && m.contains("invalid JSON"),
        "{m}"
    );

    std::fs::write(&p, "{\"text\": 3}\n").unwrap();
    let m = build(d.path(), CorpusConfig::new([s(&p)]))
        .unwrap_err()
        .to_string();
    assert!(m.contains("x.jsonl:1:") && m.contains("a number"), "{m}");

    std::fs::write(&p, "[1, 2]\n").unwrap();
    let m = build(d.path(), CorpusConfig::new([s(&p)]))
        .unwrap_err()
        .to_string();
    assert!(m.contains("x.jsonl:1:") && m.contains("JSON object"), "{m}");

    // a named field works, records are documents, text lines are units
    std::fs::write(&p, "{\"body\": \"ka ro\\nmi tu\"}\n{\"body\": \"le\"}\n").unwrap();
    let cfg = CorpusConfig {
        text_field: "body".into(),
        ..CorpusConfig::new([s(&p)])
    };
    let c = build(d.path(), cfg).unwrap();
    assert_eq!((c.n_units(), c.n_docs()), (3, 2));
}

#[test]
fn tokenizer_errors_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let m = Tok::load(d.path().join("none.json"), &BertVocabOptions::default())
        .unwrap_err()
        .to_string();
    assert!(m.contains("none.json"), "{m}");
    let bad = d.path().join("tokenizer.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let m = Tok::from_tokenizer_json(&bad).unwrap_err().to_string();
    assert!(m.contains("tokenizer.json"), "{m}");
    let v = d.path().join("vocab.txt");
    std::fs::write(&v, "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n").unwrap();
    let m = Tok::from_bert_vocab(&v, &BertVocabOptions::default())
        .unwrap_err()
        .to_string();
    assert!(m.contains("vocab.txt") && m.contains("[MASK]"), "{m}");
    std::fs::write(&v, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nhello\n").unwrap();
    let m = Tok::from_bert_vocab(&v, &BertVocabOptions::default())
        .unwrap_err()
        .to_string();
    assert!(m.contains("vocab.txt:7") && m.contains("duplicate"), "{m}");
    let empty_dir = d.path().join("e");
    std::fs::create_dir(&empty_dir).unwrap();
    let m = Tok::load(&empty_dir, &BertVocabOptions::default())
        .unwrap_err()
        .to_string();
    assert!(m.contains("no tokenizer.json"), "{m}");
}

#[test]
fn vocab_size_mismatch_with_the_model() {
    let d = tempfile::tempdir().unwrap();
    let t = tok(d.path());
    let n = t.vocab_size();
    t.check_model_vocab(n).unwrap();
    t.check_model_vocab(n + 6).unwrap(); // padded embedding table
    for bad in [n - 1, n + 1000, 30522] {
        let e = t.check_model_vocab(bad).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, DataError::VocabMismatch { .. }));
        assert!(
            m.contains("vocab.txt") && m.contains(&n.to_string()) && m.contains(&bad.to_string()),
            "{m}"
        );
    }
}

#[test]
fn bad_masking_and_sequence_configs_name_the_key() {
    let e = serde_yaml::from_str::<Masking>("{strategy: token, probabilty: 0.15}").unwrap_err();
    assert!(e.to_string().contains("probabilty"), "{e}");
    let e = serde_yaml::from_str::<Masking>("{strategy: tokens}").unwrap_err();
    assert!(e.to_string().contains("tokens"), "{e}");
    let d = tempfile::tempdir().unwrap();
    let t = tok(d.path());
    let m: Masking = serde_yaml::from_str("{strategy: token, probability: 1.5}").unwrap();
    let e = Masker::new(&m, &t, None).unwrap_err().to_string();
    assert!(e.contains("masking.probability"), "{e}");
    let m: Masking = serde_yaml::from_str("{strategy: span, p: 1.2}").unwrap();
    let e = Masker::new(&m, &t, None).unwrap_err().to_string();
    assert!(e.contains("masking.p"), "{e}");
    let m: Masking = serde_yaml::from_str("{strategy: ngram, max_n: 3, weights: [1, 2]}").unwrap();
    let e = Masker::new(&m, &t, None).unwrap_err().to_string();
    assert!(e.contains("masking.weights"), "{e}");
    let m: Masking =
        serde_yaml::from_str("{strategy: token, replace: {mask: 0.9, random: 0.2}}").unwrap();
    let e = Masker::new(&m, &t, None).unwrap_err().to_string();
    assert!(e.contains("masking.replace"), "{e}");
    let m: Masking = serde_yaml::from_str("{strategy: token, smoothing: 0.7}").unwrap();
    let e = Masker::new(&m, &t, None).unwrap_err().to_string();
    assert!(e.contains("masking.smoothing"), "{e}");
    let m = Masking::Phrase(PhraseMasking {
        phrases_file: Some(d.path().join("entities.txt")),
        ..PhraseMasking::default()
    });
    let e = Masker::new(&m, &t, None).unwrap_err().to_string();
    assert!(e.contains("entities.txt"), "{e}");
    let e = serde_yaml::from_str::<SequenceConfig>("{block_size: 128, mode: packd}").unwrap_err();
    assert!(e.to_string().contains("packd"), "{e}");
    let e = SequenceConfig {
        block_size: 2,
        ..SequenceConfig::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("data.block_size"), "{e}");
}

#[test]
fn strategy_and_cache_must_agree() {
    let d = tempfile::tempdir().unwrap();
    let t = tok(d.path());
    let p = d.path().join("c.txt");
    std::fs::write(&p, "ka ro mi\ntu le sa\n").unwrap();
    let cfg = DataConfig {
        corpus: CorpusConfig::new([s(&p)]),
        sequences: SequenceConfig::default(),
        masking: Masking::default(),
        cache_dir: Some(d.path().join("cache")),
    };
    let prepared = prepare(&cfg, &t).unwrap();
    let cww: Masking = serde_yaml::from_str("{strategy: chinese_whole_word}").unwrap();
    let masker = Arc::new(Masker::new(&cww, &t, None).unwrap());
    let e = Batcher::new(
        prepared.splits.train.clone(),
        masker,
        BatchConfig::new(2),
        0,
        &t,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("masking.strategy") && e.contains("chinese_whole_word"),
        "{e}"
    );
    let masker = Arc::new(Masker::new(&Masking::default(), &t, None).unwrap());
    let e = Batcher::new(
        prepared.splits.train.clone(),
        masker,
        BatchConfig::new(0),
        0,
        &t,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("batch_size"), "{e}");
    // NSP on a single document
    let e = cut_sequences(
        prepared.cache.clone(),
        &t,
        &SequenceConfig {
            pairs: Some(SentencePairs::Nsp),
            documents: Documents::BlankLines,
            ..SequenceConfig::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("data.pairs") && e.contains("2 documents"), "{e}");
}
