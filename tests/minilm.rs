//! The real all-MiniLM-L6-v2 from `../shared`, loaded by hub id through the offline cache,
//! gives the same token embeddings as PyTorch (fixture from the real model).

mod common;

use candle_core::Device;
use common::{ids, load_io, max_abs_diff};
use distil::model::hub::{resolve, resolve_offline, Resolved};
use distil::model::{load_encoder, Encoder, EncoderInput, ForwardOptions, LoadOptions};

#[test]
fn minilm_matches_pytorch_through_the_hub_cache() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    // This test binary holds this one test, so setting the environment is race-free.
    std::env::set_var("HF_HOME", shared.join("hf-home"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let id = "sentence-transformers/all-MiniLM-L6-v2";
    assert!(matches!(resolve_offline(id).unwrap(), Resolved::Dir(_)));
    assert!(matches!(
        resolve_offline("nobody/not-cached").unwrap(),
        Resolved::ToDownload(_)
    ));
    let err = resolve("nobody/not-cached").unwrap_err().to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");

    let dir = resolve(id).unwrap();
    let opts = LoadOptions {
        trainable: false,
        ..Default::default()
    };
    let (enc, report) = load_encoder(&dir, &Device::Cpu, &opts).unwrap();
    // The checkpoint has no MLM head: it gets a fresh one and says so.
    assert_eq!(report.initialised_fresh, vec!["masked-LM head"]);
    assert!(enc.has_pooler());

    let io = load_io("minilm");
    let input_ids = ids(&io, "input_ids").unwrap();
    let mask = ids(&io, "attention_mask").unwrap();
    let tt = ids(&io, "token_type_ids");
    let out = enc
        .forward(
            &EncoderInput {
                input_ids: &input_ids,
                attention_mask: Some(&mask),
                token_type_ids: tt.as_ref(),
            },
            ForwardOptions {
                hidden_states: true,
                attentions: false,
            },
            None,
        )
        .unwrap();
    let d0 = max_abs_diff(&out.hidden_states[0], &io["hidden_states.0"]);
    let d = max_abs_diff(&out.last_hidden_state, &io["last_hidden_state"]);
    let pooled = Encoder::mean_pool(&out.last_hidden_state, &mask).unwrap();
    let dp = max_abs_diff(&pooled, &io["sentence_embedding"]);
    println!("MiniLM max abs diff: embeddings {d0:e}, last hidden {d:e}, sentence {dp:e}");
    assert!(d0 < 1e-4 && d < 1e-4 && dp < 1e-4);
}
