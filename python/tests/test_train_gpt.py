"""examples/train_gpt.py: the plain-PyTorch and the fusedreg model compute the same function
with dropout off (same weights: loss and gradients), and both lower the loss."""

import argparse
import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_gpt.py"


def load():
    spec = importlib.util.spec_from_file_location("train_gpt_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny(**kw):
    a = dict(layers=2, hidden=32, heads=2, context=16, batch=4, lr=1e-3, dropout=0.0,
             drop_path=0.0, label_smoothing=0.1, no_lns=False, seed=3)
    a.update(kw)
    return argparse.Namespace(**a)


def copy_weights(plain, fused):
    with torch.no_grad():
        fused.wte.weight.copy_(plain.wte.weight)
        fused.wpe.weight.copy_(plain.wpe.weight)
        fused.head.weight.copy_(plain.head.weight)
        for l, (pb, fb) in enumerate(zip(plain.blocks, fused.blocks)):
            fb.qkv.load_state_dict(pb.qkv.state_dict())
            for name in ("proj", "fc", "out"):
                getattr(fb, name).weight.copy_(getattr(pb, name).weight)
                getattr(fb, name + "_b").copy_(getattr(pb, name).bias)
            for pn, fn in ((plain.ln1[l], fused.entry1[l]), (plain.ln2[l], fused.entry2[l])):
                fn.weight.copy_(pn.weight)
                fn.bias.copy_(pn.bias)
        fused.final.weight.copy_(plain.lnf.weight)
        fused.final.bias.copy_(plain.lnf.bias)


def test_plain_and_fused_models_agree_without_dropout():
    ex = load()
    import fusedreg

    a = tiny()
    torch.manual_seed(0)
    plain = ex.PlainGpt(a)
    for p in plain.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.2)
    fused = ex.FusedGpt(a, fusedreg.Keys(1, 0))
    copy_weights(plain, fused)
    idx = torch.randint(0, 256, (a.batch, a.context))
    tgt = torch.randint(0, 256, (a.batch, a.context))
    lp, lf = plain(idx, tgt), fused(idx, tgt)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-5)
    lp.backward()
    lf.backward()
    torch.testing.assert_close(fused.blocks[0].fc_b.grad, plain.blocks[0].fc.bias.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.entry2[1].weight.grad, plain.ln2[1].weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.wte.weight.grad, plain.wte.weight.grad, rtol=1e-4, atol=1e-5)
