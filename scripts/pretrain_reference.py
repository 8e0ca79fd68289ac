#!/usr/bin/env python3
"""PyTorch reference for the tiny-BERT pretraining test (tests/pretrain.rs).

Trains Hugging Face `BertForMaskedLM` on the same text, cut the way distil cuts it, and prints
the held-out MLM loss / perplexity / accuracy beside the unigram perplexity on the very same
masked tokens. Used to tell "the setup cannot do better" from "distil has a bug".

Data, as distil builds it (src/data/corpus.rs, src/data/sequences.rs):
  * a unit is a non-blank line (trailing CR/LF removed); documents are runs of units separated
    by blank lines (a new file starts a new document);
  * document d is held out when SplitMix64-hash(seed 42, d) / 2^53 <= eval_fraction;
  * packed mode: units are tokenized (no special tokens), concatenated with [SEP] after each
    unit, and cut into blocks of `[CLS]` + block_size-1 tokens (the last block may be short).
Masking: DataCollatorForLanguageModeling-style, each non-special token selected with
probability 0.15, then 80% [MASK] / 10% random token (any id) / 10% kept. (distil masks an
exact per-row budget and draws random tokens from non-special ids only: same statistics.)
Optimiser: AdamW (no decay on bias / LayerNorm), linear warmup then linear decay to 0,
gradients clipped to norm 1 (HF Trainer's default, as distil's max_grad_norm).
Evaluation: --eval-masks fixed masked copies of the held-out split (generator seed 1234, the
same for every run and for --eval-model), so the model and the unigram baseline are scored on
exactly the same tokens; the final report also splits the masked tokens by what the input
shows there. On [MASK] positions a model that ignores context scores the unigram perplexity;
the 10% kept tokens (the answer is the input) alone pull the overall perplexity to ~0.7x
unigram, so look at the [MASK] line to see whether context is used.

  venv/bin/python scripts/pretrain_reference.py --tokenizer /tmp/ptrun/tokenizer/tokenizer.json
  venv/bin/python scripts/pretrain_reference.py --tokenizer ... --steps 2000
  venv/bin/python scripts/pretrain_reference.py --tokenizer ... --baseline-only   # unigram only
  # a distil run's model on the same held-out masked tokens (its own tokenizer: ids differ
  # from run to run)
  venv/bin/python scripts/pretrain_reference.py --tokenizer RUN/tokenizer/tokenizer.json \
      --eval-model RUN [--block-size N]
  venv/bin/python scripts/pretrain_reference.py --tokenizer ... --dump-batches b.pt  # for diffing
"""

import argparse
import math
import os
import time

import torch
from tokenizers import Tokenizer

M64 = (1 << 64) - 1


def mix(z):
    """SplitMix64 finaliser, as src/data/sequences.rs `mix`."""
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def is_held_out(seed, d, fraction):
    return fraction > 0.0 and (mix(mix(seed) ^ d) >> 11) / float(1 << 53) <= fraction


def read_docs(paths):
    """List of documents, each a list of unit strings."""
    docs = []
    for p in paths:
        cur = None
        with open(p, "rb") as f:
            for raw in f:
                line = raw.rstrip(b"\r\n").decode("utf-8")
                if line.strip() == "":
                    cur = None
                    continue
                if cur is None:
                    cur = []
                    docs.append(cur)
                cur.append(line)
    return docs


def pack(units, cls, sep, block):
    """cut_packed: [CLS] then block-1 tokens, [SEP] after every unit."""
    cap = block - 1
    seqs, cur = [], []
    for u in units:
        pos = 0
        while pos < len(u):
            take = min(len(u) - pos, cap - len(cur))
            cur.extend(u[pos:pos + take])
            pos += take
            if len(cur) == cap:
                seqs.append([cls] + cur)
                cur = []
        if cur:  # (a unit that ended exactly at a block boundary gets no [SEP], as in distil)
            cur.append(sep)
            if len(cur) == cap:
                seqs.append([cls] + cur)
                cur = []
    if cur:
        seqs.append([cls] + cur)
    return seqs


def build_data(args, tok):
    docs = read_docs(args.paths)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    doc_tokens = [[enc(u) for u in d] for d in docs]
    n_tok = sum(len(u) for d in doc_tokens for u in d)
    held = [is_held_out(args.split_seed, i, args.eval_fraction) for i in range(len(docs))]
    if args.eval_fraction > 0 and len(docs) > 1 and not any(held):
        held[-1] = True
    v = tok.get_vocab()
    cls, sep = v["[CLS]"], v["[SEP]"]
    train_units = [u for d, h in zip(doc_tokens, held) if not h for u in d]
    eval_units = [u for d, h in zip(doc_tokens, held) if h for u in d]
    counts = [0] * tok.get_vocab_size()
    for d in doc_tokens:
        for u in d:
            for t in u:
                counts[t] += 1
    train_counts = [0] * tok.get_vocab_size()
    for u in train_units:
        for t in u:
            train_counts[t] += 1
    return dict(
        train=pack(train_units, cls, sep, args.block_size),
        eval=pack(eval_units, cls, sep, args.block_size),
        n_docs=len(docs),
        n_units=sum(len(d) for d in docs),
        n_tokens=n_tok,
        eval_docs=sum(held),
        counts=counts,
        train_counts=train_counts,
    )


def collate(rows, pad):
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    return ids, att


def mask(ids, special_ids, mask_id, vocab, gen, p=0.15):
    """DataCollatorForLanguageModeling.torch_mask_tokens, with an explicit generator."""
    labels = ids.clone()
    prob = torch.full(ids.shape, p)
    special = torch.zeros(ids.shape, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    prob.masked_fill_(special, 0.0)
    sel = torch.bernoulli(prob, generator=gen).bool()
    labels[~sel] = -100
    ids = ids.clone()
    rep = torch.bernoulli(torch.full(ids.shape, 0.8), generator=gen).bool() & sel
    ids[rep] = mask_id
    rnd = torch.bernoulli(torch.full(ids.shape, 0.5), generator=gen).bool() & sel & ~rep
    ids[rnd] = torch.randint(vocab, ids.shape, generator=gen)[rnd]
    return ids, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="/tmp/ptrun/tokenizer/tokenizer.json")
    ap.add_argument("--paths", nargs="+", default=[
        "data/shakespeare/tempest.txt", "data/shakespeare/macbeth.txt"])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument("--split-seed", type=int, default=42)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--init-range", type=float, default=0.02)
    ap.add_argument("--max-positions", type=int, default=64,
                    help="max_position_embeddings (at least --block-size)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--baseline-only", action="store_true",
                    help="only the unigram perplexity on held-out masked tokens (no training)")
    ap.add_argument("--eval-masks", type=int, default=5,
                    help="masked copies of the held-out set (averaged; more = less noise)")
    ap.add_argument("--eval-model", default=None,
                    help="only evaluate this saved model directory (e.g. a distil run's "
                         "output_dir) on the same held-out masked tokens")
    ap.add_argument("--save", default=None, help="save the trained model here (HF layout)")
    ap.add_argument("--dump-batches", default=None,
                    help="save initial state_dict and the first training batches here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = Tokenizer.from_file(args.tokenizer)
    vocab = tok.get_vocab_size()
    v = tok.get_vocab()
    pad, cls, sep, msk = v["[PAD]"], v["[CLS]"], v["[SEP]"], v["[MASK]"]
    special = [v[s] for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if s in v]

    d = build_data(args, tok)
    print(f"vocab {vocab}; {d['n_docs']} docs ({d['eval_docs']} held out), {d['n_units']} units, "
          f"{d['n_tokens']} tokens; {len(d['train'])} train / {len(d['eval'])} eval sequences "
          f"of <= {args.block_size}")

    # held-out masked copies, fixed by a separate generator (same for every run)
    egen = torch.Generator().manual_seed(1234)
    eval_batches = []
    for _ in range(args.eval_masks):
        for i in range(0, len(d["eval"]), 64):
            ids, att = collate(d["eval"][i:i + 64], pad)
            mids, labels = mask(ids, special, msk, vocab, egen)
            eval_batches.append((mids, att, labels))

    def unigram(counts):
        total = sum(c + 1 for c in counts)
        lp = torch.tensor([math.log((c + 1) / total) for c in counts])
        nll, n = 0.0, 0
        for _, _, lab in eval_batches:
            t = lab[lab != -100]
            nll -= lp[t].sum().item()
            n += t.numel()
        return math.exp(nll / n), n

    uni_train, n_masked = unigram(d["train_counts"])
    uni_all, _ = unigram(d["counts"])
    print(f"unigram perplexity (add-one, training tokens) {uni_train:.1f}; "
          f"(add-one, whole corpus as tests/pretrain.rs) {uni_all:.1f}; "
          f"on {n_masked} masked held-out tokens")
    if args.baseline_only:
        return

    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.intermediate,
        max_position_embeddings=max(args.max_positions, args.block_size),
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout, initializer_range=args.init_range,
        pad_token_id=pad,
    )
    model = BertForMaskedLM(cfg)
    if args.eval_model:
        model = BertForMaskedLM.from_pretrained(args.eval_model)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if n.endswith("bias") or "LayerNorm" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    warm = math.ceil(args.warmup_ratio * args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warm) if s < warm
        else max(0.0, (args.steps - s) / max(1, args.steps - warm)))

    total = sum(c + 1 for c in d["train_counts"])
    uni_lp = torch.tensor([math.log((c + 1) / total) for c in d["train_counts"]])

    def evaluate(detail=False):
        """Loss / perplexity / accuracy over all masked tokens; with `detail`, also split by
        what the input shows there ([MASK], a random token, the original token)."""
        model.eval()
        tot, n, correct = 0.0, 0, 0
        parts = {k: [0.0, 0, 0.0] for k in ("[MASK]", "random", "kept")}
        with torch.no_grad():
            for ids, att, lab in eval_batches:
                logits = model(input_ids=ids, attention_mask=att).logits
                m = lab != -100
                lg, t = logits[m], lab[m]
                nll = torch.nn.functional.cross_entropy(lg, t, reduction="none")
                tot += nll.sum().item()
                correct += (lg.argmax(-1) == t).sum().item()
                n += t.numel()
                shown = ids[m]
                for k, sel in (("[MASK]", shown == msk), ("kept", shown == t),
                               ("random", (shown != msk) & (shown != t))):
                    parts[k][0] += nll[sel].sum().item()
                    parts[k][1] += int(sel.sum())
                    parts[k][2] -= uni_lp[t[sel]].sum().item()
        model.train()
        if detail:
            for k, (l, c, u) in parts.items():
                if c:
                    print(f"  masked tokens shown as {k:6s}: {c:5d}, model perplexity "
                          f"{math.exp(l / c):7.1f}, unigram {math.exp(u / c):6.1f}")
        return tot / n, math.exp(tot / n), correct / n

    if args.eval_model:
        el, ep, ea = evaluate(detail=True)
        print(f"MODEL {args.eval_model}: eval loss {el:.4f}, perplexity {ep:.1f}, "
              f"accuracy {100 * ea:.1f}%; unigram perplexity {uni_train:.1f} "
              f"(ratio {ep / uni_train:.2f})")
        return

    gen = torch.Generator().manual_seed(args.seed)
    train = d["train"]
    dump = {"init": {k: v.clone() for k, v in model.state_dict().items()}, "batches": []}
    step, t0, order, oi = 0, time.time(), [], 0
    model.train()
    while step < args.steps:
        if oi >= len(order):
            order = torch.randperm(len(train), generator=gen).tolist()
            oi = 0
        rows = [train[i] for i in order[oi:oi + args.batch]]
        oi += args.batch
        ids, att = collate(rows, pad)
        mids, labels = mask(ids, special, msk, vocab, gen)
        if args.dump_batches and len(dump["batches"]) < 20:
            dump["batches"].append((mids, att, labels))
        out = model(input_ids=mids, attention_mask=att, labels=labels)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            el, ep, ea = evaluate()
            print(f"step {step:5d}  train loss {out.loss.item():.3f}  grad norm {gn:.3f}  "
                  f"eval loss {el:.3f}  ppl {ep:.1f}  acc {100 * ea:.1f}%  "
                  f"({time.time() - t0:.0f}s)", flush=True)
    el, ep, ea = evaluate(detail=True)
    print(f"FINAL steps {args.steps} lr {args.lr} batch {args.batch}: eval loss {el:.4f}, "
          f"perplexity {ep:.1f}, accuracy {100 * ea:.1f}%; unigram perplexity {uni_train:.1f} "
          f"(ratio {ep / uni_train:.2f}); {time.time() - t0:.0f}s")
    if args.dump_batches:
        torch.save(dump, args.dump_batches)
    if args.save:
        model.save_pretrained(args.save)
        os.makedirs(os.path.join(args.save, "tokenizer"), exist_ok=True)
        tok.save(os.path.join(args.save, "tokenizer", "tokenizer.json"))


if __name__ == "__main__":
    main()
