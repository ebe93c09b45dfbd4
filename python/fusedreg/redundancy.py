"""Block Influence (ShortGPT): which residual sub-blocks are redundant, measured inside the fused
residual adds, :class:`fusedreg.nn.DropoutAddNorm` (the entry of a pre-norm sub-block) and
:class:`fusedreg.nn.DropoutResidual` (the final add of a block), with no extra pass over the
streams.

``BI = 1 - mean over tokens of cos(r, s)``, ``r`` the stream entering the add and ``s`` the
stream after it. Each measured call adds, per row, the row's cosine quantised to an integer
(``round(cos * 2^32)``) and a row count into its site's three int64 words (``cos_sum``, ``rows``,
``nonfinite``), with integer arithmetic on the device, no host synchronisation and the same bits
on the CPU and the GPU. Rows where ``r`` or ``s`` is zero are excluded; a non-finite row makes
the site's BI NaN. The library's ``redundancy`` module docs state the bound against an f64
recomputation. Measure in evaluation (``model.eval()``: no dropout, no drop path)."""

from __future__ import annotations

import torch
from torch import Tensor

_COS_SCALE = 2.0 ** 32
_MAX_ROWS = (1 << 31) - 1


class Redundancy:
    """Per-site Block Influence accumulators: an int64 tensor ``[sites, 3]`` on ``device``.

    Pass it to the modules you measure (``DropoutAddNorm.measure(meter, site)``,
    ``DropoutResidual.measure(meter, site)``) or a site's words (``meter.site(i)``) to the
    ``stats=`` of ``functional.dropout_add_norm``, ``functional.dropout`` (with a residual) or
    ``functional.dropout_add_``; read :meth:`bi` after the pass (one small copy) and
    :meth:`reset` before the next. In a pre-norm block the MLP's entry measures the attention
    sub-block and the final add the MLP::

        meter = fusedreg.Redundancy(2 * n_layers, device="cuda")
        for i, block in enumerate(model.blocks):
            block.mlp_entry.measure(meter, 2 * i)      # DropoutAddNorm: r + attn(...)
            block.final_add.measure(meter, 2 * i + 1)  # DropoutResidual: s + mlp(...)
        model.eval()
        with torch.no_grad():
            model(held_out)
        print(meter.bi())  # one value per site: None where no row was counted
    """

    def __init__(self, sites: int, device=None):
        if not isinstance(sites, int) or sites < 1:
            raise ValueError(f"Redundancy: sites = {sites!r}; use at least one site "
                             "(one per residual add you measure)")
        self.acc = torch.zeros((sites, 3), dtype=torch.int64, device=device)

    @property
    def sites(self) -> int:
        return self.acc.shape[0]

    def site(self, i: int) -> Tensor:
        """Site ``i``'s three words (a view the ops add to)."""
        if not 0 <= i < self.sites:
            raise ValueError(f"Redundancy: site {i} does not exist: the meter has {self.sites} "
                             f"sites (0..{self.sites})")
        return self.acc[i]

    def reset(self) -> None:
        """Zeroes every site (on the device, in stream order)."""
        self.acc.zero_()

    def stats(self) -> list[tuple[int, int, int]]:
        """``(cos_sum, rows, nonfinite)`` per site (one device-to-host copy)."""
        out = [tuple(int(v) for v in row) for row in self.acc.tolist()]
        for i, (_, rows, _) in enumerate(out):
            if rows > _MAX_ROWS:
                raise ValueError(f"Redundancy: site {i} accumulated {rows} rows since its last "
                                 f"reset; more than {_MAX_ROWS} may wrap its cosine sum: reset "
                                 "the meter more often")
        return out

    def bi(self) -> list[float | None]:
        """Block Influence per site, ``1 - mean cos`` in ``[0, 2]``: None where no row was
        counted, NaN where a row was non-finite."""
        out: list[float | None] = []
        for cos_sum, rows, nonfinite in self.stats():
            if nonfinite:
                out.append(float("nan"))
            elif rows == 0:
                out.append(None)
            else:
                out.append(1.0 - cos_sum / _COS_SCALE / rows)
        return out
