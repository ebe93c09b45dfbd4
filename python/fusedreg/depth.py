"""Stochastic depth plans: which blocks run at a step, drawn on the host from
``(seed, step, block)`` (no device work), so a dropped block launches nothing."""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass

from . import _lib as L

_SCHEDULES = {"linear": 0, "linspace": 1, "constant": 2}


@dataclass(frozen=True)
class Plan:
    """The plan of one step: ``runs[l]``, ``residual_scale[l]`` (``1/(1-p_l)`` for a kept block,
    fold it into the residual add) and, in row mode, the per-block drop-path probability
    ``row_p[l]`` (pass it as ``drop_path`` of the block's fused residual op)."""

    step: int
    runs: tuple[bool, ...]
    residual_scale: tuple[float, ...]
    row_p: tuple[float, ...]

    def running(self) -> int:
        return sum(self.runs)


class StochasticDepth:
    """Huang et al. 2016. ``schedule``: ``"linear"`` (``p_l = (l/L)·p``), ``"linspace"``
    (timm's ``linspace(0, p, L)``), ``"constant"``, or a list of per-block probabilities.
    ``mode="batch"`` drops whole blocks for the batch; ``"row"`` keeps every block and drops
    samples on the device (``plan.row_p``)."""

    def __init__(self, blocks: int, p: float = 0.1, schedule="linear", seed: int = 0,
                 mode: str = "batch"):
        if mode not in ("batch", "row"):
            raise ValueError(f"mode = {mode!r}; use 'batch' or 'row'")
        self.blocks, self.p, self.seed, self.mode = int(blocks), float(p), int(seed), mode
        if isinstance(schedule, str):
            if schedule not in _SCHEDULES:
                raise ValueError(f"schedule = {schedule!r}; use one of {sorted(_SCHEDULES)} "
                                 "or a list of probabilities")
            self._kind, self._probs = _SCHEDULES[schedule], None
        else:
            self._kind, self._probs = 3, (C.c_double * len(schedule))(*map(float, schedule))
            if len(schedule) != blocks:
                raise ValueError(f"{len(schedule)} probabilities for {blocks} blocks")
        self.plan(0)  # validates the schedule now

    def plan(self, step: int) -> Plan:
        n = self.blocks
        runs, scale = (C.c_uint8 * max(n, 1))(), (C.c_float * max(n, 1))()
        row_p = (C.c_double * max(n, 1))()
        L.check(L.lib.fr_stochastic_depth_plan(
            self._kind, self.p, self._probs, n, self.seed & (2**64 - 1), int(step),
            1 if self.mode == "row" else 0, runs, scale, row_p, None))
        return Plan(int(step), tuple(bool(r) for r in runs[:n]), tuple(scale[:n]),
                    tuple(row_p[:n]))
