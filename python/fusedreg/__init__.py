"""fusedreg for PyTorch: fused dropout / dropout + residual / bias + activation + dropout /
dropout + add + LayerNorm-RMSNorm (with Block Influence statistics) / label-smoothed cross-entropy as ``torch.ops.fusedreg``
operators with autograd, ``nn.Module``s over them, ``fusedreg.optim.AdamW`` and stochastic-depth
plans. The library is reached through its C ABI (ctypes), so one package works across PyTorch
versions; CPU tensors run the library's CPU references, CUDA tensors its kernels on
``torch.cuda.current_stream()``."""

from . import _lib
from . import ops  # noqa: F401  (registers torch.ops.fusedreg.*)
from . import functional, nn, optim
from ._lib import FusedRegError, driver_present, kernels_built
from .depth import Plan, StochasticDepth
from .keys import Keys, default_keys, next_site
from .redundancy import Redundancy

__all__ = [
    "FusedRegError", "Keys", "Plan", "StochasticDepth", "default_keys", "driver_present",
    "functional", "kernels_built", "next_site", "nn", "optim", "Redundancy",
]
__version__ = "0.1.0"
