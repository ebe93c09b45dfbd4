#!/usr/bin/env python3
"""Host overhead per op call through the Python package (microseconds, median of repeats).

For each op on a tiny tensor it times: the raw ctypes call into the C ABI (the floor), the
registered operator (torch.ops.fusedreg.*: dispatcher + our Python kernel + descriptors), and
the autograd forward (with requires_grad inputs). A tiny input makes the CPU reference's own
work negligible, so on the CPU this is the Python-side dispatch cost; on a GPU
(`--device cuda`) the same numbers are host time per launch (kernels are asynchronous).
Baseline: torch.add on the same tensors (one native PyTorch op through the dispatcher).

The clock is this thread's CPU time (``--clock cpu``, the default: on a shared, oversubscribed
machine it counts only the time the thread ran, not the time it waited for a core) or the wall
clock (``--clock wall``: what a quiet machine's caller sees).

    python python/bench_overhead.py [--device cuda] [--n 2000] [--clock cpu|wall]
"""

import argparse
import ctypes as C
import statistics
import time

import torch

import fusedreg
from fusedreg import _lib as L
from fusedreg import functional as F
from fusedreg import ops as O

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cpu")
ap.add_argument("--n", type=int, default=2000)
ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
a = ap.parse_args()
dev = torch.device(a.device)
clock = time.thread_time if a.clock == "cpu" else time.perf_counter


def per_call(fn, n=a.n, reps=7):
    for _ in range(50):
        fn()
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        for _ in range(n):
            fn()
        out.append((clock() - t0) / n * 1e6)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(out)


x = torch.randn(4, 8, device=dev)
b = torch.randn(8, device=dev)
r = torch.randn(4, 8, device=dev)
g = torch.ones(8, device=dev)
t = torch.randint(0, 8, (4,), device=dev)
keys = fusedreg.Keys(1, 0)
k = keys.tensor
xg = x.clone().requires_grad_()
y = torch.empty_like(x)
o = L.default_options()
o.rows, o.cols, o.p = 4, 8, 0.1
ex = O._exec(x)
descs = [O._d(t) for t in (x, b, r, y)]  # kept alive: the addresses below point into them
dx, db, dr, dyd = [C.addressof(d) for d in descs]

# Floors of the registration style: an op whose Python kernel returns its input, registered
# through torch.library.Library, without and with register_autograd (what every fusedreg op is).
_probe = torch.library.Library("fusedreg_probe", "DEF")
_probe.define("plain(Tensor x, Tensor? b, Tensor? r, Tensor k, int s, float p) -> Tensor")
_probe.define("grad(Tensor x, Tensor? b, Tensor? r, Tensor k, int s, float p) -> Tensor")
_probe.impl("plain", lambda x, b, r, k, s, p: x, "CPU")
_probe.impl("grad", lambda x, b, r, k, s, p: x, "CPU")
torch.library.register_autograd("fusedreg_probe::grad", lambda ctx, g: (g,) + (None,) * 5,
                                lib=_probe)
if dev.type == "cuda":
    _probe.impl("plain", lambda x, b, r, k, s, p: x, "CUDA")
    _probe.impl("grad", lambda x, b, r, k, s, p: x, "CUDA")
P = torch.ops.fusedreg_probe

rows = [
    ("torch.add (baseline)", lambda: torch.add(x, r)),
    ("floor: empty Library.impl op", lambda: P.plain.default(x, b, r, k, 0, 0.1)),
    ("floor: ... + register_autograd", lambda: P.grad.default(x, b, r, k, 0, 0.1)),
    ("ctypes: fr_dropout_forward", lambda: L.lib.fr_dropout_forward(C.byref(o), ex, dx, db, dr, None, dyd, None, None)),
    ("kernel fn only: ops._drop", lambda: O._drop(x, b, r, k, 0, 0.1, 0.0, 1, 32)),
    ("op: fusedreg.dropout (residual)", lambda: torch.ops.fusedreg.dropout(x, b, r, k, 0, 0.1, 0.0, 1, 32)),
    ("op: fusedreg.bias_act_dropout", lambda: torch.ops.fusedreg.bias_act_dropout(x, b, k, 0, 0, 0.1)),
    ("op: fusedreg.dropout_add_norm", lambda: torch.ops.fusedreg.dropout_add_norm(x, r, b, g, b, k, 0, 0, 1e-5, 1.0, 0.1, 0.0, 1, False)),
    ("op: fusedreg.cross_entropy", lambda: torch.ops.fusedreg.cross_entropy(x, t, 0.1, -100, 0.0, 2)),
    ("functional: F.dropout (residual)", lambda: F.dropout(x, 0.1, keys, 0, bias=b, residual=r)),
    ("autograd fwd: fusedreg.dropout", lambda: torch.ops.fusedreg.dropout(xg, b, r, k, 0, 0.1, 0.0, 1, 32)),
]
print(f"host time per call ({a.clock} clock), {dev}, torch {torch.__version__}, n={a.n} "
      "(median of 7):")
base = None
for name, fn in rows:
    us = per_call(fn)
    base = us if base is None else base
    print(f"  {name:38s} {us:8.2f} us   (+{us - base:6.2f} over torch.add)")
