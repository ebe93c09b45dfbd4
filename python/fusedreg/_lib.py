"""The C ABI of fusedreg (ffi/include/fusedreg.h) through ctypes.

One shared library, ``libfusedreg_ffi.so``, built from the workspace member ``ffi/`` by
``pip install`` (see ``setup.py``). ``FUSEDREG_LIB=/path/to/libfusedreg_ffi.so`` overrides where it
is loaded from (for a development build: ``cargo build -p fusedreg-ffi``).

Nothing here knows torch: tensors cross as (pointer, length, dtype) descriptors.
"""

from __future__ import annotations

import ctypes as C
import os
from pathlib import Path

ABI_VERSION = 4

# Status codes (FR_OK, FR_ERR_*).
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_SHAPE = 2
ERR_NO_DRIVER = 3
ERR_NO_DEVICE = 4
ERR_KERNELS_NOT_BUILT = 5
ERR_CUDA = 6
ERR_PANIC = 7
ERR_HOST_ALLOC = 8

# Dtype codes.
F32, F16, BF16, I32, I64, U8 = 0, 1, 2, 3, 4, 5

# Ops of fr_workspace_size (FR_OP_*): the ones with device scratch.
OP_DROPOUT_BACKWARD = 1
OP_BIAS_ACT_DROPOUT_BACKWARD = 2
OP_DROPOUT_ADD_NORM_BACKWARD = 3
OP_CROSS_ENTROPY = 4

ACT = {"gelu": 0, "gelu_erf": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}
NORM = {"layer": 0, "layernorm": 0, "rms": 1, "rmsnorm": 1}
REDUCTION = {"none": 0, "sum": 1, "mean": 2}
# Math modes (FR_MATH_*): None is the op's own default (the library's: Fast for cross_entropy and
# for bias_act_dropout with GELU or SiLU, Exact for ReLU).
MATH = {None: 0, "default": 0, "exact": 1, "fast": 2}


def math_code(op: str, math) -> int:
    """The FR_MATH_* code of a ``math=`` argument, or a ValueError naming the choices."""
    try:
        return MATH[math]
    except (KeyError, TypeError):
        raise ValueError(
            f"fusedreg.{op}: math = {math!r}; use None (the op's default), 'fast' or 'exact'"
        ) from None


class FusedRegError(RuntimeError):
    """A fusedreg call failed; the message is the library's (what was wrong, what to do)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Tensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("len", C.c_int64), ("dtype", C.c_int32)]


class Exec(C.Structure):
    _fields_ = [("device", C.c_int32), ("stream", C.c_void_p)]


class Options(C.Structure):
    _fields_ = [
        ("rows", C.c_int64),
        ("cols", C.c_int64),
        ("p", C.c_double),
        ("seed", C.c_uint64),
        ("call", C.c_uint64),
        ("mask_bits", C.c_uint32),
        ("math", C.c_uint32),
        ("path_p", C.c_double),
        ("path_call", C.c_uint64),
        ("rows_per_sample", C.c_int64),
        ("activation", C.c_uint32),
        ("norm", C.c_uint32),
        ("eps", C.c_float),
        ("layer_scale", C.c_float),
        ("label_smoothing", C.c_double),
        ("z_loss", C.c_double),
        ("ignore_index", C.c_int64),
        ("reduction", C.c_uint32),
    ]


class AdamWOptions(C.Structure):
    _fields_ = [
        ("lr", C.c_float),
        ("beta1", C.c_float),
        ("beta2", C.c_float),
        ("eps", C.c_float),
        ("max_grad_norm", C.c_float),
        ("bf16_moments", C.c_uint32),
        ("master_weights", C.c_uint32),
        ("stochastic_rounding", C.c_uint32),
        ("rounding_seed", C.c_uint64),
    ]


# Tensor descriptors cross as addresses (c_void_p: ctypes passes a Python int without building
# an object per argument; ops.py packs the descriptors into a per-thread buffer).
TP = C.c_void_p
OP = C.c_void_p

# name -> argument types (after the options pointer and the exec struct for op entry points).
# The last argument of the ops with device scratch is their workspace (null: none).
_OPS = {
    "fr_cross_entropy_forward": [TP] * 5,
    "fr_cross_entropy_backward": [TP] * 7,
    "fr_bias_act_dropout_forward": [TP] * 4,
    "fr_bias_act_dropout_backward": [TP] * 7,
    "fr_dropout_forward": [TP] * 7,
    "fr_dropout_backward": [TP] * 5,
    "fr_dropout_add_norm_forward": [TP] * 11,
    "fr_dropout_add_norm_backward": [TP] * 13,
}


def _candidates() -> list[Path]:
    env = os.environ.get("FUSEDREG_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    out = [here / "libfusedreg_ffi.so"]
    # Imported from the source tree (python/fusedreg) instead of an installed copy: a cargo build
    # of the repository (CARGO_TARGET_DIR or target/, release before debug).
    root = here.parent.parent
    targets = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    for t in targets + [root / "target"]:
        out += [t / "release" / "libfusedreg_ffi.so", t / "debug" / "libfusedreg_ffi.so"]
    return out


def _load() -> C.CDLL:
    errors = []
    for path in _candidates():
        if path.exists():
            lib = C.CDLL(str(path))
            break
        errors.append(str(path))
    else:
        raise ImportError(
            "fusedreg: libfusedreg_ffi.so not found (looked at: " + ", ".join(errors) + "). "
            "Install the package with `pip install ./python` from the repository root, or build "
            "it with `cargo build -p fusedreg-ffi` and set FUSEDREG_LIB to target/debug/libfusedreg_ffi.so"
        )
    lib.fr_last_error.restype = C.c_char_p
    lib.fr_last_error.argtypes = []
    lib.fr_abi_version.restype = C.c_uint32
    lib.fr_kernels_built.restype = C.c_int32
    lib.fr_driver_present.restype = C.c_int32
    lib.fr_options_default.restype = Options
    lib.fr_adamw_options_default.restype = AdamWOptions
    for name, args in _OPS.items():
        f = getattr(lib, name)
        f.restype = C.c_int32
        f.argtypes = [OP, Exec] + args
    lib.fr_workspace_size.restype = C.c_int32
    lib.fr_workspace_size.argtypes = [C.c_uint32, OP, C.c_int32, C.POINTER(C.c_int64)]
    lib.fr_adamw_create.restype = C.c_int32
    tensors = C.POINTER(Tensor)
    lib.fr_adamw_create.argtypes = [
        C.POINTER(AdamWOptions), Exec, tensors, tensors, C.POINTER(C.c_float), C.c_int64,
        C.POINTER(C.c_void_p)
    ]
    lib.fr_adamw_step.restype = C.c_int32
    lib.fr_adamw_step.argtypes = [C.c_void_p, tensors, C.POINTER(C.c_uint8), C.c_int64, C.c_float]
    lib.fr_adamw_state_size.restype = C.c_int32
    lib.fr_adamw_state_size.argtypes = [C.c_void_p, C.POINTER(C.c_int64)]
    lib.fr_adamw_save_state.restype = C.c_int32
    lib.fr_adamw_save_state.argtypes = [C.c_void_p, C.c_void_p, C.c_int64]
    lib.fr_adamw_restore_state.restype = C.c_int32
    lib.fr_adamw_restore_state.argtypes = [C.c_void_p, C.c_void_p, C.c_int64]
    lib.fr_adamw_destroy.restype = C.c_int32
    lib.fr_adamw_destroy.argtypes = [C.c_void_p]
    lib.fr_stochastic_depth_plan.restype = C.c_int32
    lib.fr_stochastic_depth_plan.argtypes = [
        C.c_uint32, C.c_double, C.POINTER(C.c_double), C.c_int64, C.c_uint64, C.c_uint64,
        C.c_uint32, C.POINTER(C.c_uint8), C.POINTER(C.c_float), C.POINTER(C.c_double),
        C.POINTER(C.c_uint64),
    ]
    got = lib.fr_abi_version()
    if got != ABI_VERSION:
        raise ImportError(
            f"fusedreg: the loaded library has ABI version {got}, this package expects "
            f"{ABI_VERSION}: rebuild it (`pip install ./python` again)"
        )
    return lib


lib = _load()


def check(status: int) -> None:
    """Raises the library's error for a nonzero status."""
    if status != OK:
        msg = lib.fr_last_error().decode("utf-8", "replace")
        if status in (ERR_INVALID_ARGUMENT, ERR_SHAPE):
            raise ValueError(msg)
        if status == ERR_HOST_ALLOC:
            raise MemoryError(msg)
        raise FusedRegError(status, msg)


_DEFAULT_OPTIONS = None


def default_options() -> Options:
    """A fresh copy of ``fr_options_default()`` (asked once, then copied: cheaper per call)."""
    global _DEFAULT_OPTIONS
    if _DEFAULT_OPTIONS is None:
        _DEFAULT_OPTIONS = bytes(lib.fr_options_default())
    return Options.from_buffer_copy(_DEFAULT_OPTIONS)


def kernels_built() -> bool:
    return bool(lib.fr_kernels_built())


def driver_present() -> bool:
    return bool(lib.fr_driver_present())


def workspace_size(op: int, rows: int, cols: int, dtype: int, reduction: int = 2) -> int:
    """Bytes of device workspace ``op`` (an ``OP_*`` code) needs for a ``[rows, cols]`` call of
    element ``dtype`` (a dtype code; cross-entropy: its ``reduction`` code): a function of those
    alone (``fr_workspace_size``). 0: the op needs none. The dropping backwards' size is with
    dbias (without, they need none). Bad arguments raise ``ValueError`` with the message.

    >>> workspace_size(OP_DROPOUT_ADD_NORM_BACKWARD, 4096, 768, F32)  # 12 B x 768 x 1024 slabs
    9437184
    """
    o = default_options()
    o.rows, o.cols, o.reduction = rows, cols, reduction
    n = C.c_int64(-1)
    check(lib.fr_workspace_size(op, C.addressof(o), dtype, C.byref(n)))
    return n.value
