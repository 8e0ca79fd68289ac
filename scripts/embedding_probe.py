#!/usr/bin/env python3
"""Compare a distilled sentence-embedding student with its teacher (issue 5's MiniLM check).

    HF_HOME=../shared/hf-home HF_HUB_OFFLINE=1 venv/bin/python scripts/embedding_probe.py \
        --teacher sentence-transformers/all-MiniLM-L6-v2 --student runs/minilm-3l \
        --bbc ../shared/corpora/en/bbc-news.jsonl

Both models embed every BBC News article (first 128 tokens, mean pooling over real tokens, as
sentence-transformers does for all-MiniLM-L6-v2). The BBC text was never seen in training, so it
is held-out text for both. Prints
  * the mean cosine similarity between student and teacher embeddings of the same article;
  * each model's accuracy on a linear probe (multinomial logistic regression on the frozen
    embeddings, 80/20 split with a fixed seed, features standardised on the training part).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModel, AutoTokenizer


def embed(model, tok, texts, max_len, batch):
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1).clamp(min=1e-9))
    return torch.cat(out)


def probe(x, y, seed, epochs=300):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp(min=1e-6)
    xs = (x - mu) / sd
    n_cls = int(y.max()) + 1
    lin = torch.nn.Linear(x.shape[1], n_cls)
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=epochs)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xs[tr]), y[tr]) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (lin(xs[te]).argmax(1) == y[te]).float().mean().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--bbc", required=True)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rows = [json.loads(l) for l in open(args.bbc, encoding="utf-8") if l.strip()]
    texts = [r["text"] for r in rows]
    labels = sorted({r["label"] for r in rows})
    y = torch.tensor([labels.index(r["label"]) for r in rows])
    tok = AutoTokenizer.from_pretrained(args.teacher)
    result = {"articles": len(texts), "classes": labels}
    embs = {}
    for name, path in [("teacher", args.teacher), ("student", args.student)]:
        model = AutoModel.from_pretrained(path)
        embs[name] = embed(model, tok, texts, args.max_len, args.batch)
        result[name] = {
            "layers": model.config.num_hidden_layers,
            "parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pooler")),
            "probe_accuracy": probe(embs[name], y, args.seed),
        }
    cos = torch.nn.functional.cosine_similarity(embs["teacher"], embs["student"], dim=1)
    result["mean_cosine_student_teacher"] = cos.mean().item()
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
