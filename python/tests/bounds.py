"""The error bounds of ``math="fast"``, as the library's module docs state them (Rust docs of
``fusedreg::bias_act_dropout`` ("Math::Fast") and ``fusedreg::cross_entropy`` ("Math::Fast")),
against the exact functions evaluated in float64. Shared by the CPU tests (where every mode runs
the exact CPU reference, so the bound holds with room to spare: they check the plumbing and the
checker) and the GPU tests (where ``"fast"`` runs the special-function unit: the real check)."""

import math

import torch
import torch.nn.functional as TF

# Activation -> ((act rel, act abs), (act' rel, act' abs)): Activation::fast_bound.
ACT_BOUND = {
    "gelu": ((2.0**-11, 2.0**-118), (2.0**-11, 2.0**-13)),
    "gelu_tanh": ((2.0**-16, 2.0**-118), (2.0**-18, 2.0**-23)),
    "silu": ((2.0**-17, 2.0**-118), (2.0**-18, 2.0**-23)),
    "relu": ((0.0, 0.0), (0.0, 0.0)),
}

_ACT64 = {
    "gelu": lambda h: TF.gelu(h),
    "gelu_tanh": lambda h: TF.gelu(h, approximate="tanh"),
    "silu": TF.silu,
    "relu": TF.relu,
}

# u_T (half an ulp, relative) and m_T (half the smallest subnormal) of each dtype.
_U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_M = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}


def _report(name, got, want, bound):
    err = (got - want).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} elements outside the Math::Fast bound; worst excess "
        f"{float((err - bound)[bad].max()):.3g} at {bad.nonzero()[0].tolist()}"
    )


def check_bias_act_dropout(act, x, bias, y, dy, dx, dbias, p, keep, where=None):
    """``y``, ``dx``, ``dbias`` of one call (any device) against the bounds of the module docs:
    kept elements (``keep``, a bool tensor: the mask of the same keys, e.g. from ``dropout``,
    which shares the keying) within the bound of ``s·act(h)`` / ``dy·s·act'(h)`` evaluated in
    float64 at the f32 ``h = x + bias``; dropped ones exactly ``+0`` in ``y`` and ``dx``.

    ``where`` (a bool tensor) limits the elementwise bounds to some elements, and skips dbias.
    The CPU tests need it for the exact GELUs: their pinned ``fma(erf(..), 0.5, 0.5)`` /
    ``fma(tanh(..), 0.5, 0.5)`` cancel in the left tail (h below about -3), where the fast
    sigmoid forms keep their relative accuracy; the fast bounds are the fast formulas'."""
    dt = x.dtype
    (a_rel, a_abs), (g_rel, g_abs) = ACT_BOUND[act]
    u, m = _U[dt], _M[dt]
    s = 1.0 / (1.0 - p)
    h = x.float().cpu()
    if bias is not None:
        h = h + bias.float().cpu()  # one f32 add, as both modes do
    h64 = h.double().requires_grad_()
    a64 = _ACT64[act](h64)
    (g64,) = torch.autograd.grad(a64.sum(), h64)
    a64, g64 = a64.detach() * s, g64 * s
    keep = keep.cpu()
    y64, dy64, dx64 = y.double().cpu(), dy.double().cpu(), dx.double().cpu()
    for name, t in (("y", y64), ("dx", dx64)):
        gone = t[~keep]
        assert (gone == 0).all() and not torch.signbit(gone).any(), f"{name}: dropped is +0"
    if where is not None:
        keep = keep & where.cpu()
    bound_y = (a_rel + 2.0**-23 + u) * a64.abs() + s * a_abs + m
    _report("y", y64[keep], a64[keep], bound_y[keep])
    d64 = torch.where(keep, dy64 * g64, torch.zeros_like(g64))
    bound_dx = (g_rel + 2.0**-22 + u) * d64.abs() + (dy64 * s).abs() * g_abs + m
    _report("dx", dx64[keep], d64[keep], bound_dx[keep])
    if dbias is not None and where is None:
        d2 = d64.reshape(-1, d64.shape[-1])
        dys = torch.where(keep, (dy64 * s).abs(), torch.zeros_like(dy64)).reshape(d2.shape)
        want = d2.sum(0)
        bound = (((g_rel + 2.0**-22) * d2.abs() + dys * g_abs).sum(0)
                 + d2.shape[0] * 2.0**-24 * d2.abs().sum(0))
        _report("dbias", dbias.double().cpu(), want, bound + u * want.abs() + m)


def check_cross_entropy(logits, target, loss, grad, *, label_smoothing=0.0, z_loss=0.0,
                        ignore_index=-100, reduction="mean"):
    """The loss (and, when given, the gradient of the loss's sum/mean with upstream 1) of one
    call against ``cross_entropy``'s Math::Fast bound, everything exact in float64."""
    x = logits.double().cpu().reshape(-1, logits.shape[-1])
    t = target.cpu().reshape(-1).long()
    rows, v = x.shape
    a, lam = float(label_smoothing), float(z_loss)
    uu = 2.0**-21
    n = math.ceil(v / 2048)
    valid = t != ignore_index
    lse = torch.logsumexp(x, -1)
    delta = (2 * n + 24 + lse.abs()) * uu
    tt = t.clamp(0, v - 1)
    xt = x.gather(1, tt[:, None])[:, 0]
    mean_x = x.mean(-1)
    row = (1 - a) * (lse - xt) + a * (lse - mean_x) + lam * lse**2
    row = torch.where(valid, row, torch.zeros_like(row))
    w = (1 - a) + a + 2 * lam * (lse.abs() + delta)
    big_t = ((1 - a) * (lse - xt)).abs() + (a * (lse - mean_x)).abs() + lam * lse**2
    row_b = torch.where(valid, w * delta + uu * big_t, torch.zeros_like(row))
    got = loss.double().cpu()
    n_valid = max(int(valid.sum()), 1)
    if reduction == "none":
        _report("loss", got.reshape(-1), row, row_b)
        up = torch.ones(rows, dtype=torch.float64)
    else:
        total_b = row_b.sum() + 2.0**-16 * row.abs().sum()
        want = row.sum()
        if reduction == "mean":
            want, total_b = want / n_valid, total_b / n_valid
        _report("loss", got.reshape(1), want.reshape(1), total_b.reshape(1))
        up = torch.full((rows,), 1.0 / n_valid if reduction == "mean" else 1.0,
                        dtype=torch.float64)
    if grad is None:
        return
    zf = 1 + 2 * lam * lse
    sm = torch.softmax(x, -1)
    onehot = torch.zeros_like(x).scatter_(1, tt[:, None], 1.0)
    scale = torch.where(valid, up, torch.zeros_like(up))[:, None]
    want = scale * (zf[:, None] * sm - a / v - (1 - a) * onehot)
    dl, ds = (delta[:, None], scale.abs())
    bound = ds * (sm * (zf[:, None].abs() * (dl + 4 * uu) + 2 * lam * dl)
                  + uu * (zf[:, None].abs() + a / v + (1 - a) * onehot))
    # Then one unit in the last place of the dtype (both sides round), at the result's size.
    ulp = 2.0 * _U[logits.dtype]
    bound = bound + ulp * (want.abs() + bound) + _M[logits.dtype] * 2
    _report("grad", grad.double().cpu().reshape(rows, v), want, bound)
