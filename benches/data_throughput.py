"""Throughput of tokenise + mask + batch with Hugging Face `tokenizers` + `transformers`
collators, on the same text, tokenizer and shapes as `benches/data_throughput.rs`:
wikipedia-leads.txt, all-MiniLM-L6-v2 tokenizer, line by line truncated to 128, batches of 16,
token-level (DataCollatorForLanguageModeling) and whole-word masking
(DataCollatorForWholeWordMask, or DataCollatorForLanguageModeling(whole_word_mask=True) in
transformers >= 5).

Run: /work/venv/bin/python benches/data_throughput.py   (DISTIL_SHARED overrides ../shared)
"""

import glob
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, DataCollatorForLanguageModeling  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("DISTIL_SHARED", os.path.join(ROOT, "..", "shared"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def make_collator(tok, strategy):
    if strategy == "token":
        return DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt"), False
    if hasattr(transformers, "DataCollatorForWholeWordMask"):
        return transformers.DataCollatorForWholeWordMask(tok, mlm_probability=0.15, return_tensors="pt"), False
    return (
        DataCollatorForLanguageModeling(tok, mlm_probability=0.15, whole_word_mask=True, return_tensors="pt"),
        True,
    )


def run(tok, path, strategy):
    collator, needs_offsets = make_collator(tok, strategy)
    t0 = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    enc = tok(
        lines,
        truncation=True,
        max_length=128,
        return_special_tokens_mask=True,
        return_offsets_mapping=needs_offsets,
    )
    keys = ["input_ids", "special_tokens_mask"] + (["offset_mapping"] if needs_offsets else [])
    features = [{k: enc[k][i] for k in keys} for i in range(len(lines))]
    t_tok = time.perf_counter() - t0
    t1 = time.perf_counter()
    real = 0
    batches = 0
    for i in range(0, len(features), 16):
        chunk = features[i : i + 16]
        if needs_offsets:
            # the tokenizer's pad() does not pad offset mappings: pad them to the batch's
            # longest row, as the collator pads the ids
            longest = max(len(f["input_ids"]) for f in chunk)
            chunk = [
                {**f, "offset_mapping": list(f["offset_mapping"]) + [(0, 0)] * (longest - len(f["input_ids"]))}
                for f in chunk
            ]
        batch = collator(chunk)
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(
            (batch["input_ids"] != tok.pad_token_id).sum()
        )
        batches += 1
    t_batch = time.perf_counter() - t1
    return t_tok, t_batch, real, batches


def main():
    snaps = glob.glob(
        os.path.join(SHARED, "hf-home/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/*")
    )
    path = os.path.join(SHARED, "corpora/en/wikipedia-leads.txt")
    if not snaps or not os.path.isfile(path):
        print(f"SKIPPED: shared data not found under {SHARED}")
        return 0
    tok = AutoTokenizer.from_pretrained(snaps[0])
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()},"
        f" tokenizer {type(tok).__name__}"
    )
    for strategy in ["token", "whole_word"]:
        best = None
        for _ in range(ROUNDS):
            r = run(tok, path, strategy)
            if best is None or r[0] + r[1] < best[0] + best[1]:
                best = r
        t_tok, t_batch, real, batches = best
        print(
            f"python {strategy:<10}: {real} tokens in {batches} batches of 16x<=128 | tokenise {t_tok:.3f}s,"
            f" mask+batch {t_batch:.3f}s | end-to-end {real / (t_tok + t_batch):.0f} tokens/s,"
            f" mask+batch alone {real / t_batch:.0f} tokens/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
