"""Bad input raises a Python exception carrying the library's message, never a crash."""

import pytest
import torch

import fusedreg
from fusedreg import functional as F


def k():
    return fusedreg.Keys(1, 0)


def test_wrong_dtype():
    with pytest.raises(ValueError, match="dtype"):
        F.dropout(torch.ones(4, 4, dtype=torch.int64), 0.1, k(), 0)
    with pytest.raises(ValueError, match="dtype"):
        F.dropout(torch.ones(4, 4), 0.1, k(), 0, bias=torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="target"):
        F.cross_entropy(torch.randn(3, 5), torch.zeros(3))


def test_wrong_shape():
    with pytest.raises(ValueError, match="bias"):
        F.bias_act_dropout(torch.randn(4, 8), 0.1, k(), 0, bias=torch.randn(7))
    with pytest.raises(ValueError, match="target"):
        F.cross_entropy(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="residual"):
        F.dropout(torch.randn(4, 8), 0.1, k(), 0, residual=torch.randn(4, 9))


def test_non_contiguous():
    x = torch.randn(8, 6).t()
    with pytest.raises(ValueError, match="not contiguous"):
        F.dropout(x, 0.1, k(), 0)
    with pytest.raises(ValueError, match="not contiguous"):
        F.cross_entropy(x, torch.zeros(6, dtype=torch.long))


def test_out_of_range_values_carry_the_library_message():
    with pytest.raises(ValueError, match=r"p = 1.5 must lie in \[0, 1\]"):
        F.dropout(torch.randn(2, 2), 1.5, k(), 0)
    with pytest.raises(ValueError, match="label_smoothing|smoothing|alpha"):
        F.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=2.0)
    with pytest.raises(ValueError, match="target"):
        F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 7]))  # 7 is outside [0, 3)
    with pytest.raises(ValueError, match="site"):
        F.dropout(torch.randn(2, 2), 0.1, k(), 1 << 24)
    with pytest.raises(ValueError, match="eps|norm"):
        fusedreg.nn.DropoutAddNorm(4, norm="batch")


def test_bad_keys():
    with pytest.raises(ValueError, match="keys"):
        F.dropout(torch.randn(2, 2), 0.1, torch.zeros(3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="step"):
        fusedreg.Keys(0, 2**32)


def test_the_c_boundary_reports_null_pointers():
    import ctypes as C
    from fusedreg import _lib as L

    o = L.default_options()
    st = L.lib.fr_dropout_forward(C.byref(o), L.Exec(-1, None), None, None, None, None, None,
                                  None, None)
    assert st == L.ERR_INVALID_ARGUMENT
    assert b"x" in L.lib.fr_last_error() and b"required" in L.lib.fr_last_error()


def test_cuda_without_kernels_or_device_is_a_clear_error():
    """A GPU call where no GPU or no kernels exist fails with the library's message."""
    import ctypes as C
    from fusedreg import _lib as L

    o = L.default_options()
    o.rows, o.cols = 1, 1
    t = L.Tensor(None, 0, L.F32)
    st = L.lib.fr_dropout_forward(C.byref(o), L.Exec(0, None), C.byref(t), None, None, None,
                                  C.byref(t), None, None)
    if torch.cuda.is_available() and fusedreg.kernels_built():
        assert st == L.OK
    else:
        assert st in (L.ERR_NO_DRIVER, L.ERR_NO_DEVICE, L.ERR_KERNELS_NOT_BUILT, L.ERR_CUDA)
        assert len(L.lib.fr_last_error()) > 20
