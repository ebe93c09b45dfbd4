"""fusedreg.optim.AdamW against torch.optim.AdamW + clip_grad_norm_ over 20 steps with param
groups, and its state_dict round trip."""

import pytest
import torch

import fusedreg


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.GELU(), torch.nn.LayerNorm(31),
                               torch.nn.Linear(31, 5))


def groups(m):
    decay = [p for p in m.parameters() if p.dim() >= 2]
    no_decay = [p for p in m.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def train(m, opt, steps, clip, sched=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(17, 13, generator=g)
        y = torch.randn(17, 5, generator=g)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(m(x), y) * 50  # big enough gradients to clip
        loss.backward()
        if clip is not None and not isinstance(opt, fusedreg.optim.AdamW):
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("clip", [None, 0.5])
def test_matches_torch_adamw_with_clipping_and_groups(clip):
    a, b = model(), model()
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ta = torch.optim.AdamW(groups(a), **kw)
    tb = fusedreg.optim.AdamW(groups(b), **kw, max_grad_norm=clip)
    sa = torch.optim.lr_scheduler.LambdaLR(ta, lambda s: 1.0 / (1 + 0.1 * s))
    sb = torch.optim.lr_scheduler.LambdaLR(tb, lambda s: 1.0 / (1 + 0.1 * s))
    la = train(a, ta, 20, clip, sa)
    lb = train(b, tb, 20, clip, sb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-5)
    assert la[-1] < la[0]


def test_state_dict_round_trip_resumes_bit_for_bit():
    a = model()
    oa = fusedreg.optim.AdamW(groups(a), lr=1e-2, max_grad_norm=1.0)
    train(a, oa, 5, 1.0)
    sd = oa.state_dict()
    assert sd["fusedreg_adamw"].dtype == torch.uint8 and sd["fusedreg_adamw"].numel() > 0
    params = {k: v.clone() for k, v in a.state_dict().items()}

    b = model()
    b.load_state_dict(params)
    ob = fusedreg.optim.AdamW(groups(b), lr=1e-2, max_grad_norm=1.0)
    ob.load_state_dict(sd)  # before its first step: applied when the native object is created
    train(a, oa, 5, 1.0, seed=9)
    train(b, ob, 5, 1.0, seed=9)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_params_without_grad_are_skipped():
    m = model()
    frozen = m[0].bias
    before = frozen.detach().clone()
    opt = fusedreg.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.5)
    x = torch.randn(4, 13)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        m(x).sum().backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before), "no gradient: no decay, no update (as PyTorch)"


def test_groups_with_different_lr_are_refused():
    m = model()
    opt = fusedreg.optim.AdamW([{"params": m[0].parameters(), "lr": 1e-3},
                                {"params": m[3].parameters(), "lr": 1e-2}])
    m(torch.randn(2, 13)).sum().backward()
    with pytest.raises(ValueError, match="may differ only in weight_decay"):
        opt.step()


def test_bad_hyperparameters_raise_with_the_message():
    m = model()
    opt = fusedreg.optim.AdamW(m.parameters(), lr=-1.0)
    m(torch.randn(2, 13)).sum().backward()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
