"""Block Influence through the PyTorch package (DropoutAddNorm, and dropout with a residual: the
final add of a block): the meter against a plain float64 recomputation
from the streams, determinism, no change to the op's outputs or gradients, the rules for zero
and non-finite rows, torch.compile, opcheck of the measured op, and bad input (CPU; the GPU twin is in
test_gpu.py)."""

import math

import pytest
import torch

import fusedreg
from fusedreg import functional as F
from fusedreg.nn import DropoutAddNorm, DropoutResidual

OPS = torch.ops.fusedreg


def recomputed_bi(r, s):
    """1 - mean over rows of cos(r_row, s_row) in float64 (rows with a zero vector left out)."""
    r = r.reshape(-1, r.shape[-1]).double()
    s = s.reshape(-1, s.shape[-1]).double()
    nr, ns = r.norm(dim=1), s.norm(dim=1)
    keep = (nr > 0) & (ns > 0)
    cos = (r * s).sum(1)[keep] / (nr[keep] * ns[keep])
    return 1.0 - cos.mean().item()


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_bi_matches_a_float64_recomputation(norm):
    hidden = 33
    meter = fusedreg.Redundancy(2)
    attn = DropoutAddNorm(hidden, norm=norm, keys=fusedreg.Keys(1, 0)).measure(meter, 0)
    mlp = DropoutAddNorm(hidden, norm=norm, keys=fusedreg.Keys(1, 0)).measure(meter, 1)
    streams = ([], [])
    with torch.no_grad():
        for _ in range(3):
            r = torch.randn(5, 7, hidden)
            _, s = attn(0.3 * torch.randn(5, 7, hidden), r)
            streams[0].append((r, s))
            _, s2 = mlp(2.0 * torch.randn(5, 7, hidden), s)
            streams[1].append((s, s2))
    bi = meter.bi()
    for site, pairs in enumerate(streams):
        want = recomputed_bi(torch.cat([r for r, _ in pairs]), torch.cat([s for _, s in pairs]))
        # The library's bound is (2k + 6) 2^-24 + 2^-33 with k from norm_stats_chain (33
        # columns: 44 for LayerNorm, 14 for RMSNorm; at most 5.6e-6): 1e-5 is above it.
        assert abs(bi[site] - want) < 1e-5, (site, bi[site], want)
    assert bi[0] < bi[1], "the larger branch turns the stream more"
    assert [rows for _, rows, _ in meter.stats()] == [3 * 35, 3 * 35]
    meter.reset()
    assert meter.bi() == [None, None]


def test_measuring_changes_no_output_bit_and_repeats_exactly():
    x, r = torch.randn(9, 40), torch.randn(9, 40)
    g, b = torch.randn(40), torch.randn(40)
    k = fusedreg.Keys(5, 2)
    plain = F.dropout_add_norm(x, g, k, 4, residual=r, norm_bias=b, p=0.2)
    words = []
    for _ in range(2):
        meter = fusedreg.Redundancy(1)
        got = F.dropout_add_norm(x, g, k, 4, residual=r, norm_bias=b, p=0.2,
                                 stats=meter.site(0))
        assert all(torch.equal(u, v) for u, v in zip(plain, got))
        words.append(meter.acc.clone())
    assert torch.equal(words[0], words[1])
    assert words[0][0, 1].item() == 9


def test_zero_rows_are_excluded_and_nonfinite_rows_poison_the_site():
    meter = fusedreg.Redundancy(2)
    g = torch.ones(16)
    F.dropout_add_norm(torch.randn(4, 16), g, fusedreg.Keys(0, 0), 0, residual=torch.zeros(4, 16),
                       stats=meter.site(0))
    x = torch.randn(4, 16)
    x[2, 3] = math.inf
    F.dropout_add_norm(x, g, fusedreg.Keys(0, 0), 0, residual=torch.randn(4, 16),
                       stats=meter.site(1))
    bi = meter.bi()
    assert bi[0] is None, "a zero residual gives no BI rather than a misleading one"
    assert math.isnan(bi[1])
    assert meter.stats()[1][2] == 1


def test_compiles_without_a_graph_break():
    meter_eager, meter_compiled = fusedreg.Redundancy(1), fusedreg.Redundancy(1)
    m = DropoutAddNorm(24, keys=fusedreg.Keys(2, 0))
    x, r = torch.randn(6, 24), torch.randn(6, 24)

    def step(meter):
        m.measure(meter, 0)
        return m(x, r)

    with torch.no_grad():
        want = step(meter_eager)
        m.measure(meter_compiled, 0)
        got = torch.compile(lambda: m(x, r), fullgraph=True)()
    assert all(torch.equal(u, v) for u, v in zip(want, got))
    assert torch.equal(meter_eager.acc, meter_compiled.acc)


def test_opcheck_of_the_measured_op():
    x = torch.randn(6, 10, requires_grad=True)
    r = torch.randn(6, 10, requires_grad=True)
    g = torch.randn(10, requires_grad=True)
    k = fusedreg.Keys(1, 0).tensor
    torch.library.opcheck(OPS.dropout_add_norm_measured.default,
                          (x, r, None, g, None, k, 0, 0, 1e-5, 1.0, 0.1, 0.0, 1, False, 32))


def test_gradients_flow_through_a_measured_call():
    x = torch.randn(5, 12, requires_grad=True)
    r = torch.randn(5, 12, requires_grad=True)
    g = torch.randn(12)
    k = fusedreg.Keys(3, 0)
    grads = []
    for stats in (None, fusedreg.Redundancy(1).site(0)):
        out, s = F.dropout_add_norm(x, g, k, 1, residual=r, p=0.2, stats=stats)
        grads.append(torch.autograd.grad((out * out).sum() + s.sum(), (x, r)))
    assert all(torch.equal(u, v) for u, v in zip(*grads))


def test_bad_input_is_a_python_exception():
    x, g = torch.randn(4, 8), torch.ones(8)
    k = fusedreg.Keys(0, 0)
    with pytest.raises(ValueError, match="stats"):
        F.dropout_add_norm(x, g, k, 0, stats=torch.zeros(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="stats"):
        F.dropout_add_norm(x, g, k, 0, stats=torch.zeros(4, dtype=torch.int64))
    meter = fusedreg.Redundancy(2)
    with pytest.raises(ValueError, match="site 2 does not exist"):
        DropoutAddNorm(8).measure(meter, 2)
    with pytest.raises(ValueError, match="at least one site"):
        fusedreg.Redundancy(0)


# ---------------------------------------------------------------------------------------------
# The final add of a block: dropout with a residual (DropoutResidual, functional.dropout,
# functional.dropout_add_).


def test_dropout_residual_bi_matches_a_float64_recomputation():
    hidden = 45
    meter = fusedreg.Redundancy(2)
    keys = fusedreg.Keys(7, 3)
    small = DropoutResidual(p=0.1, drop_path=0.25, rows_per_sample=4, keys=keys).measure(meter, 0)
    large = DropoutResidual(p=0.1, keys=keys).measure(meter, 1)
    pairs = ([], [])
    with torch.no_grad():
        for _ in range(3):
            r = torch.randn(6, 4, hidden)
            s = small(0.2 * torch.randn(6, 4, hidden), r)
            pairs[0].append((r, s))
            pairs[1].append((s, large(3.0 * torch.randn(6, 4, hidden), s)))
    bi = meter.bi()
    for site, ps in enumerate(pairs):
        want = recomputed_bi(torch.cat([r for r, _ in ps]), torch.cat([s for _, s in ps]))
        # dropout's bound: k = stats_chain(45) = 14, 2.0e-6 (its three sums in dropout_add_norm's
        # order and tree).
        assert abs(bi[site] - want) < 1e-5, (site, bi[site], want)
    assert 0.0 < bi[0] < bi[1], "the larger branch turns the stream more"
    assert [rows for _, rows, _ in meter.stats()] == [3 * 24, 3 * 24]


def test_measuring_dropout_changes_no_output_or_gradient_bit():
    x = torch.randn(11, 50, requires_grad=True)
    r = torch.randn(11, 50, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    k = fusedreg.Keys(9, 4)
    outs, grads, words = [], [], []
    for stats in (None, fusedreg.Redundancy(1).site(0), fusedreg.Redundancy(1).site(0)):
        y = F.dropout(x, 0.3, k, 6, bias=b, residual=r, drop_path=0.2, rows_per_sample=3,
                      stats=stats)
        outs.append(y.detach())
        grads.append(torch.autograd.grad((y * y).sum(), (x, r, b)))
        if stats is not None:
            words.append(stats.clone())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert all(torch.equal(u, v) for u, v in zip(grads[0], grads[1]))
    assert torch.equal(words[0], words[1]), "the same words on every run"
    assert words[0][1].item() == 11


def test_dropout_add_in_place_adds_the_same_words():
    x, r, b = torch.randn(8, 30), torch.randn(8, 30), torch.randn(30)
    k = fusedreg.Keys(2, 1)
    out_of_place, in_place = fusedreg.Redundancy(1), fusedreg.Redundancy(1)
    want = F.dropout(x, 0.2, k, 3, bias=b, residual=r, stats=out_of_place.site(0))
    stream = r.clone()
    v = in_place.acc._version
    F.dropout_add_(stream, x, 0.2, k, 3, bias=b, stats=in_place.site(0))
    assert torch.equal(stream, want)
    assert torch.equal(in_place.acc, out_of_place.acc)
    assert in_place.acc._version > v, "the words' write is declared"
    F.dropout_add_(stream, x, 0.2, k, 3, bias=b)  # no meter: the words stay
    assert torch.equal(in_place.acc, out_of_place.acc)


def test_dropout_residual_zero_rows_are_excluded():
    meter = fusedreg.Redundancy(1)
    F.dropout(torch.randn(4, 16), 0.0, fusedreg.Keys(0, 0), 0, residual=torch.zeros(4, 16),
              stats=meter.site(0))
    assert meter.bi() == [None]
    x = torch.randn(4, 16)
    x[1, 2] = math.nan
    F.dropout(x, 0.0, fusedreg.Keys(0, 0), 0, residual=torch.randn(4, 16), stats=meter.site(0))
    assert math.isnan(meter.bi()[0]) and meter.stats()[0][2] == 1


def test_dropout_residual_compiles_without_a_graph_break():
    meter_eager, meter_compiled = fusedreg.Redundancy(1), fusedreg.Redundancy(1)
    m = DropoutResidual(p=0.2, keys=fusedreg.Keys(2, 0))
    x, r = torch.randn(6, 24), torch.randn(6, 24)
    m.measure(meter_eager, 0)
    want = m(x, r)
    m.measure(meter_compiled, 0)
    got = torch.compile(lambda: m(x, r), fullgraph=True)()
    assert torch.equal(want, got)
    assert torch.equal(meter_eager.acc, meter_compiled.acc)
    assert meter_eager.stats()[0][1] == 6


def test_in_place_measuring_compiles_without_a_graph_break():
    """dropout_add_ writes the residual and a view of the meter (`(a!)`, `(b!)`): functionalized
    by torch.compile, the same stream and words as eager."""
    k = fusedreg.Keys(4, 1)
    x, r = torch.randn(5, 20), torch.randn(5, 20)
    eager, compiled = fusedreg.Redundancy(2), fusedreg.Redundancy(2)
    r_eager, r_compiled = r.clone(), r.clone()
    F.dropout_add_(r_eager, x, 0.2, k, 3, stats=eager.site(1))

    @torch.compile(fullgraph=True)
    def f(stream, meter_acc):
        F.dropout_add_(stream, x, 0.2, k, 3, stats=meter_acc[1])
        return stream * 2

    out = f(r_compiled, compiled.acc)
    assert torch.equal(r_compiled, r_eager) and torch.equal(out, r_eager * 2)
    assert torch.equal(compiled.acc, eager.acc) and eager.stats()[1][1] == 5


def test_opcheck_of_the_measured_dropout_ops():
    x = torch.randn(6, 10, requires_grad=True)
    r = torch.randn(6, 10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    k = fusedreg.Keys(1, 0).tensor
    torch.library.opcheck(OPS.dropout_measured.default, (x, b, r, k, 0, 0.1, 0.0, 1, 32))
    torch.library.opcheck(OPS.dropout_add_.default,
                          (r.detach().clone(), x.detach(), None, k, 0, 0.1, 0.0, 1, 32,
                           torch.zeros(3, dtype=torch.int64)))


def test_dropout_stats_bad_input_is_a_python_exception():
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    k = fusedreg.Keys(0, 0)
    with pytest.raises(ValueError, match="needs a `residual`"):
        F.dropout(x, 0.1, k, 0, stats=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="stats"):
        F.dropout(x, 0.1, k, 0, residual=r, stats=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="stats"):
        F.dropout_add_(r, x, 0.1, k, 0, stats=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="site 1 does not exist"):
        DropoutResidual().measure(fusedreg.Redundancy(1), 1)
    # The C boundary says the same to a caller that skips the Python checks.
    with pytest.raises(ValueError, match="needs a `residual`"):
        OPS.dropout_measured(x, None, None, k.tensor, 0, 0.1, 0.0, 1, 32)
