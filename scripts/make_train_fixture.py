#!/usr/bin/env python3
"""Reference training run for tests/train_parity.rs: 12 AdamW steps of BertForMaskedLM from
tests/fixtures/bert (dropout off), on fixed random batches, with two parameter groups (no weight
decay on biases and LayerNorm weights), gradient clipping at norm 1.0 and a linear warmup/decay
schedule. Writes tests/fixtures/train/io.safetensors: the batches, the loss and gradient norm of
every step, and every parameter after the last step.

    venv/bin/python scripts/make_train_fixture.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import BertForMaskedLM, get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import FIXTURES, save_safetensors  # noqa: E402

STEPS, B, S, LR, WD, CLIP, WARMUP = 12, 4, 16, 5e-3, 0.01, 1.0, 3


def main() -> int:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = BertForMaskedLM.from_pretrained(
        FIXTURES / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager")
    model.train()
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, STEPS)
    g = torch.Generator().manual_seed(1)
    out = {}
    losses, norms = [], []
    for step in range(STEPS):
        ids = torch.randint(5, 99, (B, S), generator=g)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, -5:] = 0
        ids[1, -5:] = 0
        labels = torch.full((B, S), -100, dtype=torch.long)
        pick = torch.rand(B, S, generator=g) < 0.25
        pick &= mask.bool()
        pick[0, 1] = True
        labels[pick] = ids[pick]
        ids = ids.clone()
        ids[pick] = 3  # a stand-in [MASK] id
        out[f"input_ids.{step}"], out[f"attention_mask.{step}"], out[f"labels.{step}"] = ids, mask, labels
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        norms.append(norm.item())
    out["losses"] = torch.tensor(losses)
    out["grad_norms"] = torch.tensor(norms)
    for n, p in model.named_parameters():
        out[f"final.{n}"] = p.detach().clone()
    d = FIXTURES / "train"
    d.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, d / "io.safetensors", metadata={"steps": str(STEPS), "lr": str(LR), "weight_decay": str(WD),
                                                          "clip": str(CLIP), "warmup": str(WARMUP)})
    print("losses", " ".join(f"{x:.5f}" for x in losses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
