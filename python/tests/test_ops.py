"""Every op, forward and backward, against PyTorch's own ops on the CPU (the semantics the
README states), plus torch.library.opcheck of every operator."""

import math

import pytest
import torch
import torch.nn.functional as TF

import fusedreg
from fusedreg import functional as F

from bounds import check_bias_act_dropout, check_cross_entropy

OPS = torch.ops.fusedreg


def keys(seed=7, step=3):
    return fusedreg.Keys(seed, step)


# --------------------------------------------------------------------------- cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(reduction, smoothing, dtype):
    rows, vocab = 37, 129
    x = (torch.randn(rows, vocab) * 3).to(dtype)
    t = torch.randint(0, vocab, (rows,))
    t[::5] = -100  # ignored rows
    a = x.clone().requires_grad_()
    b = x.float().clone().requires_grad_()
    ours = F.cross_entropy(a, t, label_smoothing=smoothing, reduction=reduction)
    ref = TF.cross_entropy(b, t, label_smoothing=smoothing, reduction=reduction)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    up = torch.randn(ref.shape)
    ours.backward(up)
    ref.backward(up)
    gtol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=gtol, atol=gtol)
    assert (a.grad[::5] == 0).all(), "ignored rows have a zero gradient"


def test_cross_entropy_3d_logits_and_int32_targets():
    x = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.randint(0, 11, (2, 5), dtype=torch.int32)
    loss = F.cross_entropy(x, t, reduction="none")
    ref = TF.cross_entropy(x.detach().reshape(10, 11), t.long().reshape(10), reduction="none")
    torch.testing.assert_close(loss, ref.reshape(2, 5))


def test_cross_entropy_z_loss():
    x = torch.randn(8, 16, dtype=torch.float64).float()
    t = torch.randint(0, 16, (8,))
    lam = 1e-2
    lse = torch.logsumexp(x, -1)
    ref = (TF.cross_entropy(x, t, reduction="none") + lam * lse**2).mean()
    got = F.cross_entropy(x, t, z_loss=lam)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    a = x.clone().requires_grad_()
    F.cross_entropy(a, t, z_loss=lam).backward()
    b = x.clone().requires_grad_()
    (TF.cross_entropy(b, t, reduction="none") + lam * torch.logsumexp(b, -1) ** 2).mean().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.full((4,), -100)
    loss = F.cross_entropy(x, t)
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()


# --------------------------------------------------------------------------- bias_act_dropout

ACTS = {
    "gelu": lambda h: TF.gelu(h),
    "gelu_tanh": lambda h: TF.gelu(h, approximate="tanh"),
    "silu": TF.silu,
    "relu": TF.relu,
}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_bias_act_dropout_without_dropout_matches_torch(act):
    x = torch.randn(9, 67, requires_grad=True)
    b = torch.randn(67, requires_grad=True)
    y = F.bias_act_dropout(x, 0.0, keys(), 1, bias=b, activation=act)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = ACTS[act](x2 + b2)
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-4)


def test_bias_act_dropout_mask_is_shared_by_forward_and_backward():
    p = 0.3
    x = torch.randn(33, 130, requires_grad=True)
    b = torch.randn(130, requires_grad=True)
    y = F.bias_act_dropout(x, p, keys(), 5, bias=b, activation="gelu")
    full = TF.gelu(x.detach() + b.detach()) / (1 - p)
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p) < 0.03, rate
    torch.testing.assert_close(y[kept], full[kept], rtol=2e-6, atol=2e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    h = (x.detach() + b.detach()).requires_grad_()
    (TF.gelu(h) * kept / (1 - p)).backward(dy)
    torch.testing.assert_close(x.grad, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, h.grad.sum(0), rtol=1e-4, atol=1e-4)


def _keep_mask(shape, p, k, site, mask_bits):
    """The keep bits of (keys, site): plain dropout shares the keying of every dropping op."""
    return F.dropout(torch.ones(shape), p, k, site, mask_bits=mask_bits) != 0


@pytest.mark.parametrize("mask_bits", [32, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_bias_act_dropout_math_modes(act, dtype, mask_bits):
    """On the CPU every mode runs the exact reference: all modes equal bit for bit, the mask of
    the shared keying (dropped elements +0), and within the Math::Fast bound of the float64
    function where the exact formula is (all of SiLU and ReLU; the GELUs' exact formulas cancel
    below h = -3, see bounds.py). The GPU tests hold "fast" to the bound everywhere and "exact"
    to these bits."""
    p, site, k = 0.25, 4, keys()
    x = (torch.randn(29, 131) * 3).to(dtype)
    b = torch.randn(131).to(dtype)
    dy = torch.randn(29, 131).to(dtype)
    keep = _keep_mask(x.shape, p, k, site, mask_bits)
    assert 0.15 < 1 - keep.float().mean().item() < 0.35
    outs = {}
    for math_mode in (None, "fast", "exact"):
        xa, ba = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = F.bias_act_dropout(xa, p, k, site, bias=ba, activation=act, math=math_mode,
                               mask_bits=mask_bits)
        y.backward(dy)
        where = (x.float() + b.float()) >= -3 if act.startswith("gelu") else None
        check_bias_act_dropout(act, x, b, y.detach(), dy, xa.grad, ba.grad, p, keep, where)
        outs[math_mode] = (y.detach(), xa.grad, ba.grad)
    for mode in ("fast", "exact"):
        for u, v in zip(outs[None], outs[mode]):
            assert torch.equal(u, v), f"CPU: math={mode} has the reference's bits"


def test_bias_act_dropout_sixteen_bit_keying_quantises_p():
    x = torch.ones(256, 256)
    y16 = F.bias_act_dropout(x, 0.1, keys(), 3, activation="relu", mask_bits=16)
    y32 = F.bias_act_dropout(x, 0.1, keys(), 3, activation="relu")
    assert abs((y16 == 0).float().mean().item() - 0.1) < 0.01
    assert not torch.equal(y16 == 0, y32 == 0), "another keying, another mask"
    assert torch.equal(y16 == 0, _keep_mask(x.shape, 0.1, keys(), 3, 16).logical_not())


def test_default_keying_follows_the_dtype():
    """mask_bits=None (the default) is the dtype's keying: 16-bit keys for bfloat16 (the same
    bits as mask_bits=16, forward and backward), 32-bit for float32."""
    x = torch.randn(37, 96)
    for dtype, bits, other in ((torch.bfloat16, 16, 32), (torch.float32, 32, 16)):
        xd = x.to(dtype)
        y = F.dropout(xd, 0.3, keys(), 5)
        assert torch.equal(y, F.dropout(xd, 0.3, keys(), 5, mask_bits=bits)), dtype
        assert not torch.equal(y, F.dropout(xd, 0.3, keys(), 5, mask_bits=other)), dtype
    xb = x.to(torch.bfloat16)
    outs = {}
    for mb in (None, 16):
        xa = xb.clone().requires_grad_()
        y = F.bias_act_dropout(xa, 0.3, keys(), 6, activation="relu", mask_bits=mb)
        y.backward(torch.ones_like(y))
        outs[mb] = (y.detach(), xa.grad)
    assert all(torch.equal(u, v) for u, v in zip(outs[None], outs[16]))
    w = torch.randn(96).to(torch.bfloat16)
    a = F.dropout_add_norm(xb, w, keys(), 7, residual=xb, p=0.3)
    b = F.dropout_add_norm(xb, w, keys(), 7, residual=xb, p=0.3, mask_bits=16)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_math_and_keying_options_are_checked():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="math = 'quick'"):
        F.bias_act_dropout(x, 0.1, keys(), 1, math="quick")
    with pytest.raises(ValueError, match="math = 'fastest'"):
        F.cross_entropy(x, torch.zeros(4, dtype=torch.long), math="fastest")
    with pytest.raises(ValueError, match="math"):
        fusedreg.nn.CrossEntropyLoss(math=1)
    with pytest.raises(ValueError, match="mask_bits = 4 is not offered"):
        F.bias_act_dropout(x, 0.1, keys(), 1, mask_bits=4)
    with pytest.raises(ValueError, match="mask_bits = 12"):
        F.bias_act_dropout(x, 0.1, keys(), 1, mask_bits=12)
    # The raw op passes an unknown code through: the C ABI refuses it with its message.
    with pytest.raises(ValueError, match="math = 5"):
        OPS.cross_entropy(x, torch.zeros(4, dtype=torch.long), 0.0, -100, 0.0, 2, 5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_math_modes(reduction, dtype):
    """As for bias_act_dropout: every mode within the Math::Fast bound (float64 reference), all
    equal on the CPU."""
    rows, vocab = 23, 2100  # two groups of 2048 per slot on the GPU
    x = (torch.randn(rows, vocab) * 4).to(dtype)
    t = torch.randint(0, vocab, (rows,))
    t[3] = -100
    outs = {}
    for math_mode in (None, "fast", "exact"):
        a = x.clone().requires_grad_()
        loss = F.cross_entropy(a, t, label_smoothing=0.1, z_loss=1e-3, reduction=reduction,
                               math=math_mode)
        loss.sum().backward()
        check_cross_entropy(x, t, loss.detach(), a.grad, label_smoothing=0.1, z_loss=1e-3,
                            reduction=reduction)
        outs[math_mode] = (loss.detach(), a.grad)
    for mode in ("fast", "exact"):
        for u, v in zip(outs[None], outs[mode]):
            assert torch.equal(u, v), f"CPU: math={mode} has the reference's bits"
    m = fusedreg.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, reduction=reduction,
                                     math="exact")
    assert torch.equal(m(x, t), outs["exact"][0])


# --------------------------------------------------------------------------- dropout


def test_dropout_residual_semantics():
    p = 0.25
    x = torch.randn(16, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    r = torch.randn(16, 40, requires_grad=True)
    y = F.dropout(x, p, keys(), 2, bias=b, residual=r)
    d = y.detach() - r.detach()
    kept = d != 0
    assert abs((1 - kept.float().mean().item()) - p) < 0.06
    torch.testing.assert_close(y[kept], (r + (x + b) / (1 - p)).detach()[kept], rtol=1e-6, atol=1e-6)
    assert torch.equal(y.detach()[~kept], r.detach()[~kept]), "a dropped element is the residual"
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy * kept / (1 - p), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, (dy * kept / (1 - p)).sum(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(r.grad, dy), "the residual's gradient is dy"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dropout_p0_is_exact_and_plain_dropout_masks_match_residual_masks(dtype):
    x = torch.randn(5, 24).to(dtype)
    r = torch.randn(5, 24).to(dtype)
    assert torch.equal(F.dropout(x, 0.0, keys(), 0), x)
    y_plain = F.dropout(x, 0.5, keys(), 4)
    y_res = F.dropout(x, 0.5, keys(), 4, residual=r)
    assert torch.equal(y_plain == 0, y_res == r), "same (seed, step, site): same mask"


def test_drop_path_drops_whole_samples():
    seq, hidden, batch = 6, 8, 64
    x = torch.randn(batch * seq, hidden) + 5
    y = F.dropout(x, 0.0, keys(), 9, drop_path=0.5, rows_per_sample=seq)
    per_sample = (y.reshape(batch, seq, hidden) == 0).reshape(batch, -1)
    assert (per_sample.all(1) | (~per_sample).all(1)).all(), "whole samples kept or dropped"
    kept = ~per_sample.all(1)
    assert 10 < kept.sum() < 54
    torch.testing.assert_close(y.reshape(batch, seq, hidden)[kept],
                               x.reshape(batch, seq, hidden)[kept] * 2)


def test_sixteen_bit_keying_rate():
    x = torch.ones(256, 256)
    y = F.dropout(x, 0.1, keys(), 3, mask_bits=16)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.01
    r = torch.randn(256, 256)
    y_res = F.dropout(x, 0.1, keys(), 3, residual=r, mask_bits=16)
    assert torch.equal(y == 0, y_res == r), "16-bit keying with a residual: the same mask"
    # 8 bits: p quantised to 2^-8 (0.1 runs as 26/256); the CPU reference keys it (the GPU
    # kernels of dropout refuse it with a message for now).
    y8 = F.dropout(x, 0.1, keys(), 3, mask_bits=8)
    assert abs((y8 == 0).float().mean().item() - 26 / 256) < 0.01
    assert not torch.equal(y8 == 0, y == 0)
    with pytest.raises(ValueError, match="mask_bits = 4 is not offered"):
        F.dropout(x, 0.1, keys(), 3, mask_bits=4)


@pytest.mark.parametrize("mask_bits", [32, 16, 8])
def test_dropout_add_norm_keys_like_dropout_at_every_resolution(mask_bits):
    # The same (keys, site) and resolution key the same mask in every dropping op: s - residual
    # is nonzero exactly where dropout keeps, scaled at the probability applied.
    rows, h, p = 16, 72, 0.3
    x = torch.rand(rows, h) + 1.0
    r = torch.randn(rows, h)
    w = torch.ones(h)
    _, s = F.dropout_add_norm(x, w, keys(), 5, residual=r, norm="rms", p=p, mask_bits=mask_bits)
    keep = F.dropout(torch.ones(rows, h), p, keys(), 5, mask_bits=mask_bits)
    assert torch.equal((s - r) != 0, keep != 0)
    scale = keep[keep != 0][0].item()  # 1 / (1 - effective p)
    torch.testing.assert_close(s[keep != 0], (r + x * scale)[keep != 0], rtol=1e-6, atol=1e-6)
    m = fusedreg.nn.DropoutAddNorm(h, norm="rms", p=p, site=5, keys=keys(), mask_bits=mask_bits)
    assert torch.equal(m(x, r)[1], s)
    r2 = r.clone()
    F.dropout_add_(r2, x, p, keys(), 5, mask_bits=mask_bits)
    torch.testing.assert_close(r2, s, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- dropout_add_norm


def _rms(s, w, eps):
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_dropout_add_norm_without_dropout_matches_torch(norm):
    rows, h = 19, 72
    x = torch.randn(rows, h, requires_grad=True)
    r = torch.randn(rows, h, requires_grad=True)
    xb = torch.randn(h, requires_grad=True)
    mod = fusedreg.nn.DropoutAddNorm(h, norm=norm, layer=4, keys=keys())
    with torch.no_grad():
        mod.weight.copy_(torch.randn(h))
        if mod.bias is not None:
            mod.bias.copy_(torch.randn(h))
    out, s = mod(x, r, xb)
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, xb, mod.weight)]
    x2, r2, xb2, w2 = leaves
    s2 = r2 + x2 + xb2
    if norm == "layer":
        b2 = mod.bias.detach().clone().requires_grad_()
        leaves.append(b2)
        out2 = TF.layer_norm(s2, (h,), w2, b2, eps=1e-5) * 0.5
    else:
        out2 = _rms(s2, w2, 1e-5) * 0.5
    torch.testing.assert_close(s, s2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    d_out, d_s = torch.randn_like(out), torch.randn_like(s)
    (out * d_out + s * d_s).sum().backward()
    (out2 * d_out + s2 * d_s).sum().backward()
    ours = [x.grad, r.grad, xb.grad, mod.weight.grad] + ([mod.bias.grad] if norm == "layer" else [])
    for a, b in zip(ours, [t.grad for t in leaves]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_dropout_add_norm_with_dropout_and_f32_stream():
    rows, h, p = 12, 32, 0.2
    x = torch.randn(rows, h).bfloat16().requires_grad_()
    r = torch.randn(rows, h)  # f32 stream for bf16 x
    w = torch.ones(h, dtype=torch.bfloat16, requires_grad=True)
    # mask_bits=32: the scale is 1 / (1 - p) to f32 (bf16's default 16-bit keys apply
    # round(p 2^16) / 2^16, and scale by one over its complement).
    out, s = F.dropout_add_norm(x, w, keys(), 11, residual=r, norm="rms", p=p, stream_f32=True,
                                mask_bits=32)
    assert s.dtype == torch.float32 and out.dtype == torch.bfloat16
    kept = (s - r) != 0
    torch.testing.assert_close(s[kept], (r + x.float() / (1 - p))[kept].detach(), rtol=1e-6, atol=1e-6)
    out.float().sum().backward()
    assert x.grad is not None and w.grad is not None
    assert (x.grad.float()[~kept] == 0).all(), "dropped elements get no gradient"


# --------------------------------------------------------------------------- keys and determinism


def test_masks_follow_the_keys():
    x = torch.randn(64, 64)
    k = fusedreg.Keys(42, 0)
    a = F.dropout(x, 0.5, k, 1)
    assert torch.equal(a, F.dropout(x, 0.5, k, 1)), "same keys, same mask"
    assert not torch.equal(a, F.dropout(x, 0.5, k, 2)), "another site, another mask"
    k.next_step()
    assert not torch.equal(a, F.dropout(x, 0.5, k, 1)), "another step, another mask"
    assert torch.equal(a, F.dropout(x, 0.5, fusedreg.Keys(42, 0), 1)), "reproducible"


def test_eval_mode_drops_nothing():
    m = fusedreg.nn.Dropout(0.5, keys=keys()).eval()
    x = torch.randn(4, 8)
    assert torch.equal(m(x), x)


def test_stochastic_depth_plans_are_deterministic():
    sd = fusedreg.StochasticDepth(12, p=0.5, seed=3)
    a, b = sd.plan(10), sd.plan(10)
    assert a == b and len(a.runs) == 12
    assert a.runs[0] or True
    runs = sum(sum(sd.plan(s).runs) for s in range(200)) / 200
    assert 12 * 0.65 < runs < 12 * 0.85, runs  # linear to 0.5: about 3/4 of the blocks run
    for r, scale, p in zip(a.runs, a.residual_scale, [0.5 * (l + 1) / 12 for l in range(12)]):
        assert (scale == 0) if not r else math.isclose(scale, 1 / (1 - p), rel_tol=1e-6)


# --------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    k = keys().tensor
    x = torch.randn(6, 10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    r = torch.randn(6, 10, requires_grad=True)
    g = torch.randn(10, requires_grad=True)
    logits = torch.randn(6, 10, requires_grad=True)
    t = torch.randint(0, 10, (6,))
    dy = torch.randn(6, 10)
    return [
        (OPS.cross_entropy.default, (logits, t, 0.1, -100, 0.0, 2)),
        (OPS.cross_entropy.default, (logits, t, 0.0, -100, 1e-3, 0)),
        (OPS.cross_entropy_backward.default, (logits.detach(), t, torch.rand(6), 0.1, -100, 0.0)),
        (OPS.bias_act_dropout.default, (x, b, k, 1, 0, 0.2)),
        (OPS.bias_act_dropout.default, (x, None, k, 1, 3, 0.2)),
        (OPS.bias_act_dropout_backward.default, (dy, x.detach(), b.detach(), k, 1, 0, 0.2)),
        (OPS.bias_act_dropout.default, (x, b, k, 1, 1, 0.2, 1, 16)),
        (OPS.bias_act_dropout_backward.default, (dy, x.detach(), b.detach(), k, 1, 2, 0.2, 2, 16)),
        (OPS.cross_entropy.default, (logits, t, 0.1, -100, 0.0, 1, 1)),
        (OPS.cross_entropy_backward.default, (logits.detach(), t, torch.rand(6), 0.1, -100, 0.0, 2)),
        (OPS.dropout.default, (x, b, r, k, 2, 0.3, 0.0, 1, 32)),
        (OPS.dropout.default, (x, None, None, k, 2, 0.3, 0.5, 3, 32)),
        (OPS.dropout_backward.default, (dy, k, 2, 0.3, 0.0, 1, 32, True)),
        (OPS.dropout_add_norm.default, (x, r, b, g, b, k, 3, 0, 1e-5, 1.0, 0.1, 0.0, 1, False)),
        (OPS.dropout_add_norm.default, (x, None, None, g, None, k, 3, 1, 1e-5, 0.5, 0.1, 0.5, 2, False)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_in_place_residual_update_declares_its_mutation():
    x = torch.randn(8, 16)
    b = torch.randn(16)
    r = torch.randn(8, 16)
    want = F.dropout(x, 0.3, keys(), 6, bias=b, residual=r)
    v = r._version
    out = F.dropout_add_(r, x, 0.3, keys(), 6, bias=b)
    assert out is r and torch.equal(r, want), "same masks as the functional op"
    assert r._version > v, "the version counter is bumped (autograd sees the write)"
    torch.library.opcheck(OPS.dropout_add_.default,
                          (torch.randn(8, 16), x, b, keys().tensor, 6, 0.3, 0.0, 1))
    with pytest.raises(ValueError, match="residual"):
        F.dropout_add_(torch.randn(8, 15), x, 0.3, keys(), 6)
