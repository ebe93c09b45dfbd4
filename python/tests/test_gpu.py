"""The same ops on CUDA tensors (FUSEDREG_REQUIRE_GPU=1 makes a missing GPU a failure): bit for
bit against the CPU path (the kernels are exact against the CPU references), CUDA-graph capture
of a training step, two streams, and a non-default device index. Skipped here without a GPU."""

import pytest
import torch

import fusedreg
from fusedreg import functional as F

from bounds import check_bias_act_dropout, check_cross_entropy


def both(fn, *tensors, cuda):
    """fn on CPU tensors and on their CUDA copies; returns (cpu, cuda-on-cpu) results."""
    cpu = fn(*tensors)
    dev = fn(*[t.to(cuda) if isinstance(t, torch.Tensor) else t for t in tensors])
    to_cpu = lambda r: tuple(x.cpu() for x in r) if isinstance(r, tuple) else r.cpu()  # noqa: E731
    return cpu, to_cpu(dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_op_is_bit_exact_with_the_cpu_path(cuda, dtype):
    k = fusedreg.Keys(3, 5)
    x = torch.randn(67, 130).to(dtype)
    b = torch.randn(130).to(dtype)
    r = torch.randn(67, 130).to(dtype)
    g = torch.randn(130).to(dtype)
    t = torch.randint(0, 130, (67,))
    cases = [
        lambda x, b, r: F.dropout(x, 0.1, k, 1, bias=b, residual=r, drop_path=0.2,
                                  rows_per_sample=7),
        lambda x, b, r: F.bias_act_dropout(x, 0.1, k, 2, bias=b, activation="gelu_tanh",
                                           math="exact"),
        lambda x, b, r: F.bias_act_dropout(x, 0.1, k, 2, bias=b, activation="silu",
                                           math="exact", mask_bits=16),
        lambda x, b, r: F.dropout_add_norm(x, g.to(x.device), k, 3, residual=r, bias=b,
                                           norm_bias=b, p=0.1, drop_path=0.1,
                                           rows_per_sample=7, layer_scale=0.5),
        lambda x, b, r: F.dropout_add_norm(x, g.to(x.device), k, 3, residual=r, bias=b,
                                           norm="rms", p=0.1, mask_bits=16),
        lambda x, b, r: F.dropout_add_norm(x, g.to(x.device), k, 3, residual=r, bias=b,
                                           norm_bias=b, p=0.3, mask_bits=8),
        lambda x, b, r: F.cross_entropy(x, t.to(x.device), label_smoothing=0.1, math="exact"),
    ]
    for fn in cases:
        c, d = both(fn, x, b, r, cuda=cuda)
        for u, v in zip(c if isinstance(c, tuple) else (c,), d if isinstance(d, tuple) else (d,)):
            assert torch.equal(u, v)


def test_backward_is_bit_exact_with_the_cpu_path(cuda):
    k = fusedreg.Keys(9, 1)
    base = torch.randn(33, 96)
    grads = []
    for dev in ("cpu", cuda):
        x = base.to(dev).requires_grad_()
        bias = torch.zeros(96, device=dev, requires_grad=True)
        w = torch.ones(96, device=dev, requires_grad=True)
        h = F.bias_act_dropout(x, 0.2, k, 1, bias=bias, math="exact")
        out, s = F.dropout_add_norm(h, w, k, 2, p=0.1)
        loss = F.cross_entropy(out, torch.arange(33, device=dev) % 96, label_smoothing=0.1,
                               math="exact")
        loss.backward()
        grads.append([x.grad.cpu(), bias.grad.cpu(), w.grad.cpu()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mask_bits", [32, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu"])
def test_bias_act_dropout_fast_math_within_its_bound(cuda, act, dtype, mask_bits):
    """math="fast" (the default for GELU and SiLU) on the GPU: within the module docs' bound of
    the float64 function, the CPU path's mask (dropped elements exactly +0)."""
    p, site, k = 0.2, 6, fusedreg.Keys(11, 2)
    x = (torch.randn(257, 1030) * 4).to(dtype)
    x[0, :8] = torch.tensor([0.0, -0.75, -1.28, 9.5, -9.5, 17.0, -17.0, 1e-3]).to(dtype)
    b = torch.randn(1030).to(dtype)
    dy = torch.randn(257, 1030).to(dtype)
    keep = F.dropout(torch.ones(x.shape), p, k, site, mask_bits=mask_bits) != 0
    xa = x.to(cuda).requires_grad_()
    ba = b.to(cuda).requires_grad_()
    y = F.bias_act_dropout(xa, p, k, site, bias=ba, activation=act, math="fast",
                           mask_bits=mask_bits)
    y.backward(dy.to(cuda))
    check_bias_act_dropout(act, x, b, y.detach().cpu(), dy, xa.grad.cpu(), ba.grad.cpu(), p, keep)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_fast_math_within_its_bound(cuda, reduction, dtype):
    rows, vocab = 67, 5000
    x = (torch.randn(rows, vocab) * 5).to(dtype)
    t = torch.randint(0, vocab, (rows,))
    t[::7] = -100
    a = x.to(cuda).requires_grad_()
    loss = F.cross_entropy(a, t.to(cuda), label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    loss.sum().backward()
    check_cross_entropy(x, t, loss.detach().cpu(), a.grad.cpu(), label_smoothing=0.1,
                        z_loss=1e-4, reduction=reduction)


def test_optimizer_matches_the_cpu_path(cuda):
    """The same gradients (made on the CPU, copied) give the same parameters: the kernels and
    the CPU reference share AdamW's and the norm's operation order."""
    torch.manual_seed(0)
    init = [torch.randn(30, 40), torch.randn(30), torch.randn(7)]
    grads = [[torch.randn_like(p) * 3 for p in init] for _ in range(5)]
    out = []
    for dev in ("cpu", cuda):
        ps = [p.clone().to(dev).requires_grad_() for p in init]
        opt = fusedreg.optim.AdamW([{"params": ps[:1], "weight_decay": 0.1},
                                    {"params": ps[1:], "weight_decay": 0.0}],
                                   lr=1e-2, max_grad_norm=0.5)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.to(dev)
            opt.step()
        out.append([p.detach().cpu() for p in ps])
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_ops_run_on_the_current_stream(cuda):
    side = torch.cuda.Stream(cuda)
    x = torch.randn(512, 1024, device=cuda)
    k = fusedreg.Keys(1, 0)
    ref = F.dropout(x, 0.5, k, 0)
    with torch.cuda.stream(side):
        side.wait_stream(torch.cuda.current_stream(cuda))
        y = F.dropout(x, 0.5, k, 0)
    torch.cuda.current_stream(cuda).wait_stream(side)
    assert torch.equal(y, ref)


def test_non_default_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    dev = torch.device("cuda", 1)
    x = torch.randn(64, 64)
    k = fusedreg.Keys(2, 0)
    assert torch.equal(F.dropout(x.to(dev), 0.3, k, 0).cpu(), F.dropout(x, 0.3, k, 0))


def test_cuda_graph_capture_of_a_training_step(cuda):
    torch.manual_seed(0)
    k = fusedreg.Keys(4, 0)
    lin = torch.nn.Linear(64, 64, bias=False).to(cuda)
    norm = fusedreg.nn.DropoutAddNorm(64, p=0.1, keys=k).to(cuda)
    xent = fusedreg.nn.CrossEntropyLoss(label_smoothing=0.1)
    params = list(lin.parameters()) + list(norm.parameters())
    opt = fusedreg.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0)
    x = torch.randn(32, 64, device=cuda)
    t = torch.randint(0, 64, (32,), device=cuda)

    def step():
        out, _ = norm(lin(x))
        loss = xent(out, t)
        loss.backward()
        opt.step()
        return loss

    s = torch.cuda.Stream(cuda)
    s.wait_stream(torch.cuda.current_stream(cuda))
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: allocations, gradient addresses, the optimizer object
            for p in params:
                p.grad = None if p.grad is None else p.grad.zero_()
            step()
    torch.cuda.current_stream(cuda).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for p in params:
        p.grad.zero_()
    # The optimizer launches on the stream current at its first step (s): capture on it.
    with torch.cuda.graph(graph, stream=s):
        loss = step()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item()
    assert any(not torch.equal(a, b) for a, b in zip(before, params)), "the replay stepped"


def test_block_influence_words_are_the_cpu_words(cuda):
    k = fusedreg.Keys(4, 1)
    x, r, g = torch.randn(129, 96), torch.randn(129, 96), torch.randn(96)
    words = []
    for dev in ("cpu", cuda):
        meter = fusedreg.Redundancy(1, device=dev)
        F.dropout_add_norm(x.to(dev), g.to(dev), k, 3, residual=r.to(dev), p=0.1,
                           stats=meter.site(0))
        words.append(meter.acc.cpu())
    assert torch.equal(words[0], words[1]), "integer accumulators: the same bits on both"


def test_dropout_residual_block_influence_words_are_the_cpu_words(cuda):
    """The final add of a block (dropout with a residual), out of place and in place: the
    CUDA statistics kernel (dropout_fwd_res_stats_*) against the CPU reference's words."""
    k = fusedreg.Keys(6, 2)
    x, r, b = torch.randn(131, 200), torch.randn(131, 200), torch.randn(200)
    for dtype in (torch.float32, torch.bfloat16):
        words, streams = [], []
        for dev in ("cpu", cuda):
            meter = fusedreg.Redundancy(2, device=dev)
            xd, rd, bd = (t.to(dtype).to(dev) for t in (x, r, b))
            y = F.dropout(xd, 0.1, k, 5, bias=bd, residual=rd, drop_path=0.2,
                          rows_per_sample=9, stats=meter.site(0))
            F.dropout_add_(rd, xd, 0.1, k, 5, bias=bd, drop_path=0.2, rows_per_sample=9,
                           stats=meter.site(1))
            words.append(meter.acc.cpu())
            streams.append((y.cpu(), rd.cpu()))
        assert torch.equal(words[0], words[1]), (dtype, words)
        assert torch.equal(words[0][0], words[0][1]), "in place: the same words"
        assert all(torch.equal(u, v) for u, v in zip(*streams))
