#!/usr/bin/env python3
"""The GPT of examples/train_gpt (the Rust/candle example) in PyTorch, trained twice from the
same seed: once with plain PyTorch modules (nn.Dropout, nn.LayerNorm, F.cross_entropy with label
smoothing, drop path written with torch ops, torch.optim.AdamW + clip_grad_norm_), once with
fusedreg's (DropoutAddNorm with LayerNorm Scaling and drop path at every pre-norm entry,
BiasActDropout in the MLP, Dropout on the attention probabilities, CrossEntropyLoss,
fusedreg.optim.AdamW with clipping). Same corpus (data/paradise_lost.txt), recipe and sizes as
the Rust example: dropout 0.1, drop path rising linearly to 0.1, label smoothing 0.1, clip 1.0,
decay on matrices only, warm-up then cosine.

Writes curves.csv (step, run, train loss, held-out loss, ms/step), loss.svg and summary.txt
under --out, with ms/step and peak memory of each run, eager and (--compile) torch.compile.

    python examples/train_gpt.py --tiny                 # CPU, seconds (CI)
    python examples/train_gpt.py --device cuda          # GPU: 6 blocks, hidden 384, context 256
    python examples/train_gpt.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fusedreg
from fusedreg import nn as fnn

ROOT = Path(__file__).resolve().parent.parent


def args_():
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--tiny", action="store_true", help="CI size on the CPU: 2 blocks, hidden 32, "
                   "2 heads, context 32, batch 8, 20 steps")
    a.add_argument("--steps", type=int, default=1000)
    a.add_argument("--layers", type=int, default=6)
    a.add_argument("--hidden", type=int, default=384)
    a.add_argument("--heads", type=int, default=6)
    a.add_argument("--context", type=int, default=256)
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--dropout", type=float, default=0.1)
    a.add_argument("--drop-path", type=float, default=0.1)
    a.add_argument("--label-smoothing", type=float, default=0.1)
    a.add_argument("--no-lns", action="store_true", help="without LayerNorm Scaling")
    a.add_argument("--seed", type=int, default=42)
    a.add_argument("--eval-every", type=int, default=100)
    a.add_argument("--device", default="auto", help="auto | cpu | cuda")
    a.add_argument("--compile", action="store_true", help="also run both under torch.compile")
    a.add_argument("--out", default=str(ROOT / "target" / "train_gpt_py"))
    a = a.parse_args()
    if a.tiny:
        a.layers, a.hidden, a.heads, a.context, a.batch = 2, 32, 2, 32, 8
        if "--steps" not in sys.argv:
            a.steps = 20
        if "--eval-every" not in sys.argv:
            a.eval_every = 10
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() and fusedreg.kernels_built() else "cpu"
    return a


def corpus(heldout_fraction=0.1):
    text = (ROOT / "data" / "paradise_lost.txt").read_bytes()
    marker = b"=== TEXT ===\n"
    text = text[text.index(marker) + len(marker):]
    cut = len(text) - int(len(text) * heldout_fraction)
    return torch.frombuffer(bytearray(text[:cut]), dtype=torch.uint8).long(), \
        torch.frombuffer(bytearray(text[cut:]), dtype=torch.uint8).long()


def lr_at(step, steps, peak):
    warm = max(steps // 10, 1)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(steps - warm, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Block(nn.Module):
    """Weights shared by both paths' formulas; the paths differ in the regularization ops."""

    def __init__(self, a, l, fused: bool, keys):
        super().__init__()
        d, self.heads = a.hidden, a.heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=not fused)   # fused: the bias goes into the next op
        self.fc = nn.Linear(d, 4 * d, bias=not fused)
        self.out = nn.Linear(4 * d, d, bias=not fused)
        if fused:
            self.proj_b = nn.Parameter(torch.zeros(d))
            self.out_b = nn.Parameter(torch.zeros(d))
            self.fc_b = nn.Parameter(torch.zeros(4 * d))
        self.p_path = a.drop_path * l / (a.layers - 1) if a.layers > 1 else 0.0

    def attention(self, h, b, t, drop_probs):
        d = h.shape[-1]
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        att = drop_probs(att.masked_fill(~mask, float("-inf")).softmax(-1))
        return (att @ v).transpose(1, 2).reshape(b * t, d)


class PlainGpt(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.wte, self.wpe = nn.Embedding(256, a.hidden), nn.Embedding(a.context, a.hidden)
        self.blocks = nn.ModuleList(Block(a, l, False, None) for l in range(a.layers))
        self.ln1 = nn.ModuleList(nn.LayerNorm(a.hidden) for _ in range(a.layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(a.hidden) for _ in range(a.layers))
        self.lnf = nn.LayerNorm(a.hidden)
        self.head = nn.Linear(a.hidden, 256, bias=False)
        self.drop = nn.Dropout(a.dropout)

    def drop_path(self, x, p, b, t):
        if not self.training or p == 0:
            return x
        keep = (torch.rand(b, 1, 1, device=x.device) >= p).to(x.dtype) / (1 - p)
        return (x.view(b, t, -1) * keep).view(b * t, -1)

    def forward(self, idx, target):
        b, t = idx.shape
        a = self.a
        x = self.drop((self.wte(idx) + self.wpe.weight[:t]).view(b * t, -1))
        for l, blk in enumerate(self.blocks):
            scale = 1.0 if a.no_lns else 1 / math.sqrt(l + 1)
            h = self.ln1[l](x) * scale
            y = self.drop(blk.proj(blk.attention(h, b, t, self.drop)))
            x = x + self.drop_path(y, blk.p_path, b, t)
            h = self.ln2[l](x) * scale
            u = self.drop(F.gelu(blk.fc(h), approximate="tanh"))
            x = x + self.drop_path(self.drop(blk.out(u)), blk.p_path, b, t)
        logits = self.head(self.lnf(x))
        return F.cross_entropy(logits, target.reshape(-1), label_smoothing=a.label_smoothing)


class FusedGpt(nn.Module):
    """Sites are numbered in construction order (fusedreg.next_site): fixed by the model code."""

    def __init__(self, a, keys):
        super().__init__()
        self.a = a
        d, t = a.hidden, a.context
        self.wte, self.wpe = nn.Embedding(256, d), nn.Embedding(a.context, d)
        self.blocks = nn.ModuleList(Block(a, l, True, keys) for l in range(a.layers))
        lns = lambda l: None if a.no_lns else l  # noqa: E731
        # Entry of block l's first norm: the embedding dropout (l = 0) or the previous block's
        # MLP output (dropout + drop path + residual add); its second: the attention output.
        self.entry1 = nn.ModuleList(
            fnn.DropoutAddNorm(d, p=a.dropout, layer=lns(l + 1), keys=keys, rows_per_sample=t,
                               drop_path=self.blocks[l - 1].p_path if l else 0.0)
            for l in range(a.layers))
        self.entry2 = nn.ModuleList(
            fnn.DropoutAddNorm(d, p=a.dropout, layer=lns(l + 1), keys=keys, rows_per_sample=t,
                               drop_path=self.blocks[l].p_path)
            for l in range(a.layers))
        self.probs = nn.ModuleList(fnn.Dropout(a.dropout, keys=keys) for _ in range(a.layers))
        self.mlp = nn.ModuleList(fnn.BiasActDropout("gelu_tanh", a.dropout, keys=keys)
                                 for _ in range(a.layers))
        self.final = fnn.DropoutAddNorm(d, p=a.dropout, keys=keys, rows_per_sample=t,
                                        drop_path=self.blocks[-1].p_path)
        self.head = nn.Linear(d, 256, bias=False)
        self.loss = fnn.CrossEntropyLoss(label_smoothing=a.label_smoothing)

    def forward(self, idx, target):
        b, t = idx.shape
        emb = (self.wte(idx) + self.wpe.weight[:t]).view(b * t, -1)
        h, s = self.entry1[0](emb)
        for l, blk in enumerate(self.blocks):
            y = blk.proj(blk.attention(h, b, t, lambda att: self.probs[l](att)))
            h, s = self.entry2[l](y, s, blk.proj_b)
            u = self.mlp[l](blk.fc(h), blk.fc_b)
            nxt = self.entry1[l + 1] if l + 1 < len(self.blocks) else self.final
            h, s = nxt(blk.out(u), s, blk.out_b)
        return self.loss(self.head(h), target.reshape(-1))


def groups(m):
    decay = [p for n, p in m.named_parameters() if p.dim() >= 2 and "wpe" not in n and "wte" not in n]
    rest = [p for n, p in m.named_parameters() if not (p.dim() >= 2 and "wpe" not in n and "wte" not in n)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def peak_memory(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(name, a, dev, train, held, compiled):
    torch.manual_seed(a.seed)
    keys = fusedreg.Keys(a.seed, 0)
    fused = name.startswith("fusedreg")
    model = (FusedGpt(a, keys) if fused else PlainGpt(a)).to(dev)
    betas = (0.9, 0.95)
    opt = (fusedreg.optim.AdamW(groups(model), lr=a.lr, betas=betas, max_grad_norm=1.0) if fused
           else torch.optim.AdamW(groups(model), lr=a.lr, betas=betas, fused=dev.type == "cuda"))
    step_fn = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(a.seed ^ 0x5EEDBA7C)
    t = a.context
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rows, times = [], []
    for step in range(a.steps):
        lr = lr_at(step, a.steps, a.lr)
        for grp in opt.param_groups:
            grp["lr"] = lr
        offs = torch.randint(0, len(train) - t - 1, (a.batch,), generator=g)
        win = torch.stack([train[o:o + t + 1] for o in offs.tolist()]).to(dev)
        t0 = time.perf_counter()
        model.train()
        loss = step_fn(win[:, :-1].contiguous(), win[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not fused:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        keys.next_step()
        lv = loss.item()  # waits for the step
        times.append((time.perf_counter() - t0) * 1e3)
        hv = ""
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            model.eval()
            with torch.no_grad():
                hg = torch.Generator().manual_seed(7)
                ho = torch.randint(0, len(held) - t - 1, (a.batch,), generator=hg)
                hw = torch.stack([held[o:o + t + 1] for o in ho.tolist()]).to(dev)
                hv = model(hw[:, :-1].contiguous(), hw[:, 1:].contiguous()).item()
            print(f"  {name} step {step + 1}/{a.steps}: train {lv:.4f} held-out {hv:.4f} "
                  f"({times[-1]:.1f} ms)", flush=True)
        rows.append((step + 1, name, lv, hv, times[-1], lr))
    skip = min(a.steps // 10, a.steps - 1)
    ms = sum(times[skip:]) / len(times[skip:])
    return rows, ms, peak_memory(dev)


def svg(rows, path):
    runs = sorted({r[1] for r in rows})
    w, h, pad = 640, 360, 40
    steps = max(r[0] for r in rows)
    ys = [r[2] for r in rows]
    lo, hi = min(ys), max(ys)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{pad}" y="20" font-size="14">train loss per step</text>']
    for i, name in enumerate(runs):
        pts = [(pad + (r[0] - 1) / max(steps - 1, 1) * (w - 2 * pad),
                h - pad - (r[2] - lo) / max(hi - lo, 1e-9) * (h - 2 * pad))
               for r in rows if r[1] == name]
        out.append(f'<polyline fill="none" stroke="{colors[i % 4]}" stroke-width="1.5" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        out.append(f'<text x="{w - 200}" y="{40 + 16 * i}" font-size="12" '
                   f'fill="{colors[i % 4]}">{name}</text>')
    out.append(f'<text x="{pad}" y="{h - 10}" font-size="11">steps 1..{steps}; loss '
               f'{lo:.3f}..{hi:.3f}</text></svg>')
    path.write_text("\n".join(out))


def main():
    a = args_()
    dev = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = corpus()
    print(f"train_gpt.py: {a.layers} blocks, hidden {a.hidden}, {a.heads} heads, context "
          f"{a.context}, batch {a.batch}, {a.steps} steps on {dev}; torch {torch.__version__}")
    names = ["torch", "fusedreg"] + (["torch+compile", "fusedreg+compile"] if a.compile else [])
    rows, summary = [], []
    for name in names:
        r, ms, mem = run(name, a, dev, train, held, name.endswith("compile"))
        rows += r
        first, last = r[0][2], r[-1][2]
        summary.append(f"{name}: loss {first:.4f} -> {last:.4f}, {ms:.2f} ms/step, peak memory "
                       f"{mem / 2**20:.1f} MiB ({'CUDA allocator' if dev.type == 'cuda' else 'process RSS'})")
        if not last < first:
            print(f"train_gpt.py: {name} did not lower the loss", file=sys.stderr)
            sys.exit(1)
    with open(out / "curves.csv", "w") as f:
        f.write("step,run,train_loss,heldout_loss,step_ms,lr\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")
    svg(rows, out / "loss.svg")
    text = "\n".join(summary) + "\n"
    if dev.type == "cpu":
        text += ("On the CPU the fusedreg run executes the library's exact CPU references: CPU "
                 "timings say nothing about GPU speed.\n")
    (out / "summary.txt").write_text(text)
    print(text + f"wrote {out}/curves.csv, loss.svg, summary.txt")


if __name__ == "__main__":
    main()
