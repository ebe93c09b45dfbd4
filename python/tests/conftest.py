"""Shared fixtures: seeds, and the GPU gate (FUSEDREG_REQUIRE_GPU=1 turns a missing GPU into a
failure instead of a skip, as on the GPU machines)."""

import os

import pytest
import torch

import fusedreg


def gpu_reason():
    """Why the GPU tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    if not fusedreg.kernels_built():
        return "libfusedreg_ffi was built without nvcc (no kernels)"
    return None


@pytest.fixture
def cuda():
    reason = gpu_reason()
    if reason is not None:
        if os.environ.get("FUSEDREG_REQUIRE_GPU") == "1":
            pytest.fail(f"FUSEDREG_REQUIRE_GPU=1 but {reason}")
        pytest.skip(f"GPU test: {reason}")
    return torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
