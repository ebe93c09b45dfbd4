"""Caller-supplied workspaces: the size query from Python (shape arithmetic), a bad workspace
through the ctypes layer (the CPU ops pass none), CPU calls allocating none, and on a GPU the
ops running with workspaces from PyTorch's caching allocator."""

import math

import pytest
import torch

import fusedreg
from fusedreg import _lib as L
from fusedreg import functional as F
from fusedreg import ops


def _slab_rows(rows, cols, elem_bytes):
    """The dbias slab partition (fusedreg::dropping::slab_rows), for the arithmetic check."""
    if rows <= 1:
        return 1
    groups = max(1, -(-cols // (16 // elem_bytes)))
    s = min(max(rows * groups // (1 << 17), 16), 64, rows)
    return max(s, -(-rows // 65535))


def _scratch_len(rows, chunk):
    total, n = rows, rows
    while n > chunk:
        n = -(-n // chunk)
        total += n
    return total


@pytest.mark.parametrize("rows,cols", [(1, 1), (37, 19), (1000, 1024), (4096, 4095), (70000, 8)])
@pytest.mark.parametrize("dtype,size", [(L.F32, 4), (L.F16, 2), (L.BF16, 2)])
def test_dropping_sizes_are_shape_arithmetic(rows, cols, dtype, size):
    slabs = -(-rows // _slab_rows(rows, cols, size))
    want = 4 * cols * slabs
    assert L.workspace_size(L.OP_DROPOUT_BACKWARD, rows, cols, dtype) == want
    assert L.workspace_size(L.OP_BIAS_ACT_DROPOUT_BACKWARD, rows, cols, dtype) == want


@pytest.mark.parametrize("rows,cols", [(1, 1), (1000, 768), (4096, 4096), (16385, 8)])
def test_dropout_add_norm_size_is_three_partial_arrays(rows, cols):
    slabs = -(-rows // -(-rows // 1024))
    assert L.workspace_size(L.OP_DROPOUT_ADD_NORM_BACKWARD, rows, cols, L.BF16) == 12 * cols * slabs


def test_cross_entropy_size_is_scratch_count_and_loss():
    red = L.REDUCTION
    # 3 rows, mean: 3 f32 -> 16 bytes, the u64 count -> 24, then the loss (one f32) at 32.
    assert L.workspace_size(L.OP_CROSS_ENTROPY, 3, 50257, L.F32, red["mean"]) == 36
    # reduction none: only the count (8 -> 16), then one loss per row.
    assert L.workspace_size(L.OP_CROSS_ENTROPY, 3, 50257, L.F32, red["none"]) == 16 + 12
    # Grows with the reduction levels, never with the vocabulary.
    rows = 1 << 20
    a = L.workspace_size(L.OP_CROSS_ENTROPY, rows, 10, L.F32, red["sum"])
    assert a == L.workspace_size(L.OP_CROSS_ENTROPY, rows, 128256, L.BF16, red["sum"])
    assert a >= 4 * rows + 8 + 4
    # An empty problem needs none.
    assert L.workspace_size(L.OP_CROSS_ENTROPY, 0, 10, L.F32, red["mean"]) == 0
    assert L.workspace_size(L.OP_DROPOUT_BACKWARD, 0, 10, L.F32) == 0


def test_bad_queries_raise_with_the_message():
    with pytest.raises(ValueError, match="FR_OP_DROPOUT_BACKWARD"):
        L.workspace_size(99, 4, 4, L.F32)
    with pytest.raises(ValueError, match="rows = -1"):
        L.workspace_size(L.OP_DROPOUT_BACKWARD, -1, 4, L.F32)
    with pytest.raises(ValueError, match="dtype"):
        L.workspace_size(L.OP_DROPOUT_BACKWARD, 4, 4, L.U8)


def _dropout_backward(ws):
    """fr_dropout_backward on CPU tensors through the ctypes layer, with workspace ``ws``."""
    dy = torch.randn(37, 19)
    o = ops._drop_opts("dropout_backward", dy, fusedreg.Keys(1, 0).tensor, 0, 0.25, 0.0, 1, 32)
    dx, dbias = torch.empty_like(dy), torch.empty(19)
    ops._run(L.lib.fr_dropout_backward, o, dy, dy, None, dx, dbias, ws)
    return dx, dbias


def test_bad_workspace_raises_with_the_message():
    n = L.workspace_size(L.OP_DROPOUT_BACKWARD, 37, 19, L.F32)
    assert n == 4 * 19 * 3  # 3 slabs of 16 rows
    # Exactly the queried size: accepted (and unused on the CPU), the same bits as without.
    torch.manual_seed(0)
    want = _dropout_backward(None)
    torch.manual_seed(0)
    got = _dropout_backward(torch.empty(n, dtype=torch.uint8))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match=rf"{n - 1} bytes, this call needs {n} \(fr_workspace_size\)"):
        _dropout_backward(torch.empty(n - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="dtype float32, expected uint8"):
        _dropout_backward(torch.empty(n, dtype=torch.float32))
    with pytest.raises(ValueError, match="16-byte aligned"):
        _dropout_backward(torch.empty(n + 16, dtype=torch.uint8)[8:])


def test_cpu_calls_allocate_no_workspace():
    ops._WS_SIZES.clear()
    x = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    F.dropout(x, 0.2, fusedreg.Keys(3, 1), 0, bias=b).sum().backward()
    logits = torch.randn(5, 11, requires_grad=True)
    F.cross_entropy(logits, torch.randint(0, 11, (5,))).backward()
    assert x.grad is not None and b.grad is not None and logits.grad is not None
    assert ops._WS_SIZES == {}, "a CPU call queried a workspace"
    assert ops._workspace(L.OP_DROPOUT_BACKWARD, (6, 8) + (0,) * 16, x) is None


def test_gpu_ops_take_their_workspace_from_torch(cuda):
    """On a GPU: each backward with scratch runs with a workspace from the caching allocator (the
    size cached per shape), and gives the same bits as the CPU reference where the op is exact."""
    ops._WS_SIZES.clear()
    x = torch.randn(300, 96, device=cuda, requires_grad=True)
    b = torch.randn(96, device=cuda, requires_grad=True)
    F.dropout(x, 0.2, fusedreg.Keys(3, 1), 0, bias=b).sum().backward()
    xc, bc = x.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
    F.dropout(xc, 0.2, fusedreg.Keys(3, 1), 0, bias=bc).sum().backward()
    assert torch.equal(b.grad.cpu(), bc.grad)
    logits = torch.randn(70, 33, device=cuda, requires_grad=True)
    F.cross_entropy(logits, torch.randint(0, 33, (70,), device=cuda)).backward()
    assert math.isfinite(float(logits.grad.sum()))
    codes = {k[0] for k in ops._WS_SIZES}
    assert {L.OP_DROPOUT_BACKWARD, L.OP_CROSS_ENTROPY} <= codes
