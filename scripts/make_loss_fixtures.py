#!/usr/bin/env python3
"""Write PyTorch reference values for distil's losses (src/loss/*.rs).

Deterministic: fixed seed, CPU, small random tensors; values and gradients in float32 (the
dtype distil trains in) plus float64 references of every loss value (keys `*.f64`).

    venv/bin/python scripts/make_loss_fixtures.py

writes tests/fixtures/losses/io.safetensors, read by tests/losses.rs:

  soft.student_logits [B, S, V], soft.teacher_logits [B, S, V], soft.positions [R] (i64 flat
  indices into B*S: the rows the soft loss is taken over, as distil's masked positions)
  soft.T{1,2,4}.loss [1]            nn.KLDivLoss("batchmean")(log_softmax(s/T), softmax(t/T)) * T**2
  soft.T{1,2,4}.teacher_probs [R,V] softmax(t/T) at the selected rows
  soft.T{1,2,4}.grad [B, S, V]      d loss / d student_logits (zero on unselected rows)
  mlm.logits [B, S, V], mlm.labels [B, S] (-100 = ignored), mlm.loss, mlm.grad
                                    nn.CrossEntropyLoss()(logits.view(-1, V), labels.view(-1)),
                                    as Hugging Face's *ForMaskedLM computes it
  mask [B, S] (i64, 1 = real token; row 1 is padded at its end)
  cos.student [B, S, H], cos.teacher, cos.loss, cos.grad
                                    DistilBERT's distiller.py: masked_select the real tokens,
                                    nn.CosineEmbeddingLoss("mean") with target ones
  mse.a [B, S, H], mse.b, mse.loss, mse.grad            F.mse_loss (plain mean)
  mmse.loss, mmse.grad (inputs mse.a / mse.b)           mean over real tokens of the
                                                        per-token mean squared error
  attn.student [B, NH, S, S], attn.teacher, attn.loss, attn.grad
                                    KL(teacher row || student row) summed over keys, averaged
                                    over heads and real query positions (MiniLM / TinyBERT);
                                    the rows are softmaxes with padded keys masked out, as in
                                    a real encoder

and tests/fixtures/distill/io.safetensors, read by tests/distill.rs / tests/losses.rs: the
DistilBERT objective on the tiny BERT of tests/fixtures/bert (teacher, eval mode) and a
one-layer student copied from its layer 0 (what distil's init_from_teacher builds: every other
layer of 2 is layer 0; its DistilBERT layout folds the type-0 embedding into the positions,
which equals BERT with token_type_ids = 0). Both run without dropout.

  input_ids, attention_mask, token_type_ids, labels [B2, S2] (i64; row 1 padded)
  soft.T{1,2,2.5,4}   KLDivLoss("batchmean") * T**2 at the masked positions
  hard                MLM cross-entropy (ignore_index -100)
  cos                 DistilBERT's cosine loss on the last hidden states over real tokens
  total               5 * 0.5 * soft.T2 + 2 * 0.5 * hard + 1 * cos  (λ = 0.5, T = 2)
  grad.<hf name>      d total / d student parameter (BERT names)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "losses"

SEED = 1234
B, S, V, H, NH = 2, 6, 13, 8, 3
N_PAD = 2  # row 1 is padded in its last N_PAD positions
TEMPERATURES = [1, 2, 4]
# Rows of the soft loss (flat indices into B*S), all real tokens.
SOFT_POSITIONS = [1, 3, 4, 6, 8, 9]
# MLM labels: these flat positions carry a label, every other one is -100.
LABEL_POSITIONS = [0, 2, 5, 7, 9]

# The byte-reproducible safetensors writer shared with make_fixtures.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import save_safetensors  # noqa: E402


def value_and_grad(fn, x: torch.Tensor, *rest):
    """fn(x, *rest) in float32 with d/dx, and its value in float64."""
    x32 = x.float().clone().requires_grad_(True)
    loss = fn(x32, *[r.float() for r in rest])
    (grad,) = torch.autograd.grad(loss, x32)
    with torch.no_grad():
        ref = fn(x.double(), *[r.double() for r in rest])
    return loss.detach().reshape(1), grad, ref.reshape(1)


# --- the losses, written as the reference implementations do them -------------------------


def soft_loss(s, t, positions, temperature):
    # DistilBERT distiller.py: ce_loss_fct = nn.KLDivLoss(reduction="batchmean"), over the
    # selected rows, times T**2.
    v = s.size(-1)
    s_sel = s.reshape(-1, v)[positions]
    t_sel = t.reshape(-1, v)[positions]
    kl = nn.KLDivLoss(reduction="batchmean")
    return kl(F.log_softmax(s_sel / temperature, dim=-1), F.softmax(t_sel / temperature, dim=-1)) * temperature**2


def mlm_loss(logits, labels):
    return nn.CrossEntropyLoss()(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def cosine_loss(s, t, mask):
    # DistilBERT distiller.py (alpha_cos > 0).
    m = mask.unsqueeze(-1).expand_as(s).bool()
    dim = s.size(-1)
    s_sel = torch.masked_select(s, m).view(-1, dim)
    t_sel = torch.masked_select(t, m).view(-1, dim)
    target = s_sel.new(s_sel.size(0)).fill_(1)
    return nn.CosineEmbeddingLoss(reduction="mean")(s_sel, t_sel, target)


def mse_loss(a, b):
    return F.mse_loss(a, b)


def masked_mse_loss(a, b, mask):
    per_token = ((a - b) ** 2).mean(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


def attention_kl_loss(q, p, mask):
    # MiniLM: (1 / (A_h |x|)) sum_heads sum_real_queries KL(teacher row || student row).
    # p log p with 0 log 0 = 0 (padded keys have probability exactly 0).
    log_p = p.clamp_min(1e-30).log()
    log_q = q.clamp_min(1e-30).log()
    rows = (p * (log_p - log_q)).sum(-1)  # [b, h, s]
    m = mask.to(rows.dtype)[:, None, :]
    return (rows * m).sum() / (m.sum() * q.size(1))


def attention_probs(scores, mask):
    # As an encoder does: padded keys get the dtype's minimum, then softmax over keys.
    add = (1.0 - mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
    return F.softmax(scores + add, dim=-1)


def distill_fixture() -> dict[str, torch.Tensor]:
    import transformers as tf

    torch.manual_seed(SEED + 1)
    teacher_dir = REPO / "tests" / "fixtures" / "bert"
    teacher = tf.BertForMaskedLM.from_pretrained(str(teacher_dir), attn_implementation="eager").eval()
    cfg = tf.BertConfig.from_pretrained(str(teacher_dir))
    cfg.num_hidden_layers = 1
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    student = tf.BertForMaskedLM(cfg).eval()
    state = {k: v for k, v in teacher.state_dict().items() if ".layer.1." not in k}
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    student.float()

    b2, s2, pad = 2, 8, 3
    ids = torch.randint(5, cfg.vocab_size, (b2, s2))
    mask = torch.ones(b2, s2, dtype=torch.int64)
    mask[1, s2 - pad :] = 0
    ids[1, s2 - pad :] = 0
    tt = torch.zeros(b2, s2, dtype=torch.int64)
    labels = torch.full((b2, s2), -100, dtype=torch.int64)
    for r, c in [(0, 1), (0, 4), (0, 6), (1, 0), (1, 3)]:
        labels[r, c] = ids[r, c]
        ids[r, c] = 4  # the "mask" token of this toy vocabulary
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    s_out = student(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    sel = labels.reshape(-1) != -100
    s_sel = s_out.logits.reshape(-1, cfg.vocab_size)[sel]
    t_sel = t_out.logits.reshape(-1, cfg.vocab_size)[sel]
    kl = nn.KLDivLoss(reduction="batchmean")
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt, "labels": labels}
    soft = {}
    for temp in [1.0, 2.0, 2.5, 4.0]:
        soft[temp] = kl(F.log_softmax(s_sel / temp, -1), F.softmax(t_sel / temp, -1)) * temp**2
        out[f"soft.T{temp:g}"] = soft[temp].detach().reshape(1)
    hard = nn.CrossEntropyLoss()(s_out.logits.reshape(-1, cfg.vocab_size), labels.reshape(-1))
    cos = cosine_loss(s_out.hidden_states[-1], t_out.hidden_states[-1], mask)
    out["hard"] = hard.detach().reshape(1)
    out["cos"] = cos.detach().reshape(1)
    lam = 0.5
    total = 5.0 * (1 - lam) * soft[2.0] + 2.0 * lam * hard + 1.0 * cos
    out["total"] = total.detach().reshape(1)
    student.zero_grad()
    total.backward()
    for name, p in student.named_parameters():
        if p.grad is not None:
            out[f"grad.{name}"] = p.grad.detach().clone()
    return out


def main() -> None:
    torch.manual_seed(SEED)
    out: dict[str, torch.Tensor] = {}

    mask = torch.ones(B, S, dtype=torch.int64)
    mask[1, S - N_PAD :] = 0
    out["mask"] = mask

    # Soft targets: logits of O(3) so the distributions are peaked and T matters.
    s_logits = torch.randn(B, S, V, dtype=torch.float64) * 3
    t_logits = torch.randn(B, S, V, dtype=torch.float64) * 3
    pos = torch.tensor(SOFT_POSITIONS, dtype=torch.int64)
    out["soft.student_logits"] = s_logits.float()
    out["soft.teacher_logits"] = t_logits.float()
    out["soft.positions"] = pos
    for temp in TEMPERATURES:
        loss, grad, ref = value_and_grad(lambda x, t, temp=temp: soft_loss(x, t, pos, temp), s_logits, t_logits)
        out[f"soft.T{temp}.loss"] = loss
        out[f"soft.T{temp}.loss.f64"] = ref
        out[f"soft.T{temp}.grad"] = grad
        out[f"soft.T{temp}.teacher_probs"] = F.softmax(t_logits.float().reshape(-1, V)[pos] / temp, dim=-1)

    # Hard targets.
    logits = torch.randn(B, S, V, dtype=torch.float64) * 2
    labels = torch.full((B * S,), -100, dtype=torch.int64)
    labels[LABEL_POSITIONS] = torch.randint(0, V, (len(LABEL_POSITIONS),))
    labels = labels.reshape(B, S)
    loss, grad, ref = value_and_grad(lambda x: mlm_loss(x, labels), logits)
    out["mlm.logits"] = logits.float()
    out["mlm.labels"] = labels
    out["mlm.loss"], out["mlm.grad"], out["mlm.loss.f64"] = loss, grad, ref

    # Hidden-state cosine. Padded rows get large, unrelated values: they must not count.
    hs = torch.randn(B, S, H, dtype=torch.float64)
    ht = hs + 0.7 * torch.randn(B, S, H, dtype=torch.float64)
    hs[1, S - N_PAD :] = 50 * torch.randn(N_PAD, H, dtype=torch.float64)
    ht[1, S - N_PAD :] = -50 * torch.randn(N_PAD, H, dtype=torch.float64)
    loss, grad, ref = value_and_grad(lambda x, t: cosine_loss(x, t, mask), hs, ht)
    out["cos.student"], out["cos.teacher"] = hs.float(), ht.float()
    out["cos.loss"], out["cos.grad"], out["cos.loss.f64"] = loss, grad, ref

    # MSE and masked MSE.
    a = torch.randn(B, S, H, dtype=torch.float64)
    b = a + 0.5 * torch.randn(B, S, H, dtype=torch.float64)
    b[1, S - N_PAD :] += 10.0
    out["mse.a"], out["mse.b"] = a.float(), b.float()
    loss, grad, ref = value_and_grad(mse_loss, a, b)
    out["mse.loss"], out["mse.grad"], out["mse.loss.f64"] = loss, grad, ref
    loss, grad, ref = value_and_grad(lambda x, y: masked_mse_loss(x, y, mask), a, b)
    out["mmse.loss"], out["mmse.grad"], out["mmse.loss.f64"] = loss, grad, ref

    # Attention distributions [B, NH, S, S].
    q = attention_probs(torch.randn(B, NH, S, S, dtype=torch.float64) * 2, mask)
    p = attention_probs(torch.randn(B, NH, S, S, dtype=torch.float64) * 2, mask)
    out["attn.student"], out["attn.teacher"] = q.float(), p.float()
    # The float32 inputs are what the test feeds; compute from them (padded keys exactly 0).
    loss, grad, ref = value_and_grad(lambda x, y: attention_kl_loss(x, y, mask), q.float(), p.float())
    out["attn.loss"], out["attn.grad"], out["attn.loss.f64"] = loss, grad, ref

    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"script": "scripts/make_loss_fixtures.py", "seed": str(SEED), "torch": torch.__version__}
    save_safetensors(out, OUT / "io.safetensors", meta)
    d = distill_fixture()
    (REPO / "tests" / "fixtures" / "distill").mkdir(parents=True, exist_ok=True)
    save_safetensors(d, REPO / "tests" / "fixtures" / "distill" / "io.safetensors", meta)
    for k in ["soft.T1", "soft.T2", "soft.T2.5", "soft.T4", "hard", "cos", "total"]:
        print(f"distill {k:16s} {d[k].item():.8f}")
    for k in sorted(out):
        if k.endswith(".loss"):
            print(f"{k:24s} {out[k].item():.8f}   f64 {out[k + '.f64'].item():.10f}")


if __name__ == "__main__":
    main()
