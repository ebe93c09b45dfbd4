"""torch.compile(fullgraph=True) of a small model with every op: no graph break, same values
as eager, gradients through every fused backward."""

import torch

import fusedreg
from fusedreg import nn as fnn


class Tiny(torch.nn.Module):
    def __init__(self, vocab=17, hidden=16, keys=None):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.emb_drop = fnn.Dropout(0.1, keys=keys)
        self.entry = fnn.DropoutAddNorm(hidden, norm="layer", p=0.1, layer=1, keys=keys)
        self.fc1 = torch.nn.Linear(hidden, 4 * hidden, bias=False)
        self.fc1_bias = torch.nn.Parameter(torch.zeros(4 * hidden))
        self.act = fnn.BiasActDropout("gelu_tanh", 0.1, keys=keys)
        self.fc2 = torch.nn.Linear(4 * hidden, hidden)
        self.res = fnn.DropoutResidual(0.1, keys=keys)
        self.final = fnn.DropoutAddNorm(hidden, norm="rms", keys=keys)
        self.head = torch.nn.Linear(hidden, vocab)
        self.loss = fnn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, idx, target):
        h = self.emb_drop(self.emb(idx))
        n, s = self.entry(h)
        a = self.act(self.fc1(n), self.fc1_bias)
        s = self.res(self.fc2(a), s)
        n, _ = self.final(s)
        return self.loss(self.head(n), target)


def test_compile_fullgraph_every_op():
    keys = fusedreg.Keys(5, 0)
    torch.manual_seed(0)
    m = Tiny(keys=keys)
    idx = torch.randint(0, 17, (3, 7))
    tgt = torch.randint(0, 17, (3, 7))
    eager = m(idx, tgt)
    eager.backward()
    g_eager = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True)
    loss = compiled(idx, tgt)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(m.parameters(), g_eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    # The step is a tensor input: a new step changes the masks without recompiling.
    keys.next_step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss2 = compiled(idx, tgt)
    assert loss2.item() != loss.item()


def test_compile_fullgraph_in_place_op():
    """The mutating op (declared `(a!)`) under torch.compile: functionalized, same result."""
    from fusedreg import functional as F

    k = fusedreg.Keys(1, 0)

    @torch.compile(fullgraph=True)
    def f(r, x):
        F.dropout_add_(r, x, 0.2, k, 3)
        return r * 2

    r, x = torch.randn(4, 8), torch.randn(4, 8)
    r2 = r.clone()
    out = f(r, x)
    F.dropout_add_(r2, x, 0.2, k, 3)
    assert torch.equal(r, r2) and torch.equal(out, r2 * 2)
