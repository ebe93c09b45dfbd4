"""fusedreg's ops as PyTorch operators (namespace ``torch.ops.fusedreg``).

Registered through ``torch.library.Library`` directly (as vLLM does): a kernel per dispatch key
(CPU: the library's CPU reference; CUDA: its kernels on ``torch.cuda.current_stream()``), a fake
kernel for ``torch.compile`` (shapes and dtypes only), and autograd formulas that call the fused
backward ops. Masks are regenerated in the backward from ``(seed, step, site)``: nothing is
stored for them.

Keys: every dropping op takes ``keys``, a CPU int64 tensor ``[seed, step]`` (see
:class:`fusedreg.Keys`) and a ``site`` number; the call id of the mask is
``step * 2**32 + site * 2**8 + stream`` (stream 0: the element mask, 1: the drop path's row
draws), as in the candle adapter. Reading a CPU tensor never waits for the GPU, and because keys
are a tensor input, ``torch.compile`` neither bakes the step into the graph nor recompiles when it
changes.

Every op takes contiguous tensors (anything else is a ``ValueError`` naming the argument). The
training ops return new tensors; ``dropout_add_`` writes its residual in place, declares it
(``Tensor(a!)``) and bumps its version counter.
"""

from __future__ import annotations

import ctypes as C
import struct
import threading

import torch
from torch import Tensor

from . import _lib as L

_lib = torch.library.Library("fusedreg", "DEF")

_DT = {
    torch.float32: L.F32,
    torch.float16: L.F16,
    torch.bfloat16: L.BF16,
    torch.int32: L.I32,
    torch.int64: L.I64,
    torch.uint8: L.U8,
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Shared glue: descriptors, where a call runs, checks, keys.


def _d(t: Tensor | None):
    """The ABI descriptor of a tensor (None stays None: a null pointer)."""
    if t is None:
        return None
    return L.Tensor(t.data_ptr(), t.numel(), _DT[t.dtype])


_CPU = L.Exec(-1, None)
_EXECS: dict = {}  # (device index, stream) -> Exec, built once each


def _cuda_stream(index: int) -> int:
    """The raw handle of the current stream of CUDA device ``index`` (what
    ``torch.cuda.current_stream(index).cuda_stream`` is, without building a Stream object)."""
    return torch._C._cuda_getCurrentRawStream(index)


if not hasattr(torch._C, "_cuda_getCurrentRawStream"):  # a build without CUDA support
    def _cuda_stream(index: int) -> int:  # noqa: F811
        return torch.cuda.current_stream(index).cuda_stream


def _exec(t: Tensor) -> L.Exec:
    """Where a call runs: the CPU reference, or the tensor's device on its current stream."""
    if not t.is_cuda:
        return _CPU
    index = t.get_device()
    key = (index, _cuda_stream(index))
    e = _EXECS.get(key)
    if e is None:
        e = _EXECS[key] = L.Exec(index, key[1])
    return e


# FrTensor {void *data; int64_t len; int32_t dtype;} = 24 bytes on x86-64 / aarch64.
_DESC = struct.Struct("Pqi4x")  # native sizes and alignment, as the C struct
assert _DESC.size == C.sizeof(L.Tensor)
_MAX_TENSORS = 16


class _Scratch(threading.local):
    """Per-thread buffer the options and descriptors of one call are packed into (calls never
    nest), with the address of every slot computed once."""

    def __init__(self):
        self.buf = (C.c_uint8 * (_OPT.size + _DESC.size * _MAX_TENSORS))()
        self.base = C.addressof(self.buf)
        self.slots = tuple((_OPT.size + i * _DESC.size, self.base + _OPT.size + i * _DESC.size)
                           for i in range(_MAX_TENSORS))


# FrOptions, packed natively (same layout as the C struct, checked below). Every op builds the
# whole tuple of fields positionally (no per-call object or attribute lookups), in this order:
# rows, cols, p, seed, call, mask_bits, math, path_p, path_call, rows_per_sample, activation,
# norm, eps, layer_scale, label_smoothing, z_loss, ignore_index, reduction.
_OPT_FMT = "qqdQQIIdQqIIffddqI"
# struct adds no trailing padding; the C struct is padded to its 8-byte alignment.
_OPT = struct.Struct(_OPT_FMT + f"{C.sizeof(L.Options) - struct.calcsize(_OPT_FMT)}x")
assert _OPT.size == C.sizeof(L.Options) and len(L.Options._fields_) == 18
# The library's defaults of the fields an op leaves alone.
(_, _, _, _, _, _BITS0, _MATH0, _, _, _, _ACT0, _NORM0, _EPS0, _LS0, _, _, _II0, _RED0) = \
    _OPT.unpack(bytes(L.lib.fr_options_default()))
_scratch = _Scratch()


def _check(op: str, what: str, t: Tensor | None, like: Tensor | None = None,
           dtypes=_FLOATS, numel: int | None = None) -> None:
    """Raises ValueError for what the C side cannot see: strides and devices (it checks lengths
    and dtypes again). One cheap test first; the detailed checks only when it fails."""
    if t is None:
        return
    try:
        if (t.dtype in dtypes and t.is_contiguous()
                and (like is None or (t.is_cuda == like.is_cuda
                                      and t.get_device() == like.get_device()))
                and (numel is None or t.numel() == numel)
                and (t.is_cuda or t.device.type == "cpu")):
            return
    except AttributeError:
        pass
    _check_slow(op, what, t, like, dtypes, numel)


def _check_slow(op: str, what: str, t: Tensor | None, like: Tensor | None = None,
           dtypes=_FLOATS, numel: int | None = None) -> None:
    """The detailed checks, each with its message."""
    if not isinstance(t, Tensor):
        raise TypeError(f"fusedreg.{op}: `{what}` must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"fusedreg.{op}: `{what}` has dtype {t.dtype}; use {names}")
    if not t.is_contiguous():
        raise ValueError(
            f"fusedreg.{op}: `{what}` is not contiguous (shape {tuple(t.shape)}, stride "
            f"{t.stride()}); call .contiguous() first"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"fusedreg.{op}: `{what}` is on {t.device}; use a CPU or CUDA tensor")
    if like is not None and t.device != like.device:
        raise ValueError(
            f"fusedreg.{op}: `{what}` is on {t.device}, the first input on {like.device}"
        )
    if numel is not None and t.numel() != numel:
        raise ValueError(
            f"fusedreg.{op}: `{what}` has {t.numel()} elements (shape {tuple(t.shape)}), "
            f"expected {numel}"
        )


def _rows_cols(op: str, x: Tensor) -> tuple[int, int]:
    if x.dim() == 0:
        raise ValueError(f"fusedreg.{op}: `x` is a scalar; it needs a last (feature) dimension")
    cols = x.shape[-1]
    return (x.numel() // cols if cols else 0), cols


def _keys(op: str, keys: Tensor) -> tuple[int, int]:
    if keys.dtype != torch.int64 or keys.numel() != 2 or not keys.is_cpu:
        raise ValueError(
            f"fusedreg.{op}: `keys` must be a CPU int64 tensor [seed, step] (fusedreg.Keys), "
            f"got {keys.dtype} {tuple(keys.shape)} on {keys.device}"
        )
    seed, step = keys.tolist()
    if step < 0 or step > _MASK32:
        raise ValueError(f"fusedreg.{op}: step = {step} must lie in [0, 2^32)")
    return seed & _MASK64, step


def _key_fields(op: str, keys: Tensor, site: int) -> tuple[int, int, int]:
    """``(seed, call, path_call)`` of a dropping op at ``site``: the call ids of its element
    mask (stream 0) and of its drop path's row draws (stream 1)."""
    seed, step = _keys(op, keys)
    if not 0 <= site < (1 << 24):
        raise ValueError(f"fusedreg.{op}: site = {site} must lie in [0, 2^24)")
    call = (step << 32) | (site << 8)
    return seed, call, call | 1


def _run(fn, o: tuple, ref: Tensor, *tensors) -> None:
    """Calls a C entry point with the options (the full tuple of fields), where ``ref`` lives,
    and the tensors' descriptors (None: a null pointer), all packed into this thread's buffer."""
    sc = _scratch
    buf = sc.buf
    _OPT.pack_into(buf, 0, *o)
    args = []
    for t, (off, addr) in zip(tensors, sc.slots):
        if t is None:
            args.append(None)
        else:
            _DESC.pack_into(buf, off, t.data_ptr(), t.numel(), _DT[t.dtype])
            args.append(addr)
    status = fn(sc.base, _exec(ref), *args)
    if status:
        L.check(status)


_WS_SIZES: dict = {}  # (FR_OP_* code, rows, cols, dtype code, reduction) -> bytes


def _workspace(code: int, o: tuple, ref: Tensor) -> Tensor | None:
    """The device workspace of a CUDA call of op ``code`` with options ``o`` (``ref``: its main
    tensor), from PyTorch's caching allocator, so that PyTorch owns all device memory the call
    uses; None on the CPU (nothing to allocate) or when the op needs none. The size is queried
    once per (op, rows, cols, dtype, reduction). The caller passes it and drops it after the
    launch: the launch is on ``torch.cuda.current_stream()``, the stream the block was allocated
    on, so its stream-ordered reuse is safe without ``record_stream``; under
    ``torch.cuda.graph`` it comes from the graph's private pool."""
    if not ref.is_cuda:
        return None
    key = (code, o[0], o[1], _DT[ref.dtype], o[17])
    n = _WS_SIZES.get(key)
    if n is None:
        n = _WS_SIZES[key] = L.workspace_size(code, o[0], o[1], key[3], o[17])
    return torch.empty(n, dtype=torch.uint8, device=ref.device) if n else None


def _empty0(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# cross_entropy


_lib.define(
    "cross_entropy(Tensor logits, Tensor target, float label_smoothing, int ignore_index, "
    "float z_loss, int reduction, int math=0) -> Tensor"
)
_lib.define(
    "cross_entropy_backward(Tensor logits, Tensor target, Tensor upstream, "
    "float label_smoothing, int ignore_index, float z_loss, int math=0) -> Tensor"
)


def _xe_opts(op, logits, target, label_smoothing, ignore_index, z_loss, reduction, math):
    _check(op, "logits", logits)
    _check(op, "target", target, logits, dtypes=(torch.int32, torch.int64))
    if logits.dim() == 0:
        raise ValueError(f"fusedreg.{op}: `logits` is a scalar; expected [..., vocab]")
    rows, vocab = _rows_cols(op, logits)
    if target.numel() != rows:
        raise ValueError(
            f"fusedreg.{op}: `target` has {target.numel()} elements, `logits` {rows} rows "
            f"(shape {tuple(logits.shape)})"
        )
    return (rows, vocab, 0.0, 0, 0, _BITS0, math, 0.0, 0, 1, _ACT0, _NORM0, _EPS0, _LS0,
            label_smoothing, z_loss, ignore_index, reduction)


def _xe_loss_shape(logits: Tensor, reduction: int):
    return logits.shape[:-1] if reduction == 0 else ()


@torch.library.impl(_lib, "cross_entropy", "CPU")
@torch.library.impl(_lib, "cross_entropy", "CUDA")
def _xe(logits, target, label_smoothing, ignore_index, z_loss, reduction, math=0):
    o = _xe_opts("cross_entropy", logits, target, label_smoothing, ignore_index, z_loss, reduction,
                 math)
    loss = logits.new_empty(_xe_loss_shape(logits, reduction), dtype=torch.float32)
    ws = _workspace(L.OP_CROSS_ENTROPY, o, logits)
    _run(L.lib.fr_cross_entropy_forward, o, logits, logits, target, loss, None, ws)
    return loss


@torch.library.register_fake("fusedreg::cross_entropy", lib=_lib)
def _xe_fake(logits, target, label_smoothing, ignore_index, z_loss, reduction, math=0):
    return logits.new_empty(_xe_loss_shape(logits, reduction), dtype=torch.float32)


@torch.library.impl(_lib, "cross_entropy_backward", "CPU")
@torch.library.impl(_lib, "cross_entropy_backward", "CUDA")
def _xe_bwd(logits, target, upstream, label_smoothing, ignore_index, z_loss, math=0):
    op = "cross_entropy_backward"
    o = _xe_opts(op, logits, target, label_smoothing, ignore_index, z_loss, 0, math)
    _check(op, "upstream", upstream, logits, dtypes=(torch.float32,), numel=o[0])
    grad = torch.empty_like(logits)
    ws = _workspace(L.OP_CROSS_ENTROPY, o, logits)  # also holds the loss the C side drops
    _run(L.lib.fr_cross_entropy_backward, o, logits, logits, target, upstream, grad, None, None,
         ws)
    return grad


@torch.library.register_fake("fusedreg::cross_entropy_backward", lib=_lib)
def _xe_bwd_fake(logits, target, upstream, label_smoothing, ignore_index, z_loss, math=0):
    return torch.empty_like(logits)


def _xe_setup(ctx, inputs, output):
    logits, target, ls, ii, zl, red, math = inputs
    ctx.save_for_backward(logits, target)
    ctx.args = (ls, ii, zl, red, math)


def _xe_grad(ctx, grad):
    logits, target = ctx.saved_tensors
    ls, ii, zl, red, math = ctx.args
    rows = target.numel()
    g = grad.float()
    # The upstream gradient folded into the per-row scale: one fused pass, no logits-sized
    # multiply afterwards (reduction none on the C side).
    if red == 0:
        up = g.reshape(rows).contiguous()
    elif red == 1:
        up = g.reshape(1).expand(rows).contiguous()
    else:
        n_valid = (target != ii).sum().clamp(min=1).float()
        up = (g.reshape(1) * (1.0 / n_valid)).expand(rows).contiguous()
    d = torch.ops.fusedreg.cross_entropy_backward(logits, target, up, ls, ii, zl, math)
    return d, None, None, None, None, None, None


torch.library.register_autograd(
    "fusedreg::cross_entropy", _xe_grad, setup_context=_xe_setup, lib=_lib)


# ---------------------------------------------------------------------------------------------
# bias_act_dropout


_lib.define(
    "bias_act_dropout(Tensor x, Tensor? bias, Tensor keys, int site, int act, float p, "
    "int math=0, int mask_bits=32) -> Tensor"
)
_lib.define(
    "bias_act_dropout_backward(Tensor dy, Tensor x, Tensor? bias, Tensor keys, int site, "
    "int act, float p, int math=0, int mask_bits=32) -> (Tensor, Tensor)"
)


def _bad_opts(op, x, bias, keys, site, act, p, math, mask_bits):
    _check(op, "x", x)
    rows, cols = _rows_cols(op, x)
    _check(op, "bias", bias, x, dtypes=(x.dtype,), numel=cols)
    seed, call, path_call = _key_fields(op, keys, site)
    return (rows, cols, p, seed, call, mask_bits, math, 0.0, path_call, 1, act, _NORM0, _EPS0,
            _LS0, 0.0, 0.0, _II0, _RED0)


@torch.library.impl(_lib, "bias_act_dropout", "CPU")
@torch.library.impl(_lib, "bias_act_dropout", "CUDA")
def _bad(x, bias, keys, site, act, p, math=0, mask_bits=32):
    o = _bad_opts("bias_act_dropout", x, bias, keys, site, act, p, math, mask_bits)
    y = torch.empty_like(x)
    _run(L.lib.fr_bias_act_dropout_forward, o, x, x, bias, y, None)
    return y


@torch.library.register_fake("fusedreg::bias_act_dropout", lib=_lib)
def _bad_fake(x, bias, keys, site, act, p, math=0, mask_bits=32):
    return torch.empty_like(x)


@torch.library.impl(_lib, "bias_act_dropout_backward", "CPU")
@torch.library.impl(_lib, "bias_act_dropout_backward", "CUDA")
def _bad_bwd(dy, x, bias, keys, site, act, p, math=0, mask_bits=32):
    op = "bias_act_dropout_backward"
    o = _bad_opts(op, x, bias, keys, site, act, p, math, mask_bits)
    _check(op, "dy", dy, x, dtypes=(x.dtype,), numel=x.numel())
    dx = torch.empty_like(x)
    dbias = torch.empty_like(bias) if bias is not None else _empty0(x)
    ws = _workspace(L.OP_BIAS_ACT_DROPOUT_BACKWARD, o, x) if bias is not None else None
    _run(L.lib.fr_bias_act_dropout_backward, o, x, dy, x, bias, None, dx,
         dbias if bias is not None else None, ws)
    return dx, dbias


@torch.library.register_fake("fusedreg::bias_act_dropout_backward", lib=_lib)
def _bad_bwd_fake(dy, x, bias, keys, site, act, p, math=0, mask_bits=32):
    return torch.empty_like(x), (torch.empty_like(bias) if bias is not None else _empty0(x))


def _bad_setup(ctx, inputs, output):
    x, bias, keys, site, act, p, math, mask_bits = inputs
    ctx.save_for_backward(x, bias, keys)
    ctx.args = (site, act, p, math, mask_bits)


def _bad_grad(ctx, dy):
    x, bias, keys = ctx.saved_tensors
    dx, dbias = torch.ops.fusedreg.bias_act_dropout_backward(
        dy.contiguous(), x, bias, keys, *ctx.args)
    return dx, (dbias if bias is not None else None), None, None, None, None, None, None


torch.library.register_autograd(
    "fusedreg::bias_act_dropout", _bad_grad, setup_context=_bad_setup, lib=_lib)


# ---------------------------------------------------------------------------------------------
# dropout (plain, or with a residual)


_DROP_ARGS = (
    "(Tensor x, Tensor? bias, Tensor? residual, Tensor keys, int site, float p, "
    "float path_p, int rows_per_sample, int mask_bits)"
)
_lib.define("dropout" + _DROP_ARGS + " -> Tensor")
# The residual form that also returns this call's Block Influence words (int64 [3]: cos_sum,
# rows, nonfinite of cos(residual, y) per row) for the caller to add to its meter: the final add
# of a block. A separate functional op, as dropout_add_norm_measured (autograd needs one).
_lib.define("dropout_measured" + _DROP_ARGS + " -> (Tensor, Tensor)")
_lib.define(
    "dropout_backward(Tensor dy, Tensor keys, int site, float p, float path_p, "
    "int rows_per_sample, int mask_bits, bool want_dbias) -> (Tensor, Tensor)"
)


def _drop_opts(op, x, keys, site, p, path_p, rows_per_sample, mask_bits):
    rows, cols = _rows_cols(op, x)
    seed, call, path_call = _key_fields(op, keys, site)
    return (rows, cols, p, seed, call, mask_bits, _MATH0, path_p, path_call, rows_per_sample,
            _ACT0, _NORM0, _EPS0, _LS0, 0.0, 0.0, _II0, _RED0)


def _drop_run(op, x, bias, residual, keys, site, p, path_p, rows_per_sample, mask_bits, stats):
    _check(op, "x", x)
    o = _drop_opts(op, x, keys, site, p, path_p, rows_per_sample, mask_bits)
    _check(op, "bias", bias, x, dtypes=(x.dtype,), numel=o[1])
    _check(op, "residual", residual, x, dtypes=(x.dtype,), numel=x.numel())
    y = torch.empty_like(x)
    _run(L.lib.fr_dropout_forward, o, x, x, bias, residual, None, y, None, stats)
    return y


@torch.library.impl(_lib, "dropout", "CPU")
@torch.library.impl(_lib, "dropout", "CUDA")
def _drop(x, bias, residual, keys, site, p, path_p, rows_per_sample, mask_bits):
    return _drop_run("dropout", x, bias, residual, keys, site, p, path_p, rows_per_sample,
                     mask_bits, None)


@torch.library.impl(_lib, "dropout_measured", "CPU")
@torch.library.impl(_lib, "dropout_measured", "CUDA")
def _drop_measured(x, bias, residual, keys, site, p, path_p, rows_per_sample, mask_bits):
    stats = torch.zeros((3,), dtype=torch.int64, device=x.device)
    y = _drop_run("dropout_measured", x, bias, residual, keys, site, p, path_p, rows_per_sample,
                  mask_bits, stats)
    return y, stats


@torch.library.register_fake("fusedreg::dropout", lib=_lib)
def _drop_fake(x, bias, residual, keys, site, p, path_p, rows_per_sample, mask_bits):
    return torch.empty_like(x)


@torch.library.register_fake("fusedreg::dropout_measured", lib=_lib)
def _drop_measured_fake(x, bias, residual, keys, site, p, path_p, rows_per_sample, mask_bits):
    return torch.empty_like(x), x.new_empty((3,), dtype=torch.int64)


@torch.library.impl(_lib, "dropout_backward", "CPU")
@torch.library.impl(_lib, "dropout_backward", "CUDA")
def _drop_bwd(dy, keys, site, p, path_p, rows_per_sample, mask_bits, want_dbias):
    op = "dropout_backward"
    _check(op, "dy", dy)
    o = _drop_opts(op, dy, keys, site, p, path_p, rows_per_sample, mask_bits)
    dx = torch.empty_like(dy)
    dbias = dy.new_empty((o[1],)) if want_dbias else _empty0(dy)
    ws = _workspace(L.OP_DROPOUT_BACKWARD, o, dy) if want_dbias else None
    _run(L.lib.fr_dropout_backward, o, dy, dy, None, dx, dbias if want_dbias else None, ws)
    return dx, dbias


@torch.library.register_fake("fusedreg::dropout_backward", lib=_lib)
def _drop_bwd_fake(dy, keys, site, p, path_p, rows_per_sample, mask_bits, want_dbias):
    return torch.empty_like(dy), (dy.new_empty((dy.shape[-1],)) if want_dbias else _empty0(dy))


def _drop_setup(ctx, inputs, output):
    x, bias, residual, keys, site, p, path_p, rps, bits = inputs
    ctx.save_for_backward(keys)
    ctx.args = (site, p, path_p, rps, bits)
    ctx.has = (bias is not None, residual is not None)
    if isinstance(output, (tuple, list)):  # dropout_measured: the words have no gradient
        ctx.mark_non_differentiable(output[1])


def _drop_grad(ctx, dy, *_d_words):
    (keys,) = ctx.saved_tensors
    has_bias, has_residual = ctx.has
    dx, dbias = torch.ops.fusedreg.dropout_backward(
        dy.contiguous(), keys, *ctx.args, has_bias)
    # d(residual) = dy: nothing to compute.
    return (dx, dbias if has_bias else None, dy if has_residual else None,
            None, None, None, None, None, None)


for _name in ("fusedreg::dropout", "fusedreg::dropout_measured"):
    torch.library.register_autograd(_name, _drop_grad, setup_context=_drop_setup, lib=_lib)


_lib.define(
    "dropout_add_(Tensor(a!) residual, Tensor x, Tensor? bias, Tensor keys, int site, float p, "
    "float path_p, int rows_per_sample, int mask_bits=32, Tensor(b!)? stats=None) -> ()"
)


@torch.library.impl(_lib, "dropout_add_", "CPU")
@torch.library.impl(_lib, "dropout_add_", "CUDA")
def _drop_add_(residual, x, bias, keys, site, p, path_p, rows_per_sample, mask_bits=32,
               stats=None):
    """`residual += rowscale · dropout(x + bias)` in place (the residual-stream update of an
    inference or no-grad step; no autograd). Declared `(a!)`, and the version counter is bumped
    here: ops defined through torch.library do not get that from PyTorch (Liger-Kernel #272).
    `stats` (a meter site's int64 [3] words, also written in place, `(b!)`): this call's Block
    Influence rows, `cos(residual before, residual after)`, are added to it by the kernel."""
    op = "dropout_add_"
    _check(op, "x", x)
    o = _drop_opts(op, x, keys, site, p, path_p, rows_per_sample, mask_bits)
    _check(op, "bias", bias, x, dtypes=(x.dtype,), numel=o[1])
    _check(op, "residual", residual, x, dtypes=(x.dtype,), numel=x.numel())
    _check(op, "stats", stats, x, dtypes=(torch.int64,), numel=3)
    _run(L.lib.fr_dropout_forward, o, x, x, bias, residual, None, residual, None, stats)
    torch.autograd.graph.increment_version(residual)
    if stats is not None:
        torch.autograd.graph.increment_version(stats)


@torch.library.register_fake("fusedreg::dropout_add_", lib=_lib)
def _drop_add_fake(residual, x, bias, keys, site, p, path_p, rows_per_sample, mask_bits=32,
                   stats=None):
    return None


# ---------------------------------------------------------------------------------------------
# dropout_add_norm


_DAN_ARGS = (
    "(Tensor x, Tensor? residual, Tensor? bias, Tensor gamma, Tensor? beta, "
    "Tensor keys, int site, int norm, float eps, float layer_scale, float p, float path_p, "
    "int rows_per_sample, bool stream_f32, int mask_bits=32)"
)
_lib.define("dropout_add_norm" + _DAN_ARGS + " -> (Tensor, Tensor, Tensor, Tensor)")
# The same op that also returns this call's Block Influence words (int64 [3]: cos_sum, rows,
# nonfinite), which the caller adds to its meter: a functional op (autograd formulas need one),
# kept apart so the unmeasured call allocates nothing more.
_lib.define("dropout_add_norm_measured" + _DAN_ARGS + " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define(
    "dropout_add_norm_backward(Tensor d_out, Tensor? d_s, Tensor s, Tensor gamma, Tensor mean, "
    "Tensor rstd, Tensor keys, int site, int norm, float eps, float layer_scale, float p, "
    "float path_p, int rows_per_sample, bool want_residual, bool want_beta, bool want_bias, "
    "int mask_bits=32) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _dan_opts(op, x, keys, site, norm, eps, layer_scale, p, path_p, rows_per_sample, mask_bits):
    rows, cols = _rows_cols(op, x)
    seed, call, path_call = _key_fields(op, keys, site)
    return (rows, cols, p, seed, call, mask_bits, _MATH0, path_p, path_call, rows_per_sample, _ACT0,
            norm, eps, layer_scale, 0.0, 0.0, _II0, _RED0)


def _dan_shapes(x, stream_f32):
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    sd = torch.float32 if stream_f32 else x.dtype
    return rows, sd


def _dan_run(op, x, residual, bias, gamma, beta, keys, site, norm, eps, layer_scale, p, path_p,
             rows_per_sample, stream_f32, mask_bits, stats):
    _check(op, "x", x)
    o = _dan_opts(op, x, keys, site, norm, eps, layer_scale, p, path_p, rows_per_sample, mask_bits)
    rows, sd = _dan_shapes(x, stream_f32)
    _check(op, "residual", residual, x, dtypes=(sd,), numel=x.numel())
    for name, t in (("bias", bias), ("gamma", gamma), ("beta", beta)):
        _check(op, name, t, x, dtypes=(x.dtype,), numel=o[1])
    out = torch.empty_like(x)
    s = torch.empty_like(x, dtype=sd)
    mean = x.new_empty((rows,), dtype=torch.float32)
    rstd = x.new_empty((rows,), dtype=torch.float32)
    _run(L.lib.fr_dropout_add_norm_forward, o, x, x, residual, gamma, beta, bias, None,
         out, s, mean, rstd, stats)
    return out, s, mean, rstd


@torch.library.impl(_lib, "dropout_add_norm", "CPU")
@torch.library.impl(_lib, "dropout_add_norm", "CUDA")
def _dan(*args):
    return _dan_run("dropout_add_norm", *_dan_defaults(args), None)


@torch.library.impl(_lib, "dropout_add_norm_measured", "CPU")
@torch.library.impl(_lib, "dropout_add_norm_measured", "CUDA")
def _dan_measured(*args):
    stats = torch.zeros((3,), dtype=torch.int64, device=args[0].device)
    return _dan_run("dropout_add_norm_measured", *_dan_defaults(args), stats) + (stats,)


def _dan_defaults(args):
    return args if len(args) == 15 else args + (32,)


@torch.library.register_fake("fusedreg::dropout_add_norm", lib=_lib)
def _dan_fake(x, residual, bias, gamma, beta, keys, site, norm, eps, layer_scale, p, path_p,
              rows_per_sample, stream_f32, mask_bits=32):
    sd = torch.float32 if stream_f32 else x.dtype
    rows = x.numel() // x.shape[-1]
    return (torch.empty_like(x), torch.empty_like(x, dtype=sd),
            x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32))


@torch.library.register_fake("fusedreg::dropout_add_norm_measured", lib=_lib)
def _dan_measured_fake(*args):
    x = args[0]
    return _dan_fake(*args) + (x.new_empty((3,), dtype=torch.int64),)


@torch.library.impl(_lib, "dropout_add_norm_backward", "CPU")
@torch.library.impl(_lib, "dropout_add_norm_backward", "CUDA")
def _dan_bwd(d_out, d_s, s, gamma, mean, rstd, keys, site, norm, eps, layer_scale, p, path_p,
             rows_per_sample, want_residual, want_beta, want_bias, mask_bits=32):
    op = "dropout_add_norm_backward"
    _check(op, "d_out", d_out)
    o = _dan_opts(op, d_out, keys, site, norm, eps, layer_scale, p, path_p, rows_per_sample,
                  mask_bits)
    _check(op, "s", s, d_out, dtypes=(d_out.dtype, torch.float32), numel=d_out.numel())
    _check(op, "d_s", d_s, d_out, dtypes=(s.dtype,), numel=d_out.numel())
    _check(op, "gamma", gamma, d_out, dtypes=(d_out.dtype,), numel=o[1])
    for name, t in (("mean", mean), ("rstd", rstd)):
        _check(op, name, t, d_out, dtypes=(torch.float32,), numel=o[0])
    dx = torch.empty_like(d_out)
    d_res = torch.empty_like(s) if want_residual else _empty0(s)
    dgamma = torch.empty_like(gamma)
    dbeta = torch.empty_like(gamma) if want_beta else _empty0(gamma)
    dbias = torch.empty_like(gamma) if want_bias else _empty0(gamma)
    ws = _workspace(L.OP_DROPOUT_ADD_NORM_BACKWARD, o, d_out)
    _run(L.lib.fr_dropout_add_norm_backward, o, d_out, d_out, d_s, s, gamma, mean, rstd, None,
         dx, d_res if want_residual else None, dgamma, dbeta if want_beta else None,
         dbias if want_bias else None, ws)
    return dx, d_res, dgamma, dbeta, dbias


@torch.library.register_fake("fusedreg::dropout_add_norm_backward", lib=_lib)
def _dan_bwd_fake(d_out, d_s, s, gamma, mean, rstd, keys, site, norm, eps, layer_scale, p,
                  path_p, rows_per_sample, want_residual, want_beta, want_bias, mask_bits=32):
    e = lambda t, want: torch.empty_like(t) if want else _empty0(t)  # noqa: E731
    return (torch.empty_like(d_out), e(s, want_residual), torch.empty_like(gamma),
            e(gamma, want_beta), e(gamma, want_bias))


def _dan_setup(ctx, inputs, output):
    x, residual, bias, gamma, beta, keys, site, norm, eps, ls, p, path_p, rps, sf32, bits = inputs
    out, s, mean, rstd = output[:4]
    ctx.save_for_backward(s, gamma, mean, rstd, keys)
    ctx.args = (site, norm, eps, ls, p, path_p, rps)
    ctx.has = (residual is not None, beta is not None, bias is not None)
    ctx.bits = bits
    ctx.mark_non_differentiable(mean, rstd, *output[4:])


def _dan_grad(ctx, d_out, d_s, _d_mean, _d_rstd, *_d_words):
    s, gamma, mean, rstd, keys = ctx.saved_tensors
    has_res, has_beta, has_bias = ctx.has
    if d_out is None:
        d_out = torch.zeros(s.shape, dtype=gamma.dtype, device=s.device)
    dx, d_res, dgamma, dbeta, dbias = torch.ops.fusedreg.dropout_add_norm_backward(
        d_out.contiguous(), None if d_s is None else d_s.contiguous(), s, gamma, mean, rstd,
        keys, *ctx.args, has_res, has_beta, has_bias, ctx.bits)
    return (dx, d_res if has_res else None, dbias if has_bias else None, dgamma,
            dbeta if has_beta else None) + (None,) * 10


for _name in ("fusedreg::dropout_add_norm", "fusedreg::dropout_add_norm_measured"):
    torch.library.register_autograd(_name, _dan_grad, setup_context=_dan_setup, lib=_lib)


__all__ = []
