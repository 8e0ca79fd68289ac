#!/usr/bin/env python3
"""Check that a checkpoint directory written by distil loads in Hugging Face transformers.

    venv/bin/python scripts/check_hf_load.py CHECKPOINT_DIR --arch bert [--io FILE]

CHECKPOINT_DIR holds config.json + model.safetensors + tokenizer files. The model is loaded
with BertForMaskedLM / DistilBertForMaskedLM.from_pretrained(dir, output_loading_info=True);
any missing, unexpected or mismatched key is a failure. The tokenizer is loaded with
AutoTokenizer (skip with --no-tokenizer). With --io FILE (a safetensors holding input_ids,
attention_mask, optionally token_type_ids, and logits computed by distil), the model's
logits in eval mode must match `logits` within --atol (default 1e-4).

Exit status 0 and one line starting with "OK" on success; 1 and a line starting with
"FAIL" otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CLASSES = {"bert": "BertForMaskedLM", "distilbert": "DistilBertForMaskedLM"}
# Decoder weights that transformers ties to the word embeddings.
TIED = {
    "bert": ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    "distilbert": ("vocab_projector.weight", "distilbert.embeddings.word_embeddings.weight"),
}


class Fail(Exception):
    pass


def check(args) -> str:
    import torch
    import transformers as tf
    from safetensors import safe_open

    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise Fail(f"{ckpt}/config.json not found")
    cfg_json = json.loads((ckpt / "config.json").read_text())
    if cfg_json.get("model_type") != args.arch:
        raise Fail(f"config.json model_type is {cfg_json.get('model_type')!r}, expected {args.arch!r}")

    cls = getattr(tf, CLASSES[args.arch])
    try:
        model, info = cls.from_pretrained(
            ckpt, output_loading_info=True, ignore_mismatched_sizes=True,
            dtype=torch.float32, attn_implementation="eager",
        )
    except Exception as e:  # noqa: BLE001 - any load error is a failure
        raise Fail(f"from_pretrained raised {type(e).__name__}: {e}") from e
    problems = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if info.get("error_msgs"):
        problems["error_msgs"] = list(info["error_msgs"])
    if problems:
        raise Fail(f"loading info not clean: {problems}")
    model.eval()

    # transformers silently ties the decoder to the word embeddings; if the file carries a
    # decoder weight that differs, the model would not be the one distil saved.
    st_files = sorted(ckpt.glob("*.safetensors"))
    n_tensors = 0
    dec, emb = TIED[args.arch]
    tied_note = ""
    for f in st_files:
        if f.name == "io.safetensors":
            continue
        with safe_open(f, "pt") as h:
            keys = set(h.keys())
            n_tensors += len(keys)
            if dec in keys and emb in keys and model.config.tie_word_embeddings:
                if not torch.equal(h.get_tensor(dec), h.get_tensor(emb)):
                    raise Fail(f"{f.name}: {dec} differs from {emb} but tie_word_embeddings is true")
                tied_note = " (decoder stored, equal to embeddings)"

    tok_note = "tokenizer skipped"
    if not args.no_tokenizer:
        # transformers 5 builds an empty BertTokenizer (special tokens only) from a directory
        # without tokenizer files, so require the files explicitly.
        tok_files = [n for n in ("tokenizer.json", "vocab.txt") if (ckpt / n).is_file()]
        if not tok_files:
            raise Fail("no tokenizer.json or vocab.txt in the checkpoint (use --no-tokenizer to skip)")
        try:
            tok = tf.AutoTokenizer.from_pretrained(ckpt)
        except Exception as e:  # noqa: BLE001
            raise Fail(f"AutoTokenizer.from_pretrained raised {type(e).__name__}: {e}") from e
        if len(tok) > model.config.vocab_size:
            raise Fail(f"tokenizer has {len(tok)} tokens but config vocab_size is {model.config.vocab_size}")
        if model.config.pad_token_id is not None and tok.pad_token_id != model.config.pad_token_id:
            raise Fail(f"tokenizer pad id {tok.pad_token_id} != config pad_token_id {model.config.pad_token_id}")
        n_special = len(set(tok.all_special_ids))
        if len(tok) <= n_special:
            raise Fail(f"tokenizer from {tok_files} has only {len(tok)} tokens (special tokens only)")
        tok_note = f"tokenizer {type(tok).__name__} ({len(tok)} tokens, from {'+'.join(tok_files)})"

    io_note = ""
    if args.io:
        with safe_open(args.io, "pt") as h:
            keys = set(h.keys())
            for k in ("input_ids", "attention_mask", "logits"):
                if k not in keys:
                    raise Fail(f"{args.io} has no {k!r}")
            ids = h.get_tensor("input_ids").long()
            mask = h.get_tensor("attention_mask").long()
            want = h.get_tensor("logits").float()
            extra = {}
            if args.arch == "bert" and "token_type_ids" in keys:
                extra["token_type_ids"] = h.get_tensor("token_type_ids").long()
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, **extra).logits.float()
        if got.shape != want.shape:
            raise Fail(f"logits shape {tuple(got.shape)} != expected {tuple(want.shape)}")
        diff = (got - want).abs().max().item()
        if not diff <= args.atol:  # also catches NaN
            raise Fail(f"logits max |diff| {diff:.3e} > atol {args.atol:g}")
        io_note = f", logits max|diff| {diff:.2e} <= {args.atol:g} on {tuple(want.shape)}"

    n_params = sum(p.numel() for p in model.parameters())
    return (f"OK {args.arch} {ckpt}: {type(model).__name__} {n_params} params from {n_tensors} tensors"
            f"{tied_note}, 0 missing/unexpected/mismatched keys, {tok_note}{io_note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="directory with config.json, model.safetensors, tokenizer files")
    ap.add_argument("--arch", choices=sorted(CLASSES), required=True)
    ap.add_argument("--io", help="safetensors with input_ids, attention_mask, logits (from distil)")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--no-tokenizer", action="store_true", help="do not load the tokenizer")
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        print(check(args))
        return 0
    except Fail as e:
        print(f"FAIL {args.arch} {args.checkpoint}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
