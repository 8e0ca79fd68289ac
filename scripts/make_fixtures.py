#!/usr/bin/env python3
"""Write the Hugging Face reference fixtures under tests/fixtures/.

Deterministic: fixed seeds, fixed inputs, CPU, float32, eager attention.

    venv/bin/python scripts/make_fixtures.py                # all fixtures
    venv/bin/python scripts/make_fixtures.py --only bert     # one layout
    venv/bin/python scripts/make_fixtures.py --skip-minilm   # no real model needed

Per tiny layout (bert, roberta, distilbert, albert), tests/fixtures/<layout>/ holds
  config.json, model.safetensors   save_pretrained(safe_serialization=True)
  io.safetensors                   inputs, hidden_states.{i}, attentions.{i}, logits,
                                   loss [1], grad.<param name> (model.eval(), dropout off)
  param_names.txt                  model.state_dict().keys()
  grad_names.txt                   model.named_parameters() names
tests/fixtures/minilm/ holds io.safetensors + sentences.json from
sentence-transformers/all-MiniLM-L6-v2 (needs HF_HOME pointing at ../shared/hf-home,
or set it with --hf-home).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"

SEED = 0
BATCH, SEQ, VOCAB = 2, 12, 99
N_PAD = 4  # row 1 is padded in its last N_PAD positions
# Initializer std used by init_weights(). The HF default (0.02) makes attention nearly
# uniform and the logits nearly flat in a 32-wide model, which would hide mistakes such as
# a wrong attention scale; 0.2 gives O(1) activations and peaked attention.
INIT_STD = 0.2
# Extra noise on every LayerNorm weight/bias and every bias, so none is exactly 1 or 0.
NOISE_STD = 0.05

# Positions (per row) that carry an MLM label; all are non-pad positions.
LABEL_POS = [[1, 4, 7, 10], [1, 3, 5, 6]]

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = [
    "The cat sat on the mat.",
    "Distillation trains a small student network to imitate the predictions of a larger teacher.",
    "Photosynthesis converts light into chemical energy.",
    "Hello!",
    "The ornithologist catalogued an unusually iridescent hummingbird near Quetzaltenango last spring.",
]


_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64"}


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Byte-reproducible safetensors writer.

    safetensors.torch.save_file orders __metadata__ through a hash map, so two runs give
    different bytes. This writes the same format with a sorted, compact JSON header and
    tensors in name order (f32 / i64 only, little-endian, C order).
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = _DTYPES[str(t.dtype).removeprefix("torch.")]
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(len(js).to_bytes(8, "little"))
        f.write(js)
        for b in blobs:
            f.write(b)
    # Round-trip check with the reference reader.
    from safetensors.torch import load_file
    import torch
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k].detach().cpu()) for k in tensors)


def tiny_config(layout: str):
    import transformers as tf

    common = dict(initializer_range=INIT_STD)
    if layout == "bert":
        return tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, hidden_act="gelu",
            type_vocab_size=2, pad_token_id=0, **common,
        )
    if layout == "roberta":
        return tf.RobertaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=66, hidden_act="gelu",
            type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common,
        )
    if layout == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
            max_position_embeddings=64, activation="gelu", pad_token_id=0, **common,
        )
    if layout == "albert":
        return tf.AlbertConfig(
            vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=4,
            num_hidden_groups=2, inner_group_num=1, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, hidden_act="gelu_new",
            type_vocab_size=2, pad_token_id=0, **common,
        )
    raise ValueError(layout)


MODEL_CLASS = {
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "distilbert": "DistilBertForMaskedLM",
    "albert": "AlbertForMaskedLM",
}


def make_inputs(layout: str):
    import torch

    g = torch.Generator().manual_seed(1234)
    pad = 1 if layout == "roberta" else 0
    # Ordinary token ids avoid 0..4 (pad / specials in every layout).
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    n_real = [SEQ, SEQ - N_PAD]
    if layout == "roberta":
        for b, n in enumerate(n_real):
            ids[b, 0] = 0  # <s>
            ids[b, n - 1] = 2  # </s>
    else:
        for b, n in enumerate(n_real):
            ids[b, 0] = 2  # a [CLS]-like id
            ids[b, n - 1] = 3  # a [SEP]-like id
    ids[1, SEQ - N_PAD:] = pad
    mask[1, SEQ - N_PAD:] = 0

    labels = torch.full((BATCH, SEQ), -100, dtype=torch.int64)
    for b, positions in enumerate(LABEL_POS):
        for p in positions:
            assert mask[b, p] == 1
            labels[b, p] = int(torch.randint(5, VOCAB, (1,), generator=g))

    inputs = {"input_ids": ids, "attention_mask": mask}
    if layout in ("bert", "albert"):
        tt = torch.zeros(BATCH, SEQ, dtype=torch.int64)
        tt[0, 7:] = 1  # second segment of row 0
        tt[1, 5:SEQ - N_PAD] = 1  # second segment of row 1, padding stays 0
        inputs["token_type_ids"] = tt
    return inputs, labels


def perturb(model):
    """Add N(0, NOISE_STD) to every LayerNorm weight/bias and every bias."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * NOISE_STD)


def make_tiny(layout: str) -> None:
    import torch
    import transformers as tf

    out = FIXTURES / layout
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    cfg = tiny_config(layout)
    cls = getattr(tf, MODEL_CLASS[layout])
    model = cls._from_config(cfg, attn_implementation="eager")
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    model.init_weights()
    perturb(model)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)

    inputs, labels = make_inputs(layout)
    model.zero_grad(set_to_none=True)
    res = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True)
    res.loss.backward()

    t = {k: v.contiguous() for k, v in inputs.items()}
    t["labels"] = labels
    for i, h in enumerate(res.hidden_states):
        t[f"hidden_states.{i}"] = h.detach().float().contiguous()
    for i, a in enumerate(res.attentions):
        t[f"attentions.{i}"] = a.detach().float().contiguous()
    t["logits"] = res.logits.detach().float().contiguous()
    t["loss"] = res.loss.detach().float().reshape(1)

    grad_names = []
    missing_grads = []
    for name, p in model.named_parameters():
        grad_names.append(name)
        if p.grad is None:
            missing_grads.append(name)
            g = torch.zeros_like(p)
        else:
            g = p.grad
        t[f"grad.{name}"] = g.detach().float().contiguous()
    save_safetensors(t, out / "io.safetensors", metadata={
        "layout": layout,
        "model_class": MODEL_CLASS[layout],
        "transformers": tf.__version__,
        "torch": torch.__version__,
        "loss": "mean cross-entropy over labels != -100 (HF MaskedLM loss)",
    })
    (out / "param_names.txt").write_text("".join(k + "\n" for k in model.state_dict().keys()))
    (out / "grad_names.txt").write_text("".join(n + "\n" for n in grad_names))

    if layout == "bert":
        # The same weights as a legacy pytorch_model.bin (a full state_dict, tied decoder
        # weight and bias included), for the pickle reader.
        legacy = FIXTURES / "bert-bin"
        legacy.mkdir(parents=True, exist_ok=True)
        (legacy / "config.json").write_text((out / "config.json").read_text())
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
        torch.save(sd, legacy / "pytorch_model.bin")

    # Self-check: the saved checkpoint reloads cleanly and reproduces the logits.
    re, info = cls.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    re.eval()
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    assert not bad, f"{layout}: reload info {bad}"
    with torch.no_grad():
        diff = (re(**inputs).logits - res.logits).abs().max().item()
    assert diff == 0.0, f"{layout}: reloaded logits differ by {diff}"

    print(f"{layout}: loss={res.loss.item():.6f} hidden_states={len(res.hidden_states)} "
          f"attentions={len(res.attentions)} params={len(grad_names)} "
          f"state_dict={len(model.state_dict())} no_grad={missing_grads}")


def make_minilm() -> None:
    # HF_HOME / HF_HUB_OFFLINE are set in main(), before huggingface_hub is first imported
    # (it reads them at import time).
    import torch
    import transformers as tf

    out = FIXTURES / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    tok = tf.AutoTokenizer.from_pretrained(MINILM_ID)
    # Its tokenizer.json pads and truncates to a fixed 128: turn both off.
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    model = tf.AutoModel.from_pretrained(MINILM_ID, attn_implementation="eager", dtype=torch.float32)
    model.eval()

    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    ids = enc["input_ids"].to(torch.int64)
    mask = enc["attention_mask"].to(torch.int64)
    tt = enc["token_type_ids"].to(torch.int64)
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    last = res.last_hidden_state.float()
    m = mask.unsqueeze(-1).float()
    pooled = (last * m).sum(1) / m.sum(1).clamp(min=1e-9)

    save_safetensors({
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "token_type_ids": tt.contiguous(),
        "last_hidden_state": last.contiguous(),
        "hidden_states.0": res.hidden_states[0].float().contiguous(),
        "sentence_embedding": pooled.contiguous(),
    }, out / "io.safetensors", metadata={
        "model": MINILM_ID,
        "transformers": tf.__version__,
        "torch": torch.__version__,
        "pooling": "mean over attention_mask, not normalised",
    })
    (out / "sentences.json").write_text(json.dumps(SENTENCES, indent=2) + "\n")
    for s, row in zip(SENTENCES, ids):
        print("minilm:", tok.convert_ids_to_tokens([int(i) for i in row if i != tok.pad_token_id]))
    print(f"minilm: input_ids {tuple(ids.shape)} last_hidden_state {tuple(last.shape)}")


def make_optim() -> None:
    """torch.optim.AdamW with two groups (decay / no decay) over 3 steps with changing lr
    and a gradient scale, for tests/optim.rs."""
    import torch

    out = FIXTURES / "optim"
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(3, 4, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    t = {"init.w.weight": w.detach().clone(), "init.w.bias": b.detach().clone()}
    opt = torch.optim.AdamW(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    )
    lrs = [1e-3, 2e-2, 5e-3]
    scales = [1.0, 0.5, 0.25]
    for step, (lr, sc) in enumerate(zip(lrs, scales)):
        gw = torch.randn(3, 4, generator=g)
        gb = torch.randn(4, generator=g) * 1e-3
        t[f"grad{step}.w.weight"], t[f"grad{step}.w.bias"] = gw.clone(), gb.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad, b.grad = gw * sc, gb * sc
        opt.step()
        t[f"after{step}.w.weight"], t[f"after{step}.w.bias"] = w.detach().clone(), b.detach().clone()
    t["lrs"] = torch.tensor(lrs, dtype=torch.float32)
    t["scales"] = torch.tensor(scales, dtype=torch.float32)
    save_safetensors({k: v.float().contiguous() for k, v in t.items()}, out / "io.safetensors",
                     metadata={"torch": torch.__version__, "what": "AdamW wd=0.1/0.0"})
    print("optim: written")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(MODEL_CLASS) + ["minilm"], action="append")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--hf-home", default=None,
                    help="HF_HOME holding the all-MiniLM-L6-v2 hub cache (default: $HF_HOME, "
                         "else ../shared/hf-home if it exists)")
    args = ap.parse_args()

    todo = args.only or (list(MODEL_CLASS) + ([] if args.skip_minilm else ["minilm"]))
    if "minilm" in todo:
        hf_home = args.hf_home or os.environ.get("HF_HOME")
        if not hf_home and (REPO.parent / "shared" / "hf-home").is_dir():
            hf_home = str(REPO.parent / "shared" / "hf-home")
        if hf_home:
            os.environ["HF_HOME"] = hf_home
            os.environ["HF_HUB_OFFLINE"] = "1"
        else:
            print("minilm: skipped (no HF_HOME and no ../shared/hf-home)", file=sys.stderr)
            todo.remove("minilm")

    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    if not args.only:
        make_optim()
    for layout in todo:
        if layout == "minilm":
            make_minilm()
        else:
            make_tiny(layout)

    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"tests/fixtures total: {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
