#!/usr/bin/env python3
"""PyTorch reference timing of one BERT masked-LM step (or one distillation step), to set beside
distil's Rust benchmark.

    venv/bin/python benches/torch_step.py --shape small --mode train --threads 2
    venv/bin/python benches/torch_step.py --shape base --batch 8 --seq 128 --mode forward
    venv/bin/python benches/torch_step.py --shape small --mode distill --threads 2

Shapes (BertForMaskedLM, randomly initialised, float32):
  small: 4 layers, hidden 256, 4 heads, intermediate 1024, vocab 8000
  base:  12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522 (bert-base-uncased)

--mode forward: model.eval() under torch.no_grad(), input ids -> MLM logits [batch, seq, vocab].
--mode train:   model.train() (dropout --dropout), forward + MLM cross-entropy over a fixed 15%
                of positions (replaced by [MASK]) + backward + AdamW step + zero_grad.
                --no-optim leaves the AdamW step out (the gradients are still dropped each
                step): distil's benches/encoder_step.rs has no optimiser step yet.
                --head-on all (default, what HF does) runs the vocabulary projection on every
                position; --head-on masked runs it only on the masked positions.
--mode distill: one DistilBERT-style distillation step (distil's issue 6), as encoder_step.rs
                --mode distill. Teacher: BertForMaskedLM of the shape in eval mode under
                torch.no_grad(). Student: DistilBertForMaskedLM of the same width and vocabulary
                with --student-layers layers (small: 2, base: 6), dropout --dropout, its weights
                copied from teacher layers spread evenly over the stack (as distil's
                init_from_teacher). Both run the MLM head on the masked rows only (the hidden
                rows are selected first). Loss, written plainly: 5 * F.kl_div(log_softmax(s/T),
                softmax(t/T), batchmean) * T^2 (T = 2) + 2 * cross-entropy on the masked rows
                + 1 * F.cosine_embedding_loss of the last hidden states over non-padding tokens;
                backward; AdamW in two groups (weight decay 0.01, none on biases and LayerNorm
                weights, as distil's). Batch 16 x 128 for small, 8 x 128 for base unless
                --batch/--seq say otherwise; the ids and the masked positions come from
                shared_batch, which encoder_step.rs reproduces, so both sides see the same batch.
                Parts: teacher_s (teacher encoder + head + softmax at T), encoder_s (student
                encoder), head_s (student head + the three losses), backward_s, optim_s.
                matmul_flops is the teacher's forward plus 3 x the student's.

Inputs are fixed random ids (seed 0). Each of --warmup + --iters steps is timed separately
(perf_counter, with cuda synchronize on GPU); the median of the --iters timed steps is reported, with the medians of its parts
(encoder_s, head_s: MLM head + loss, backward_s, optim_s). Prints one JSON line;
tokens_per_s = batch * seq / median_s; peak_rss_mb is the process's peak resident set size
(ru_maxrss, includes the Python/torch runtime, read before --peak runs), huge_pages_mb its
memory in transparent huge pages at that time; matmul_flops counts
the matmuls the step does (2*m*n*k each, x3 with the backward; the optimiser is not counted)
and gflops is that over median_s. --peak also times a few --peak-size^3 fp32 torch.mm and
reports the best as peak_gflops.

AdamW (both modes that train): torch.optim.AdamW(fused=True), PyTorch's fastest AdamW on
the CPU (6x its default for-loop one on a 66M-parameter student), in two groups as distil's:
weight decay 0.01, none on biases and LayerNorm weights.

--device cuda runs it on the GPU (synchronising around each timed part). --dtype bf16 runs the
forward passes and losses under torch.autocast(bfloat16) (mixed precision, as distil's
training.bf16: fp32 weights, gradients and AdamW state; the backward follows the forward's
dtypes), and --peak then times bf16 matmuls. --compile wraps the encoders (teacher.bert and
the student's distilbert / bert) in torch.compile; the warm-up steps absorb the compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import sys
import time

SHAPES = {
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024, vocab_size=8000),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
}


# Distill mode's temperature and loss weights, as recipes/distilbert.yaml and encoder_step.rs.
TEMPERATURE = 2.0
W_SOFT, W_HARD, W_COSINE = 5.0, 2.0, 1.0


def matmul_flops(shape: dict, batch: int, seq: int, head_rows: int, layers: int | None = None) -> float:
    """Matmul FLOPs of one forward pass (2*m*n*k per matmul): every layer over batch*seq
    tokens, then the MLM head (dense h x h and the vocabulary projection) over head_rows rows.
    Keep in step with forward_matmul_flops in encoder_step.rs."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    t = batch * seq
    per_layer = 2 * t * h * h * 4 + 2 * t * h * f * 2 + 2 * batch * seq * seq * h * 2
    layers = shape["num_hidden_layers"] if layers is None else layers
    return float(layers * per_layer + 2 * head_rows * h * h + 2 * head_rows * h * v)


def anon_huge_mb() -> float | None:
    """The process's anonymous memory in transparent huge pages now (AnonHugePages of
    /proc/self/smaps_rollup), MB: whether the kernel granted the huge pages asked for."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def shared_batch(tokens: int, vocab: int, low: int, n_masked: int) -> tuple[list[int], list[int]]:
    """Distill mode's batch: `tokens` ids in low..vocab and n_masked distinct masked positions
    (sorted), from one splitmix64 stream (seed 0), exactly as shared_batch in encoder_step.rs."""
    mask64 = (1 << 64) - 1
    state = 0

    def draw() -> int:
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & mask64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        return z ^ (z >> 31)

    ids = [low + draw() % (vocab - low) for _ in range(tokens)]
    # The masked positions: the n_masked smallest of one draw per position (ties by position).
    keyed = sorted((draw(), p) for p in range(tokens))
    return ids, sorted(p for _, p in keyed[:n_masked])


def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers spread evenly from the first to the last, as distil's default_layer_map
    (12 -> 6: 0, 2, 4, 7, 9, 11)."""
    if student_layers <= 1:
        return [0] * student_layers
    return [int(i * (teacher_layers - 1) / (student_layers - 1) + 0.5) for i in range(student_layers)]


def student_from_teacher(teacher, student, layer_map: list[int]) -> None:
    """Copies the BERT teacher's embeddings, the mapped layers and the MLM head into the
    DistilBERT student, folding the type-0 token embedding into the positions (as distil's
    init_from_teacher does for a student without token types)."""
    import torch

    tb, sd = teacher.bert, student.distilbert
    with torch.no_grad():
        e = tb.embeddings
        sd.embeddings.word_embeddings.weight.copy_(e.word_embeddings.weight)
        n = sd.embeddings.position_embeddings.weight.shape[0]
        sd.embeddings.position_embeddings.weight.copy_(
            e.position_embeddings.weight[:n] + e.token_type_embeddings.weight[0])
        sd.embeddings.LayerNorm.load_state_dict(e.LayerNorm.state_dict())
        for k, l in enumerate(layer_map):
            src, dst = tb.encoder.layer[l], sd.transformer.layer[k]
            a = src.attention
            for name, lin in (("q_lin", a.self.query), ("k_lin", a.self.key), ("v_lin", a.self.value),
                              ("out_lin", a.output.dense)):
                getattr(dst.attention, name).load_state_dict(lin.state_dict())
            dst.sa_layer_norm.load_state_dict(a.output.LayerNorm.state_dict())
            dst.ffn.lin1.load_state_dict(src.intermediate.dense.state_dict())
            dst.ffn.lin2.load_state_dict(src.output.dense.state_dict())
            dst.output_layer_norm.load_state_dict(src.output.LayerNorm.state_dict())
        p = teacher.cls.predictions
        student.vocab_transform.load_state_dict(p.transform.dense.state_dict())
        student.vocab_layer_norm.load_state_dict(p.transform.LayerNorm.state_dict())
        student.vocab_projector.bias.copy_(p.bias)


def adamw(model, lr: float):
    """AdamW as distil's: two groups (weight decay 0.01, none on biases and LayerNorm
    weights), the fused implementation (PyTorch's fastest on CPU and GPU)."""
    import torch

    groups: dict[bool, list] = {True: [], False: []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups[not (n.endswith(".bias") or "LayerNorm" in n or "layer_norm" in n)].append(p)
    return torch.optim.AdamW(
        [{"params": groups[True], "weight_decay": 0.01}, {"params": groups[False], "weight_decay": 0.0}],
        lr=lr, fused=True)


def matmul_peak(n: int, dev, sync, dtype=None) -> float:
    """Best GFLOP/s of a few n x n @ n x n matmuls (fp32 unless dtype says otherwise)."""
    import torch

    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
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
    ap.add_argument("--batch", type=int, default=None, help="default: 16 for small distill, 8 otherwise")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--mode", choices=["forward", "train", "distill"], default="train")
    ap.add_argument("--student-layers", type=int, default=None, help="distill mode (default: small 2, base 6)")
    ap.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=True,
                    help="attn_implementation sdpa (default) or eager (--no-sdpa)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: forward passes and losses under torch.autocast(bfloat16), fp32 weights and optimiser")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    ap.add_argument("--dropout", type=float, default=0.1,
                    help="hidden and attention dropout in train mode (the student's in distill mode)")
    ap.add_argument("--head-on", choices=["all", "masked"], default="all",
                    help="train mode: vocabulary projection on all positions or only masked ones")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-optim", action="store_true",
                    help="train and distill modes: no optimiser step (forward + loss + backward + drop the gradients)")
    ap.add_argument("--peak", action="store_true", help="also time a matmul (fp32, or bf16 with --dtype bf16) for the machine's peak")
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--lockstep", action="store_true",
                    help="step when told (benches/lockstep.py): after the warm-up print {\"ready\": true}, then "
                         "before each timed step read a line from stdin (end of input ends the timing) and after "
                         "it print {\"step_s\": ...}; the rest (--peak, the summary line) waits for the end of stdin")
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
    distill = args.mode == "distill"
    if args.batch is None:
        args.batch = 16 if distill and args.shape == "small" else 8
    drop = args.dropout if args.mode != "forward" else 0.0
    teacher = None
    if distill:
        # The teacher keeps BERT's dropout in its config but runs in eval mode, frozen, under
        # no_grad; the student is a DistilBERT of the same width built from it.
        cfg = tf.BertConfig(**shape, max_position_embeddings=max(512, args.seq), type_vocab_size=2)
        teacher = tf.BertForMaskedLM._from_config(cfg, attn_implementation=attn).eval()
        teacher.requires_grad_(False)
        layers = shape["num_hidden_layers"]
        student_layers = args.student_layers or {"small": 2, "base": 6}[args.shape]
        if not 1 <= student_layers <= layers:
            ap.error(f"--student-layers must be 1 to {layers}")
        scfg = tf.DistilBertConfig(vocab_size=shape["vocab_size"], dim=shape["hidden_size"], n_layers=student_layers,
                                   n_heads=shape["num_attention_heads"], hidden_dim=shape["intermediate_size"],
                                   max_position_embeddings=max(512, args.seq), dropout=drop,
                                   attention_dropout=drop, activation="gelu")
        model = tf.DistilBertForMaskedLM._from_config(scfg, attn_implementation=attn)
        student_from_teacher(teacher, model, default_layer_map(layers, student_layers))
        teacher, model = teacher.to(dev), model.to(dev)
    else:
        cfg = tf.BertConfig(**shape, max_position_embeddings=max(512, args.seq), type_vocab_size=2,
                            hidden_dropout_prob=drop, attention_probs_dropout_prob=drop)
        model = tf.BertForMaskedLM._from_config(cfg, attn_implementation=attn).to(dev)

    g = torch.Generator().manual_seed(0)
    vocab = shape["vocab_size"]
    mask_id = 103 if vocab > 103 else 4  # [MASK] in the bert-base-uncased vocabulary
    low = 1000 if vocab > 2000 else 5
    if distill:
        # The same ids and masked positions (exactly 15%) as encoder_step.rs --mode distill.
        tokens = args.batch * args.seq
        n_masked = max(1, math.floor(tokens * 0.15 + 0.5))
        flat_ids, positions = shared_batch(tokens, vocab, low, n_masked)
        ids = torch.tensor(flat_ids, dtype=torch.long).view(args.batch, args.seq)
        masked = torch.zeros(tokens, dtype=torch.bool)
        masked[positions] = True
        masked = masked.view(args.batch, args.seq)
        mask_id = 103
    else:
        ids = torch.randint(low, vocab, (args.batch, args.seq), generator=g)
        masked = torch.rand(args.batch, args.seq, generator=g) < 0.15
    attention_mask = torch.ones_like(ids)
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    train_ids = torch.where(masked, torch.full_like(ids, mask_id), ids)
    ids, train_ids, attention_mask, labels, masked = (t.to(dev) for t in (ids, train_ids, attention_mask, labels, masked))

    if args.compile:
        if distill:
            teacher.bert = torch.compile(teacher.bert)
            model.distilbert = torch.compile(model.distilbert)
        else:
            model.bert = torch.compile(model.bert)
    bf16 = args.dtype == "bf16"

    def amp():
        """The forward passes' context: autocast to bfloat16 with --dtype bf16."""
        if bf16:
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    loss_val = None
    loss_parts = None

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
            with torch.no_grad(), amp():
                h = model.bert(input_ids=ids, attention_mask=attention_mask).last_hidden_state
                t = mark("encoder", t)
                logits = model.cls(h)
                mark("head", t)
            return logits
    elif distill:
        import torch.nn.functional as F

        model.train()
        opt = None if args.no_optim else adamw(model, args.lr)
        real = attention_mask.bool()
        T = TEMPERATURE

        def student_head(h):
            # DistilBertForMaskedLM.forward's head, on the rows given.
            return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))

        def step():
            nonlocal loss_val, loss_parts
            t = time.perf_counter()
            with torch.no_grad(), amp():
                t_last = teacher.bert(input_ids=train_ids, attention_mask=attention_mask).last_hidden_state
                t_probs = F.softmax(teacher.cls(t_last[masked]) / T, dim=-1)
            t = mark("teacher", t)
            with amp():
                s_last = model.distilbert(input_ids=train_ids, attention_mask=attention_mask).last_hidden_state
            t = mark("encoder", t)
            with amp():
                s_logits = student_head(s_last[masked])
                soft = F.kl_div(F.log_softmax(s_logits / T, dim=-1), t_probs, reduction="batchmean") * T**2
                hard = F.cross_entropy(s_logits, labels[masked])
                s_real, t_real = s_last[real], t_last[real]
                cos = F.cosine_embedding_loss(s_real, t_real, s_real.new_ones(s_real.shape[0]))
                loss = W_SOFT * soft + W_HARD * hard + W_COSINE * cos
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
            loss_parts = (soft.detach(), hard.detach(), cos.detach())
            return loss_val
    else:
        model.train()
        opt = None if args.no_optim else adamw(model, args.lr)
        ce = torch.nn.CrossEntropyLoss()

        def step():
            nonlocal loss_val
            t = time.perf_counter()
            with amp():
                h = model.bert(input_ids=train_ids, attention_mask=attention_mask).last_hidden_state
            t = mark("encoder", t)
            with amp():
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
        if args.lockstep and i >= args.warmup:
            if i == args.warmup:
                print(json.dumps({"ready": True}), flush=True)
            if not sys.stdin.readline():
                break
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
            if args.lockstep:
                print(json.dumps({"step_s": dt}), flush=True)
    if not times:
        print("no step was timed (--lockstep: stdin ended before the first)", file=sys.stderr)
        return 1
    if args.lockstep:
        # Nothing more (the peak matmul) until told: the other side may still be stepping.
        while sys.stdin.readline():
            pass

    median_s = statistics.median(times)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    huge_pages_mb = anon_huge_mb()
    head_on_masked = distill or args.mode == "train" and args.head_on == "masked"
    head_rows = int(masked.sum()) if head_on_masked else args.batch * args.seq
    if distill:
        teacher_flops = matmul_flops(shape, args.batch, args.seq, head_rows)
        flops = teacher_flops + 3 * matmul_flops(shape, args.batch, args.seq, head_rows, layers=student_layers)
    else:
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
        "huge_pages_mb": None if huge_pages_mb is None else round(huge_pages_mb, 1),
        "min_s": round(min(times), 6),
        "max_s": round(max(times), 6),
        "iters": args.iters,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "attn": attn,
        "adamw": "fused",
        "device": str(dev),
        "dtype": args.dtype,
        "compile": args.compile,
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "transformers": tf.__version__,
    }
    if distill:
        out.update(teacher_params=sum(p.numel() for p in teacher.parameters()), teacher_layers=layers,
                   student_layers=student_layers)
    for k, v in part_times.items():
        if k != "optim" or opt is not None:
            out[f"{k}_s"] = round(statistics.median(v), 6)
    out.update(matmul_flops=flops)
    if distill:
        out.update(teacher_matmul_flops=teacher_flops)
    out.update(gflops=round(flops / median_s / 1e9, 1))
    if args.mode != "forward":
        out.update(optimizer=opt is not None, dropout=drop, head_on="masked" if distill else args.head_on,
                   masked_tokens=int(masked.sum()), last_loss=round(float(loss_val), 6))
    if distill:
        out.update(temperature=TEMPERATURE, loss=f"{W_SOFT:g}*soft + {W_HARD:g}*hard + {W_COSINE:g}*cosine")
        out.update({k: round(float(v), 6) for k, v in zip(("loss_soft", "loss_hard", "loss_cosine"), loss_parts)})
    if args.peak:
        peak = matmul_peak(args.peak_size, dev, sync, torch.bfloat16 if bf16 else None)
        out.update(peak_gflops=round(peak, 1), peak_size=args.peak_size,
                   pct_of_peak=round(100 * flops / median_s / 1e9 / peak, 1))
    if dev.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
