#!/usr/bin/env python3
"""The same work as fusedreg-bench, through PyTorch on the same GPU, for comparison.

Prints a table with the columns of the fusedreg report (ms, GB/s by the same minimal-bytes
formulas, fraction of the copy bandwidth measured here) and writes torch.json when --out is given.

  python3 benches/compare_torch.py [--quick] [--out DIR]

Cases, each eager and under torch.compile, forward and backward: `dropout(x + bias) + residual`
(dropout_residual), plain `dropout(x)` (dropout), `dropout(gelu(x + bias))` (bias_act_dropout),
the pre-norm entry `s = r + dropout(x); out = layer_norm(s)` / `rms_norm(s)` (dropout_add_norm),
and `cross_entropy(logits, target, label_smoothing=0.1, ignore_index=-100)` with 10% of the
targets ignored (cross_entropy; Liger-Kernel too where it imports). Then
`torch.optim.AdamW(fused=True)`, `clip_grad_norm_(foreach=True)` and the two together on GPT-2
124M and 1B Llama-like parameter shapes. Bytes are fusedreg's minimal-bytes formulas for the same
work, so GB/s and %copy compare with its report row for row.
"""
import argparse
import json
import math
import os
import sys

import torch

p_drop = 0.1


def bench(fn, warmup=3, samples=25, min_ms=1.0):
    """Median per-call ms with CUDA events, batching calls so a sample lasts >= min_ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(n):
        s.record()
        for _ in range(n):
            fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e)

    one = max(timed(1), 1e-4)
    batch = max(1, min(10000, math.ceil(min_ms / one)))
    ts = sorted(timed(batch) / batch for _ in range(samples))
    return ts[len(ts) // 2]


def copy_gbps(quick):
    n = (256 << 20 if quick else 1 << 30) // 4
    x = torch.rand(n, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def gpt2_shapes():
    d, v, ctx, ff = 768, 50257, 1024, 3072
    shapes = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    shapes += [(d,), (d,)]
    assert len(shapes) == 148
    return shapes


def llama1b_shapes():
    # The same list as fusedreg's report (tools/src/report/models.rs): 147 tensors, 0.95B parameters.
    d, layers, ff, v = 2048, 16, 5632, 32000
    shapes = [(v, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (ff, d), (ff, d), (d, ff)]
    shapes += [(d,), (v, d)]
    return shapes


def dropout_cases(rows, quick, copy):
    sizes = [("bf16 [16384,4096] bias", torch.bfloat16, (16384, 4096))]
    if not quick:
        sizes += [("f32 [16384,4096] bias", torch.float32, (16384, 4096)),
                  ("bf16 [65536,4096] bias", torch.bfloat16, (65536, 4096))]
    for case, dt, shape in sizes:
        n = shape[0] * shape[1]
        s = torch.finfo(dt).bits // 8
        x = torch.randn(shape, device="cuda", dtype=dt, requires_grad=True)
        r = torch.randn(shape, device="cuda", dtype=dt)
        b = torch.randn(shape[1], device="cuda", dtype=dt, requires_grad=True)
        dy = torch.randn(shape, device="cuda", dtype=dt)

        def eager(x, b, r):
            return torch.nn.functional.dropout(x + b, p=p_drop, training=True) + r

        compiled = torch.compile(eager)
        for name, f in (("eager", eager), ("compile", compiled)):
            try:
                with torch.no_grad():
                    ms = bench(lambda: f(x, b, r))
                rows.append(row("dropout_residual fwd", case, name, ms, 3 * s * n, copy))
                y = f(x, b, r)
                ms = bench(lambda: torch.autograd.grad(y, (x, b), dy, retain_graph=True))
                rows.append(row("dropout_residual bwd", case, name, ms, 2 * s * n, copy))
            except Exception as ex:  # keep going: one failing case must not hide the others
                print(f"{case} {name}: {ex}", file=sys.stderr)
        del x, r, b, dy


def fwd_bwd(rows, op, case, name, f, inputs, grads_of, dy, fwd_bytes, bwd_bytes, copy):
    """Times f(*inputs) without grad, then the gradient of its output w.r.t. grads_of."""
    try:
        with torch.no_grad():
            ms = bench(lambda: f(*inputs))
        rows.append(row(op + " fwd", case, name, ms, fwd_bytes, copy))
        y = f(*inputs)
        ms = bench(lambda: torch.autograd.grad(y, grads_of, dy, retain_graph=True))
        rows.append(row(op + " bwd", case, name, ms, bwd_bytes, copy))
    except Exception as ex:  # keep going: one failing case must not hide the others
        print(f"{op} {case} {name}: {ex}", file=sys.stderr)


def new_dropout_cases(rows, quick, copy):
    """Plain dropout and the FFN site dropout(gelu(x + b)): read x, write y; backward read dy
    (and x for the activation's derivative), write dx."""
    F = torch.nn.functional
    dts = [("bf16", torch.bfloat16)] + ([] if quick else [("f32", torch.float32)])
    for dn, dt in dts:
        shape = (16384, 4096)
        n = shape[0] * shape[1]
        s = torch.finfo(dt).bits // 8
        x = torch.randn(shape, device="cuda", dtype=dt, requires_grad=True)
        b = torch.randn(shape[1], device="cuda", dtype=dt, requires_grad=True)
        dy = torch.randn(shape, device="cuda", dtype=dt)

        def plain(x):
            return F.dropout(x, p=p_drop, training=True)

        def ffn(x, b):
            return F.dropout(F.gelu(x + b), p=p_drop, training=True)

        for name, f in (("eager", plain), ("compile", torch.compile(plain))):
            fwd_bwd(rows, "dropout", f"{dn} [16384,4096]", name, f, (x,), (x,), dy,
                    2 * s * n, 2 * s * n, copy)
        for name, f in (("eager", ffn), ("compile", torch.compile(ffn))):
            fwd_bwd(rows, "bias_act_dropout", f"{dn} [16384,4096] gelu", name, f, (x, b), (x, b),
                    dy, 2 * s * n, 3 * s * n, copy)
        del x, b, dy
        torch.cuda.empty_cache()


def norm_cases(rows, quick, copy):
    """The pre-norm entry s = r + dropout(x), out = norm(s) * w (+ b): forward reads x and r and
    writes out and s; backward reads d_out, d_s and s and writes dx and d_r (18 B/elem in bf16
    forward + backward, REFERENCE.md section 8)."""
    F = torch.nn.functional
    dts = [("bf16", torch.bfloat16)] + ([] if quick else [("f32", torch.float32)])
    for dn, dt in dts:
        rws, h = 16384, 4096
        n = rws * h
        s = torch.finfo(dt).bits // 8
        x = torch.randn(rws, h, device="cuda", dtype=dt, requires_grad=True)
        r = torch.randn(rws, h, device="cuda", dtype=dt, requires_grad=True)
        w = torch.randn(h, device="cuda", dtype=dt, requires_grad=True)
        bb = torch.randn(h, device="cuda", dtype=dt, requires_grad=True)
        dy = torch.randn(rws, h, device="cuda", dtype=dt)

        def ln(x, r, w, bb):
            return F.layer_norm(r + F.dropout(x, p=p_drop, training=True), (h,), w, bb, 1e-5)

        def rms(x, r, w, bb):
            return F.rms_norm(r + F.dropout(x, p=p_drop, training=True), (h,), w, 1e-5)

        for kind, f0 in (("layernorm", ln), ("rmsnorm", rms)):
            for name, f in (("eager", f0), ("compile", torch.compile(f0))):
                grads = (x, r, w, bb) if kind == "layernorm" else (x, r, w)
                fwd_bwd(rows, "dropout_add_norm", f"{dn} [16384,4096] {kind}", name, f,
                        (x, r, w, bb), grads, dy, 4 * s * n, 5 * s * n, copy)
        del x, r, w, bb, dy
        torch.cuda.empty_cache()


def xent_cases(rows, quick, copy):
    """Cross-entropy with label smoothing 0.1, 10% of targets ignored, forward + backward: the
    fused two-pass kernel's floor is 3 passes over the logits (read twice, write the gradient)."""
    F = torch.nn.functional
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)
    except Exception:
        liger = None
    shapes = [(8192, 128256)] + ([] if quick else [(16384, 50257)])
    for rws, v in shapes:
        logits = torch.randn(rws, v, device="cuda", dtype=torch.bfloat16) * 3
        logits.requires_grad_(True)
        tgt = torch.randint(0, v, (rws,), device="cuda")
        tgt[torch.rand(rws, device="cuda") < 0.1] = -100
        case = f"bf16 [{rws},{v}] a=0.1"
        nbytes = 3 * 2 * rws * v

        def eager(lg):
            return F.cross_entropy(lg, tgt, label_smoothing=0.1, ignore_index=-100)

        impls = [("eager", eager), ("compile", torch.compile(eager))]
        if liger is not None:
            impls.append(("liger", lambda lg: liger(lg, tgt)))
        for name, f in impls:
            try:
                def step():
                    loss = f(logits)
                    return torch.autograd.grad(loss, (logits,))
                ms = bench(step)
                rows.append(row("cross_entropy fwd+bwd", case, name, ms, nbytes, copy))
            except Exception as ex:
                print(f"cross_entropy {case} {name}: {ex}", file=sys.stderr)
        del logits, tgt
        torch.cuda.empty_cache()


def optimizer_cases(rows, quick, copy):
    models = [("gpt2-124M", gpt2_shapes())]
    if not quick:
        models.append(("llama-1B", llama1b_shapes()))
    for model, shapes in models:
        for dt in (torch.float32, torch.bfloat16):
            dname = "f32" if dt == torch.float32 else "bf16 (bf16 moments)"
            params = [torch.randn(s, device="cuda", dtype=dt) * 0.02 for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            n = sum(p.numel() for p in params)
            gb = 4 if dt == torch.float32 else 2
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
            case = f"{model} {dname} ({n / 1e6:.0f}M)"
            ms = bench(opt.step)
            # Bytes by fusedreg's formula for the same layout: read p g m v, write p m v.
            rows.append(row("adamw", case, "fused=True", ms, (4 * gb + 3 * gb) * n, copy))
            ms = bench(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))
            rows.append(row("global_norm+scale", case, "foreach", ms, 3 * gb * n, copy))

            def step():
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                opt.step()

            ms = bench(step)
            rows.append(row("clip+adamw", case, "foreach+fused", ms, (7 * gb + gb) * n, copy))
            del params, opt
            torch.cuda.empty_cache()


def row(op, case, impl, ms, nbytes, copy):
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"op": op, "case": case, "impl": impl, "ms": ms, "bytes": nbytes, "gbps": gbps,
            "frac_copy": gbps / copy}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.out:
        # Made (and checked writable) before the run, not after minutes of timing.
        os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    copy = copy_gbps(a.quick)
    rows = []
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    dropout_cases(rows, a.quick, copy)
    new_dropout_cases(rows, a.quick, copy)
    norm_cases(rows, a.quick, copy)
    xent_cases(rows, a.quick, copy)
    optimizer_cases(rows, a.quick, copy)
    print(f"PyTorch {torch.__version__} on {name}; copy {copy:.0f} GB/s (read + write)")
    print(f"{'op':<26} {'case':<34} {'impl':<14} {'ms':>9} {'GB/s':>7} {'%copy':>6}")
    for r in rows:
        print(f"{r['op']:<26} {r['case']:<34} {r['impl']:<14} {r['ms']:>9.4f} {r['gbps']:>7.0f} "
              f"{100 * r['frac_copy']:>5.0f}%")
    if a.out:
        write_json(a.out, {"torch": torch.__version__, "device": name, "copy_gbps": copy,
                           "rows": rows})


def write_json(out_dir, payload):
    """Writes OUT_DIR/torch.json, creating OUT_DIR (and its parents) when it does not exist."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "torch.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


if __name__ == "__main__":
    main()
