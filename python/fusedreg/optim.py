"""``fusedreg.optim.AdamW``: a ``torch.optim.Optimizer`` over fusedreg's fused multi-tensor
AdamW with global-norm clipping on the device.

The parameter list is registered once with the library (one native optimizer object, created
at the first ``step()``); every step passes the gradients' current addresses, so
``zero_grad(set_to_none=True)`` is fine. On CUDA a step is three launches (norm partials,
coefficient, update) on the stream current at the first step, with no host sync; on the CPU it
runs the library's reference (bit for bit the kernels' arithmetic). The stream is fixed at the
first step (the library's tensor set is built on it): capture CUDA graphs on that stream.

Parameter groups may differ in ``weight_decay`` (per tensor, e.g. no decay for biases and norm
weights); ``lr``, ``betas`` and ``eps`` are shared by all groups (one native object), and a
learning-rate scheduler may change ``lr`` between steps (applied on the device, no sync).
Every parameter has one dtype, every gradient one dtype. Parameters whose ``.grad`` is None are
skipped for that step (parameters, moments and step count untouched, as PyTorch does).
"""

from __future__ import annotations

import ctypes as C

import torch
from torch import Tensor

from . import _lib as L
from .ops import _d, _DT


class AdamW(torch.optim.Optimizer):
    """AdamW (PyTorch's formula in f32; decoupled weight decay) with optional clipping of the
    global gradient norm to ``max_grad_norm`` before the update (``clip_grad_norm_`` fused into
    the step). Lean state: ``bf16_moments`` (m and v stored in bf16), ``master_weights=False``
    (16-bit parameters updated directly, with stochastic rounding when
    ``stochastic_rounding_seed`` is set)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, max_grad_norm: float | None = None,
                 bf16_moments: bool = False, master_weights: bool = True,
                 stochastic_rounding_seed: int | None = None):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm = {max_grad_norm} must be > 0 (None: no clipping)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self._lean = (bool(bf16_moments), bool(master_weights), stochastic_rounding_seed)
        self._native = None
        self._pending_state: bytes | None = None
        self._params: list[Tensor] = []
        self._fixed = None

    # -- the native object ------------------------------------------------------------------

    def _hyper(self):
        g0 = self.param_groups[0]
        key = (float(g0["betas"][0]), float(g0["betas"][1]), float(g0["eps"]))
        for i, g in enumerate(self.param_groups):
            k = (float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]))
            if k != key or float(g["lr"]) != float(g0["lr"]):
                raise ValueError(
                    f"fusedreg.optim.AdamW: param group {i} has lr/betas/eps "
                    f"{float(g['lr'])}/{g['betas']}/{g['eps']}, group 0 {float(g0['lr'])}/"
                    f"{g0['betas']}/{g0['eps']}: groups may differ only in weight_decay (create "
                    "one optimizer per learning rate)"
                )
        return float(g0["lr"]), key

    def _all(self):
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                out.append((p, float(g["weight_decay"])))
        return out

    def _create(self):
        pairs = self._all()
        if not pairs:
            raise ValueError("fusedreg.optim.AdamW: no parameters")
        params = [p for p, _ in pairs]
        dev = params[0].device
        for i, p in enumerate(params):
            if p.device != dev:
                raise ValueError(f"fusedreg.optim.AdamW: parameter {i} is on {p.device}, "
                                 f"parameter 0 on {dev}: one optimizer per device")
            if not p.is_contiguous():
                raise ValueError(f"fusedreg.optim.AdamW: parameter {i} is not contiguous")
            if p.dtype not in _DT or p.dtype in (torch.int32, torch.int64):
                raise ValueError(f"fusedreg.optim.AdamW: parameter {i} has dtype {p.dtype}")
        lr, (b1, b2, eps) = self._hyper()
        o = L.lib.fr_adamw_options_default()
        o.lr, o.beta1, o.beta2, o.eps = lr, b1, b2, eps
        o.max_grad_norm = float(self.max_grad_norm or 0.0)
        bf16_m, master, sr_seed = self._lean
        o.bf16_moments, o.master_weights = int(bf16_m), int(master)
        if sr_seed is not None:
            o.stochastic_rounding, o.rounding_seed = 1, int(sr_seed) & (2**64 - 1)
        # Gradients at creation: the current ones (a stand-in of the right dtype for params
        # without one; those are skipped until they have a gradient).
        gdtype = next((p.grad.dtype for p in params if p.grad is not None), params[0].dtype)
        self._stand_in = {}
        grads = [self._grad(i, p, gdtype) for i, p in enumerate(params)]
        n = len(params)
        pd = (L.Tensor * n)(*[_d(p) for p in params])
        gd = (L.Tensor * n)(*[_d(g) for g in grads])
        wd = (C.c_float * n)(*[w for _, w in pairs])
        out = C.c_void_p()
        L.check(L.lib.fr_adamw_create(C.byref(o), self._exec(dev), pd, gd, wd, n, C.byref(out)))
        self._native = out
        self._params = params
        self._gdtype = gdtype
        self._wd = [w for _, w in pairs]
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def _grad(self, i: int, p: Tensor, gdtype) -> Tensor:
        g = p.grad
        if g is None:
            if i not in self._stand_in:
                self._stand_in[i] = torch.zeros_like(p, dtype=gdtype)
            return self._stand_in[i]
        if g.dtype != gdtype:
            raise ValueError(f"fusedreg.optim.AdamW: gradient {i} has dtype {g.dtype}, the "
                             f"others {gdtype}: one gradient dtype per optimizer")
        if g.is_sparse or not g.is_contiguous():
            raise ValueError(f"fusedreg.optim.AdamW: gradient {i} must be dense and contiguous")
        return g

    @staticmethod
    def _exec(dev) -> L.Exec:
        if dev.type == "cpu":
            return L.Exec(-1, None)
        return L.Exec(dev.index, torch.cuda.current_stream(dev).cuda_stream)

    def __del__(self):
        native = getattr(self, "_native", None)
        if native is not None:
            self._native = None
            try:
                L.lib.fr_adamw_destroy(native)
            except Exception:  # interpreter shutdown: the library may already be unloaded
                pass

    # -- torch.optim.Optimizer ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._native is None:
            self._create()
        pairs = self._all()
        if [p for p, _ in pairs] != self._params or [w for _, w in pairs] != self._wd:
            raise ValueError("fusedreg.optim.AdamW: the parameter list or a weight decay changed "
                             "after the first step; create a new optimizer")
        lr, _ = self._hyper()
        n = len(self._params)
        grads = [self._grad(i, p, self._gdtype) for i, p in enumerate(self._params)]
        gd = (L.Tensor * n)(*[_d(g) for g in grads])
        skip = (C.c_uint8 * n)(*[int(p.grad is None) for p in self._params])
        L.check(L.lib.fr_adamw_step(self._native, gd, skip, n, lr))
        return loss

    def _save(self) -> bytes:
        size = C.c_int64()
        L.check(L.lib.fr_adamw_state_size(self._native, C.byref(size)))
        buf = (C.c_uint8 * size.value)()
        L.check(L.lib.fr_adamw_save_state(self._native, buf, size.value))
        return bytes(buf)

    def _restore(self, data: bytes) -> None:
        buf = (C.c_uint8 * len(data)).from_buffer_copy(data)
        L.check(L.lib.fr_adamw_restore_state(self._native, buf, len(data)))

    def state_dict(self):
        sd = super().state_dict()
        if self._native is not None:
            state = self._save()
        else:
            state = self._pending_state
        sd["fusedreg_adamw"] = (torch.frombuffer(bytearray(state), dtype=torch.uint8)
                                if state is not None else None)
        sd["max_grad_norm"] = self.max_grad_norm
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        blob = state_dict.pop("fusedreg_adamw", None)
        self.max_grad_norm = state_dict.pop("max_grad_norm", self.max_grad_norm)
        super().load_state_dict(state_dict)
        if blob is None:
            return
        if isinstance(blob, Tensor):
            blob = blob.detach().to("cpu", torch.uint8).contiguous()
            data = C.string_at(blob.data_ptr(), blob.numel())
        else:
            data = bytes(blob)
        if self._native is None:
            self._pending_state = data
        else:
            self._restore(data)
