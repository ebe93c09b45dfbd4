"""Builds the C ABI (the workspace member ``ffi/``, a cdylib) with cargo and ships
``libfusedreg_ffi.so`` inside the ``fusedreg`` package, loaded at import through ctypes.

Environment: ``FUSEDREG_CARGO_PROFILE`` (default ``release``; ``dev`` for a quick debug build),
``CARGO_TARGET_DIR`` (where cargo builds), and whatever the library's build reads (``NVCC``,
``CUDA_HOME``, ``FUSEDREG_REQUIRE_KERNELS``: without nvcc the kernels are left out and CUDA
tensors raise a clear error; CPU tensors always work).
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent.parent


class BuildWithCargo(build_py):
    def run(self):
        super().run()
        profile = os.environ.get("FUSEDREG_CARGO_PROFILE", "release")
        cmd = ["cargo", "build", "-p", "fusedreg-ffi", "--lib", "--profile", profile]
        print("fusedreg: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
        if not target.is_absolute():
            target = ROOT / target
        built = target / ("debug" if profile == "dev" else profile) / "libfusedreg_ffi.so"
        dest = Path(self.build_lib) / "fusedreg"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, dest / "libfusedreg_ffi.so")


class BinaryDistribution(Distribution):
    """The wheel holds a native library: tag it for the platform."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithCargo}, distclass=BinaryDistribution)
