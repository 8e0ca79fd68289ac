"""PyTorch (MKL) side of benches/gemm_shapes.rs: the same shapes, same layouts.

    python benches/gemm_shapes.py [small|base] [threads]
"""
import sys, time
import torch

base = len(sys.argv) > 1 and sys.argv[1] == "base"
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
rows, h, i, s, d, bh, vocab = (1024, 768, 3072, 128, 64, 96, 30522) if base else (2048, 256, 1024, 128, 64, 64, 8000)
masked = rows * 15 // 100  # the MLM head on the masked rows
shapes = [
    ("qkv fwd", rows, h, 3 * h, 0, 1, 1), ("attn-out fwd", rows, h, h, 0, 1, 1),
    ("ffn-in fwd", rows, h, i, 0, 1, 1), ("ffn-out fwd", rows, i, h, 0, 1, 1),
    ("ffn-in dx", rows, i, h, 0, 0, 1), ("ffn-out dx", rows, h, i, 0, 0, 1),
    ("ffn-in dW", i, rows, h, 1, 0, 1), ("ffn-out dW", h, rows, i, 1, 0, 1),
    ("scores (per head)", s, d, s, 0, 1, bh), ("context (per head)", s, s, d, 0, 0, bh),
    ("decoder fwd", masked, h, vocab, 0, 1, 1), ("decoder fwd all rows", rows, h, vocab, 0, 1, 1),
    ("decoder dx", masked, vocab, h, 0, 0, 1),
    ("decoder dW", vocab, masked, h, 1, 0, 1),
    ("peak 2048^3", 2048, 2048, 2048, 0, 0, 1),
]
for name, m, k, n, at, bt, batch in shapes:
    a = torch.rand(batch, k, m).transpose(1, 2) if at else torch.rand(batch, m, k)
    b = torch.rand(batch, n, k).transpose(1, 2) if bt else torch.rand(batch, k, n)
    c = torch.empty(batch, m, n)
    flop = 2.0 * m * k * n * batch
    reps = max(3, int(2e9 / flop))
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            if batch == 1:
                torch.mm(a[0], b[0], out=c[0])
            else:
                torch.bmm(a, b, out=c)
        best = min(best, (time.perf_counter() - t) / reps)
    print(f"{name:20} {m:>5}x{k:<5}x{n:>5} x{batch:<3} {'Aᵀ' if at else 'A '}{'Bᵀ' if bt else 'B '}  {flop / best / 1e9:7.1f} GFLOP/s")
