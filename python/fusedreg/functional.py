"""Functional forms of the ops (autograd included), on any shape ``[..., features]``."""

from __future__ import annotations

from torch import Tensor

import torch

from . import _lib as L
from . import ops as _ops  # noqa: F401  (registers torch.ops.fusedreg)
from .keys import Keys

_F = torch.ops.fusedreg


def _kt(keys: Keys | Tensor) -> Tensor:
    return keys.tensor if isinstance(keys, Keys) else keys


def _check_stats(op: str, stats: Tensor, x: Tensor, residual: Tensor | None,
                 needs_residual: bool = True) -> None:
    """A Block Influence site's words: int64 [3] on x's device, and (for dropout, whose stream
    without a residual is no residual add) a residual to measure."""
    if (not isinstance(stats, Tensor) or stats.dtype != torch.int64 or stats.shape != (3,)
            or not stats.is_contiguous()):
        what = (f"{stats.dtype} {tuple(stats.shape)}" if isinstance(stats, Tensor)
                else type(stats).__name__)
        raise ValueError(f"fusedreg.{op}: `stats` is {what}; a Block Influence site is a "
                         "contiguous int64 [3] (fusedreg.Redundancy.site(i))")
    if stats.device != x.device:
        raise ValueError(f"fusedreg.{op}: `stats` is on {stats.device}, `x` on {x.device}; "
                         "create the Redundancy meter on the model's device")
    if residual is None and needs_residual:
        raise ValueError(f"fusedreg.{op}: `stats` measures cos(residual, output) per row and "
                         "needs a `residual`; pass one, or stats=None")


def _bits(mask_bits: int | None) -> int:
    """The ABI's ``mask_bits``: None (and 0) is the dtype's default keying (16-bit keys for
    bfloat16 and float16, 32-bit for float32: the library's ``MaskResolution::default_for``)."""
    return 0 if mask_bits is None else int(mask_bits)


def dropout(x: Tensor, p: float, keys: Keys | Tensor, site: int, *, bias: Tensor | None = None,
            residual: Tensor | None = None, drop_path: float = 0.0, rows_per_sample: int = 1,
            mask_bits: int | None = None, stats: Tensor | None = None) -> Tensor:
    """``[residual +] rowscale · dropout(x + bias)``; ``drop_path > 0`` drops whole samples of
    ``rows_per_sample`` rows (stochastic depth per sample), scaling kept ones by ``1/(1-p)``.

    ``stats`` (with a ``residual`` only): a Block Influence site's words
    (``fusedreg.Redundancy.site(i)``, int64 ``[3]``) that this call's rows are added to
    (``cos(residual, y)`` per row: the final add of a block); None: not measured. The output
    and its gradients are the same bits either way.

    ``mask_bits``: None (the default: the dtype's, 16 for bfloat16/float16 and 32 for float32),
    32, 16 or 8 bits of the generator per element; kept elements are scaled at the probability
    applied, so the output stays unbiased."""
    args = (x, bias, residual, _kt(keys), site, float(p), float(drop_path),
            int(rows_per_sample), _bits(mask_bits))
    if stats is None:
        return _F.dropout.default(*args)
    _check_stats("dropout", stats, x, residual)
    y, words = _F.dropout_measured.default(*args)
    stats.add_(words)
    return y


def dropout_add_(residual: Tensor, x: Tensor, p: float, keys: Keys | Tensor, site: int, *,
                 bias: Tensor | None = None, drop_path: float = 0.0,
                 rows_per_sample: int = 1, mask_bits: int | None = None,
                 stats: Tensor | None = None) -> Tensor:
    """``residual += rowscale · dropout(x + bias)`` in place, without autograd (inference, or
    code under ``torch.no_grad()``); returns ``residual``. Same masks as :func:`dropout` (with
    the same ``mask_bits``). ``stats``: as :func:`dropout`'s, added to in place by the kernel
    (no extra tensor)."""
    if stats is not None:
        _check_stats("dropout_add_", stats, x, residual)
    _F.dropout_add_.default(residual, x, bias, _kt(keys), site, float(p), float(drop_path),
                            int(rows_per_sample), _bits(mask_bits), stats)
    return residual


def bias_act_dropout(x: Tensor, p: float, keys: Keys | Tensor, site: int, *,
                     bias: Tensor | None = None, activation: str = "gelu",
                     math: str | None = None, mask_bits: int | None = None) -> Tensor:
    """``dropout(act(x + bias))``, act in gelu (erf), gelu_tanh, silu, relu.

    ``math``: None (the library's default: ``"fast"`` for GELU and SiLU, ``"exact"`` for ReLU),
    ``"fast"`` (the GPU's special-function unit, within the bound of the library's
    ``bias_act_dropout`` docs) or ``"exact"`` (bit for bit with the CPU reference). CPU tensors
    always get the exact function. ``mask_bits``: None (the default: the dtype's, 16 for
    bfloat16/float16 and 32 for float32), 32, 16 (half the generator work, ``p`` quantised to
    ``2^-16``) or 8."""
    if activation not in L.ACT:
        raise ValueError(f"activation = {activation!r}; use one of {sorted(L.ACT)}")
    return _F.bias_act_dropout.default(x, bias, _kt(keys), site, L.ACT[activation], float(p),
                                       L.math_code("bias_act_dropout", math), _bits(mask_bits))


def dropout_add_norm(x: Tensor, weight: Tensor, keys: Keys | Tensor, site: int, *,
                     residual: Tensor | None = None, bias: Tensor | None = None,
                     norm_bias: Tensor | None = None, norm: str = "layer", eps: float = 1e-5,
                     layer_scale: float = 1.0, p: float = 0.0, drop_path: float = 0.0,
                     rows_per_sample: int = 1, stream_f32: bool = False,
                     mask_bits: int | None = None, stats: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``s = residual + rowscale · dropout(x + bias)``, ``out = norm(s) · layer_scale``;
    returns ``(out, s)`` (``s`` is the new residual stream: prenorm).

    ``mask_bits``: None (the default: the dtype's, 16 for bfloat16/float16 and 32 for float32),
    or 32, 16 or 8 bits of the generator per element (16: half the generator work,
    ``p`` quantised to 2^-16; 8: a quarter, ``p`` quantised to 2^-8); kept elements are scaled
    at the probability applied, so the output stays unbiased.

    ``stats``: a Block Influence site's words (``fusedreg.Redundancy.site(i)``, int64 ``[3]``)
    that this call's rows are added to (``cos(residual, s)`` per row); None: not measured."""
    if norm not in L.NORM:
        raise ValueError(f"norm = {norm!r}; use 'layer' or 'rms'")
    args = (x, residual, bias, weight, norm_bias, _kt(keys), site, L.NORM[norm], float(eps),
            float(layer_scale), float(p), float(drop_path), int(rows_per_sample),
            bool(stream_f32), _bits(mask_bits))
    if stats is None:
        out, s, _, _ = _F.dropout_add_norm.default(*args)
        return out, s
    # Without a residual the stream is zero: no row is counted (the library's rule).
    _check_stats("dropout_add_norm", stats, x, residual, needs_residual=False)
    out, s, _, _, words = _F.dropout_add_norm_measured.default(*args)
    stats.add_(words)
    return out, s


def cross_entropy(logits: Tensor, target: Tensor, *, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean",
                  z_loss: float = 0.0, math: str | None = None) -> Tensor:
    """PyTorch's ``F.cross_entropy`` on ``[..., vocab]`` logits (+ z-loss ``λ·lse²``); the loss
    is float32. With every target ignored the mean is 0 (PyTorch gives NaN).

    ``math``: None (the library's default, ``"fast"``: ``exp``/``log`` on the GPU's
    special-function unit within the bound of the library's ``cross_entropy`` docs) or
    ``"exact"`` (bit for bit with the CPU reference). CPU tensors always get the exact
    arithmetic."""
    if reduction not in L.REDUCTION:
        raise ValueError(f"reduction = {reduction!r}; use 'none', 'sum' or 'mean'")
    return _F.cross_entropy.default(logits, target, float(label_smoothing), int(ignore_index),
                                    float(z_loss), L.REDUCTION[reduction],
                                    L.math_code("cross_entropy", math))
