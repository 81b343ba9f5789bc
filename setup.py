"""Build script: the Python package (metadata in pyproject.toml) plus, when it can be built, the CUDA C++
extension ``perceiver_kernels._C`` from ``csrc/``.

It never fails for lack of CUDA: without a CUDA build of torch importable here, or without a CUDA
toolkit, it prints what it skipped and installs the package alone; the extension is then built on first
use (``perceiver_kernels/ops/cuda_extension.py``), or ``backend="cuda"`` reports why it is unavailable.
pip's default build isolation hides the installed torch from this script, so building at install time
takes ``pip install --no-build-isolation -e .``.

Environment:
    PERCEIVER_KERNELS_SKIP_CUDA_BUILD=1   do not build the extension.
    PERCEIVER_KERNELS_FORCE_CUDA_BUILD=1  build it or fail (CI, packaging).
    PERCEIVER_KERNELS_CUDA_ARCHS          default "8.0;9.0a" (sm_80 with PTX, sm_90a).
    MAX_JOBS                              parallel compile jobs.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
# The CUDA sources travel inside the package too (perceiver_kernels/csrc/ in the wheel), so that an
# installed wheel without a prebuilt extension can still build it on first use; csrc/ and CMakeLists.txt
# stay at the top level for C++ users (and in the sdist, MANIFEST.in).
SHIPPED_SOURCES = ("*.cpp", "*.cu", "*.cuh", "*.h")


class BuildPyWithSources(build_py):
    """``build_py`` that also copies ``csrc/`` into the built package (not used by editable installs,
    which read ``csrc/`` from the checkout)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "perceiver_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for pattern in SHIPPED_SOURCES:
            for path in sorted((ROOT / "csrc").glob(pattern)):
                shutil.copy2(path, target / path.name)


def _build_settings():
    """The extension module's build settings (shared with the JIT build), loaded without importing the package."""
    path = ROOT / "perceiver_kernels" / "ops" / "cuda_extension.py"
    spec = importlib.util.spec_from_file_location("_perceiver_kernels_cuda_extension", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension() -> dict:
    if os.environ.get("PERCEIVER_KERNELS_SKIP_CUDA_BUILD") == "1":
        print("perceiver-kernels: CUDA extension skipped (PERCEIVER_KERNELS_SKIP_CUDA_BUILD=1)")
        return {}
    settings = _build_settings()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable here (pip's build isolation? use --no-build-isolation)"
    else:
        cuda_home = settings.find_cuda_home()
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif cuda_home is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
        else:
            os.environ.setdefault("CUDA_HOME", cuda_home)
            import torch.utils.cpp_extension as cpp_extension

            cpp_extension.CUDA_HOME = cuda_home
            extension = CUDAExtension(
                "perceiver_kernels._C",
                sources=[f"csrc/{name}" for name in settings.SOURCES],
                depends=[f"csrc/{p.name}" for p in sorted((ROOT / "csrc").glob("*.*h"))],  # headers: rebuild on change
                include_dirs=[str(ROOT / "csrc"), *settings.include_dirs()],
                define_macros=[("PERCEIVER_KERNELS_PYTHON_MODULE", None)],
                extra_compile_args={"cxx": settings.COMMON_FLAGS, "nvcc": settings.CUDA_FLAGS + settings.arch_flags()},
            )
            return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}
    if os.environ.get("PERCEIVER_KERNELS_FORCE_CUDA_BUILD") == "1":
        raise RuntimeError(f"perceiver-kernels: cannot build the CUDA extension: {reason}")
    print(f"perceiver-kernels: CUDA extension not built at install ({reason}); it is built on first use")
    return {}


options = _extension()
options.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
setup(**options)
