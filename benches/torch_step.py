#!/usr/bin/env python3
"""PyTorch reference timing of one BERT masked-LM step, to set beside distil's Rust benchmark.

    venv/bin/python benches/torch_step.py --shape small --mode train --threads 2
    venv/bin/python benches/torch_step.py --shape base --batch 8 --seq 128 --mode forward

Shapes (BertForMaskedLM, randomly initialised, float32):
  small: 4 layers, hidden 256, 4 heads, intermediate 1024, vocab 8000
  base:  12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522 (bert-base-uncased)

--mode forward: model.eval() under torch.no_grad(), input ids -> MLM logits [batch, seq, vocab].
--mode train:   model.train() (dropout --dropout), forward + MLM cross-entropy over a fixed 15%
                of positions (replaced by [MASK]) + backward + torch.optim.AdamW step + zero_grad.
                --no-optim leaves the AdamW step out (the gradients are still dropped each
                step): distil's benches/encoder_step.rs has no optimiser step yet.
                --head-on all (default, what HF does) runs the vocabulary projection on every
                position; --head-on masked runs it only on the masked positions.

Inputs are fixed random ids (seed 0). Each of --warmup + --iters steps is timed separately
(perf_counter, with cuda synchronize on GPU); the median of the --iters timed steps is reported, with the medians of its parts
(encoder_s, head_s: MLM head + loss, backward_s, optim_s). Prints one JSON line;
tokens_per_s = batch * seq / median_s; peak_rss_mb is the process's peak resident set size
(ru_maxrss, includes the Python/torch runtime, read before --peak runs); matmul_flops counts
the matmuls the step does (2*m*n*k each, x3 with the backward; the optimiser is not counted)
and gflops is that over median_s. --peak also times a few --peak-size^3 fp32 torch.mm and
reports the best as peak_gflops.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

SHAPES = {
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024, vocab_size=8000),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
}


def matmul_flops(shape: dict, batch: int, seq: int, head_rows: int) -> float:
    """Matmul FLOPs of one forward pass (2*m*n*k per matmul): every layer over batch*seq
    tokens, then the MLM head (dense h x h and the vocabulary projection) over head_rows rows.
    Keep in step with forward_matmul_flops in encoder_step.rs."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    t = batch * seq
    per_layer = 2 * t * h * h * 4 + 2 * t * h * f * 2 + 2 * batch * seq * seq * h * 2
    return float(shape["num_hidden_layers"] * per_layer + 2 * head_rows * h * h + 2 * head_rows * h * v)


def matmul_peak(n: int, dev, sync) -> float:
    """Best GFLOP/s of a few n x n @ n x n fp32 matmuls."""
    import torch

    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    a @ b
    best = float("inf")
    deadline = time.perf_counter() + 3
    for i in range(8):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return 2 * n**3 / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--mode", choices=["forward", "train"], default="train")
    ap.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=True,
                    help="attn_implementation sdpa (default) or eager (--no-sdpa)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout in train mode")
    ap.add_argument("--head-on", choices=["all", "masked"], default="all",
                    help="train mode: vocabulary projection on all positions or only masked ones")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-optim", action="store_true",
                    help="train mode: no optimiser step (forward + loss + backward + drop the gradients)")
    ap.add_argument("--peak", action="store_true", help="also time an fp32 matmul for the machine's peak")
    ap.add_argument("--peak-size", type=int, default=2048)
    args = ap.parse_args()

    import torch
    import transformers as tf

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(args.threads)
        except RuntimeError:
            pass
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    attn = "sdpa" if args.sdpa else "eager"

    shape = SHAPES[args.shape]
    drop = args.dropout if args.mode == "train" else 0.0
    cfg = tf.BertConfig(**shape, max_position_embeddings=max(512, args.seq), type_vocab_size=2,
                        hidden_dropout_prob=drop, attention_probs_dropout_prob=drop)
    model = tf.BertForMaskedLM._from_config(cfg, attn_implementation=attn).to(dev)

    g = torch.Generator().manual_seed(0)
    vocab = shape["vocab_size"]
    mask_id = 103 if vocab > 103 else 4  # [MASK] in the bert-base-uncased vocabulary
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (args.batch, args.seq), generator=g)
    attention_mask = torch.ones_like(ids)
    masked = torch.rand(args.batch, args.seq, generator=g) < 0.15
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    train_ids = torch.where(masked, torch.full_like(ids, mask_id), ids)
    ids, train_ids, attention_mask, labels, masked = (t.to(dev) for t in (ids, train_ids, attention_mask, labels, masked))

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    loss_val = None

    # Each step fills `parts` with the time of its encoder, head (+ loss), backward and
    # optimiser. BertForMaskedLM.forward is exactly model.bert, then model.cls, then
    # CrossEntropyLoss over labels != -100: calling the parts directly lets them be timed.
    parts: dict[str, float] = {}

    def mark(name: str, t0: float) -> float:
        sync()
        t = time.perf_counter()
        parts[name] = t - t0
        return t

    if args.mode == "forward":
        model.eval()

        def step():
            t = time.perf_counter()
            with torch.no_grad():
                h = model.bert(input_ids=ids, attention_mask=attention_mask).last_hidden_state
                t = mark("encoder", t)
                logits = model.cls(h)
                mark("head", t)
            return logits
    else:
        model.train()
        opt = None if args.no_optim else torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        ce = torch.nn.CrossEntropyLoss()

        def step():
            nonlocal loss_val
            t = time.perf_counter()
            h = model.bert(input_ids=train_ids, attention_mask=attention_mask).last_hidden_state
            t = mark("encoder", t)
            if args.head_on == "all":
                logits = model.cls(h)
                loss = ce(logits.view(-1, vocab), labels.view(-1))
            else:
                logits = model.cls(h[masked])
                loss = ce(logits, labels[masked])
            t = mark("head", t)
            loss.backward()
            t = mark("backward", t)
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            mark("optim", t)
            loss_val = loss.detach()
            return loss_val

    times = []
    part_times: dict[str, list[float]] = {}
    for i in range(args.warmup + args.iters):
        sync()
        t0 = time.perf_counter()
        out = step()
        del out
        sync()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            for k, v in parts.items():
                part_times.setdefault(k, []).append(v)

    median_s = statistics.median(times)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    head_rows = int(masked.sum()) if args.mode == "train" and args.head_on == "masked" else args.batch * args.seq
    flops = matmul_flops(shape, args.batch, args.seq, head_rows) * (3 if args.mode == "train" else 1)
    out = {
        "framework": "pytorch",
        "shape": args.shape,
        "mode": args.mode,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": round(args.batch * args.seq / median_s, 1),
        "median_s": round(median_s, 6),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "min_s": round(min(times), 6),
        "max_s": round(max(times), 6),
        "iters": args.iters,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "attn": attn,
        "device": str(dev),
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "transformers": tf.__version__,
    }
    for k, v in part_times.items():
        if k != "optim" or opt is not None:
            out[f"{k}_s"] = round(statistics.median(v), 6)
    out.update(matmul_flops=flops, gflops=round(flops / median_s / 1e9, 1))
    if args.mode == "train":
        out.update(optimizer=opt is not None, dropout=drop, head_on=args.head_on,
                   masked_tokens=int(masked.sum()), last_loss=round(float(loss_val), 6))
    if args.peak:
        peak = matmul_peak(args.peak_size, dev, sync)
        out.update(peak_gflops=round(peak, 1), peak_size=args.peak_size,
                   pct_of_peak=round(100 * flops / median_s / 1e9 / peak, 1))
    if dev.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
