"""The keys every dropping op reads: a seed and the training step, in a CPU tensor."""

from __future__ import annotations

import itertools
import threading

import torch

_sites = itertools.count()
_sites_lock = threading.Lock()


def next_site() -> int:
    """A fresh site number (modules built without an explicit ``site`` take one in construction
    order, so the same model code gives the same sites)."""
    with _sites_lock:
        return next(_sites)


class Keys:
    """``(seed, step)`` for every mask of a training step: masks are a pure function of
    ``(seed, step, site, element index)``, identical on the CPU and on any GPU.

    The two numbers live in a CPU int64 tensor (``keys.tensor``) that the ops take as an input:
    reading it never waits for a GPU, and ``torch.compile`` neither bakes the step into its graph
    nor recompiles when it changes. Call :meth:`next_step` once per optimizer step (a forward run
    twice with the same keys, as activation recomputation does, draws the same masks).

    >>> keys = Keys(seed=1234)
    >>> keys.step
    0
    >>> keys.next_step(); keys.step
    1
    """

    def __init__(self, seed: int = 0, step: int = 0):
        if not 0 <= step < 2**32:
            raise ValueError(f"step = {step} must lie in [0, 2^32)")
        seed = int(seed) & (2**64 - 1)
        if seed >= 2**63:
            seed -= 2**64  # stored as int64; the ops read it back as u64
        self.tensor = torch.tensor([seed, step], dtype=torch.int64)

    @property
    def seed(self) -> int:
        return int(self.tensor[0]) & (2**64 - 1)

    @property
    def step(self) -> int:
        return int(self.tensor[1])

    def next_step(self) -> None:
        """Advances the step in place (a CPU op: no device work, no sync)."""
        if self.step + 1 >= 2**32:
            raise ValueError("step would reach 2^32: start a new seed")
        self.tensor[1] += 1

    def set_step(self, step: int) -> None:
        """Sets the step (resuming from a checkpoint)."""
        if not 0 <= step < 2**32:
            raise ValueError(f"step = {step} must lie in [0, 2^32)")
        self.tensor[1] = step

    def __repr__(self) -> str:
        return f"Keys(seed={self.seed}, step={self.step})"


_default = Keys(0)


def default_keys() -> Keys:
    """The keys modules use when built without ``keys=`` (advance with ``next_step()``)."""
    return _default
