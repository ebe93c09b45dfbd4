"""``nn.Module``s to drop into a model. Each dropping module has a ``site`` (a number fixed
at construction that tells its masks apart from the other sites' within a step) and reads the
step from its :class:`~fusedreg.Keys`. In ``eval()`` mode nothing is dropped."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as F
from . import _lib as L
from .keys import Keys, default_keys, next_site
from .redundancy import Redundancy


class _Site(nn.Module):
    def __init__(self, p: float, site: int | None, keys: Keys | None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p = {p} must lie in [0, 1]")
        self.p = float(p)
        self.site = next_site() if site is None else int(site)
        self.keys = keys if keys is not None else default_keys()

    def _p(self, p: float) -> float:
        return p if self.training else 0.0

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


class _Measured:
    """A residual add whose Block Influence rows can go to a meter site (see
    :class:`fusedreg.Redundancy`)."""

    meter: Redundancy | None = None
    meter_site: int = 0

    def measure(self, meter: Redundancy | None, site: int = 0):
        """Adds every later call's Block Influence rows to ``meter``'s site ``site``
        (``cos(residual, new stream)`` per row: the sub-block that produced ``x``); None stops
        measuring. Returns the module."""
        if meter is not None:
            meter.site(site)  # checks the index now, not at the first call
        self.meter, self.meter_site = meter, int(site)
        return self

    def _stats(self) -> Tensor | None:
        return None if self.meter is None else self.meter.site(self.meter_site)


class Dropout(_Site):
    """``rowscale · dropout(x + bias)`` (embedding, attention probabilities, LoRA input).
    ``drop_path`` drops whole samples (``rows_per_sample`` rows each) as stochastic depth does."""

    def __init__(self, p: float = 0.1, *, site: int | None = None, keys: Keys | None = None,
                 drop_path: float = 0.0, rows_per_sample: int = 1,
                 mask_bits: int | None = None):
        super().__init__(p, site, keys)
        self.drop_path, self.rows_per_sample, self.mask_bits = drop_path, rows_per_sample, mask_bits

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.dropout(x, self._p(self.p), self.keys, self.site, bias=bias,
                         drop_path=self._p(self.drop_path), rows_per_sample=self.rows_per_sample,
                         mask_bits=self.mask_bits)


class DropoutResidual(_Measured, Dropout):
    """``residual + rowscale · dropout(x + bias)``: the residual add of a post-norm or the
    output of a sub-block (the residual's gradient is the upstream one, nothing computed).
    :meth:`measure` sends its Block Influence rows to a meter: the final add of a block."""

    def forward(self, x: Tensor, residual: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.dropout(x, self._p(self.p), self.keys, self.site, bias=bias, residual=residual,
                         drop_path=self._p(self.drop_path), rows_per_sample=self.rows_per_sample,
                         mask_bits=self.mask_bits, stats=self._stats())


class BiasActDropout(_Site):
    """``dropout(act(x + bias))`` after the first linear of an MLP. With ``features`` it owns
    its bias (zeros); otherwise pass one to ``forward`` (e.g. a ``Linear(bias=False)``'s).
    ``math`` (None: the library's default, ``"fast"`` or ``"exact"``) and ``mask_bits`` (None: the
    dtype's default, 16 for bfloat16/float16 and 32 for float32; or 32, 16, 8) as in
    :func:`fusedreg.functional.bias_act_dropout`."""

    def __init__(self, activation: str = "gelu", p: float = 0.1, *, features: int | None = None,
                 site: int | None = None, keys: Keys | None = None, math: str | None = None,
                 mask_bits: int | None = None, device=None, dtype=None):
        super().__init__(p, site, keys)
        if activation not in L.ACT:
            raise ValueError(f"activation = {activation!r}; use one of {sorted(L.ACT)}")
        L.math_code("BiasActDropout", math)
        self.activation, self.math, self.mask_bits = activation, math, mask_bits
        self.bias = (nn.Parameter(torch.zeros(features, device=device, dtype=dtype))
                     if features is not None else None)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        b = bias if bias is not None else self.bias
        return F.bias_act_dropout(x, self._p(self.p), self.keys, self.site, bias=b,
                                  activation=self.activation, math=self.math,
                                  mask_bits=self.mask_bits)


class DropoutAddNorm(_Measured, _Site):
    """The entry of a pre-norm block: ``s = residual + rowscale · dropout(x + bias)``,
    ``out = norm(s) · γ (+ β)``, times ``1/sqrt(layer)`` with LayerNorm Scaling. Returns
    ``(out, s)``: ``s`` is the new residual stream. ``norm`` is ``"layer"`` or ``"rms"``;
    ``layer`` (1-based) turns LayerNorm Scaling on; ``drop_path`` drops whole samples of the
    branch; ``stream_f32`` keeps the residual stream in float32 for 16-bit ``x``;
    ``mask_bits`` (None: the dtype's default, 16 for bfloat16/float16 and 32 for float32; or
    32, 16, 8) is the keying resolution of the dropout mask."""

    def __init__(self, hidden: int, *, norm: str = "layer", eps: float = 1e-5, p: float = 0.0,
                 drop_path: float = 0.0, rows_per_sample: int = 1, layer: int | None = None,
                 stream_f32: bool = False, site: int | None = None, keys: Keys | None = None,
                 mask_bits: int | None = None, device=None, dtype=None):
        super().__init__(p, site, keys)
        if norm not in L.NORM:
            raise ValueError(f"norm = {norm!r}; use 'layer' or 'rms'")
        if layer is not None and layer < 1:
            raise ValueError(f"layer = {layer}: LayerNorm Scaling takes a 1-based layer index")
        self.norm, self.eps = norm, float(eps)
        self.drop_path, self.rows_per_sample = float(drop_path), int(rows_per_sample)
        self.layer_scale = 1.0 if layer is None else float(torch.tensor(1.0 / math.sqrt(layer)))
        self.stream_f32, self.mask_bits = stream_f32, mask_bits
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        self.bias = (nn.Parameter(torch.zeros(hidden, device=device, dtype=dtype))
                     if L.NORM[norm] == 0 else None)

    def forward(self, x: Tensor, residual: Tensor | None = None,
                x_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return F.dropout_add_norm(
            x, self.weight, self.keys, self.site, residual=residual, bias=x_bias,
            norm_bias=self.bias, norm=self.norm, eps=self.eps, layer_scale=self.layer_scale,
            p=self._p(self.p), drop_path=self._p(self.drop_path),
            rows_per_sample=self.rows_per_sample, stream_f32=self.stream_f32,
            mask_bits=self.mask_bits, stats=self._stats())


class CrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` on ``[..., vocab]`` logits with class-index targets, label
    smoothing, ``ignore_index``, reductions and an optional z-loss; loss and gradient fused.
    ``math``: None (the library's default, ``"fast"``) or ``"exact"``, as in
    :func:`fusedreg.functional.cross_entropy`."""

    def __init__(self, *, label_smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", z_loss: float = 0.0, math: str | None = None):
        super().__init__()
        L.math_code("CrossEntropyLoss", math)
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index
        self.reduction, self.z_loss, self.math = reduction, z_loss, math

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing,
                               ignore_index=self.ignore_index, reduction=self.reduction,
                               z_loss=self.z_loss, math=self.math)
