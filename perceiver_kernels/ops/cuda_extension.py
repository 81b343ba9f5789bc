"""The CUDA C++ extension (``csrc/``): found prebuilt, or built on first use, or absent with a reason.

``load()`` registers the extension's ops (``perceiver_kernels::cuda_attention_fwd`` / ``_bwd``) and returns None,
or returns why it cannot (never raises): ``import perceiver_kernels`` and everything that does not ask
for ``backend="cuda"`` work without it, and ``perceiver-kernels info`` prints the reason.

Where it comes from, in order:
1. ``perceiver_kernels._C``, built by ``setup.py`` at install time (``pip install --no-build-isolation``
   with a CUDA build of torch and a CUDA toolkit).
2. A JIT build of the sources with ``torch.utils.cpp_extension.load`` (cached under torch's extension
   directory), when torch is a CUDA build and ``nvcc`` is found. The sources are ``perceiver_kernels/csrc/``
   in an installed wheel (``setup.py`` copies them there) or ``csrc/`` of the checkout in an editable
   install.

Environment:
    PERCEIVER_KERNELS_NO_CUDA=1       never load or build the extension.
    PERCEIVER_KERNELS_NO_JIT=1        use only a prebuilt ``_C``.
    PERCEIVER_KERNELS_CUDA_ARCHS      semicolon-separated, default ``8.0;9.0a`` (sm_80 with PTX, sm_90a).
    PERCEIVER_KERNELS_BUILD_VERBOSE=1 show the compiler's output.
    MAX_JOBS                          parallel compile jobs (ninja), as torch reads it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import sysconfig
from pathlib import Path

SOURCES = ("ops.cpp", "attention_fwd.cu", "attention_bwd.cu", "attention_simt.cu")


def _sources_dir() -> Path | None:
    """Where the CUDA sources are: shipped in the package (a wheel), else the checkout's ``csrc/``."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    return None


SOURCES_DIR = _sources_dir()
DEFAULT_ARCHS = "8.0;9.0a"


def extension_name() -> str:
    """The JIT build's name, one per sources folder: torch's cache rebuilds whenever a build's source paths
    change, so two installs sharing a name would rebuild over each other."""
    return "perceiver_kernels_cuda_" + hashlib.sha1(str(SOURCES_DIR).encode()).hexdigest()[:8]


def prebuilt() -> str | None:
    """The prebuilt ``_C``'s path, if this install has one (found without importing it)."""
    spec = importlib.util.find_spec("perceiver_kernels._C")
    return None if spec is None else spec.origin


def availability() -> str:
    """Which of the three ways this install has, in words (``perceiver-kernels info``)."""
    path = prebuilt()
    if path is not None:
        return f"prebuilt ({path})"
    if SOURCES_DIR is not None:
        return f"not prebuilt; built on first use (with a CUDA toolkit) from its sources in {SOURCES_DIR}"
    return "not prebuilt, and its sources are not installed: backend='cuda' cannot be built here"


_reason: str | None = None
_loaded = False
source: str | None = None  # where the loaded extension came from (for `perceiver-kernels info`)


def load() -> str | None:
    """Load (building if needed) the extension once per process; None on success, else the reason."""
    global _loaded, _reason
    if _loaded or _reason is not None:
        return _reason
    try:
        _reason = _load()
    except Exception as error:  # a failed build or load must not break the package: report it
        _reason = f"building or loading the CUDA extension failed: {type(error).__name__}: {error}"
    _loaded = _reason is None
    return _reason


def _load() -> str | None:
    if os.environ.get("PERCEIVER_KERNELS_NO_CUDA") == "1":
        return "disabled by PERCEIVER_KERNELS_NO_CUDA=1"
    global source
    try:
        module = importlib.import_module("perceiver_kernels._C")
        source = f"prebuilt ({module.__file__})"
        return None
    except ImportError:
        pass
    if os.environ.get("PERCEIVER_KERNELS_NO_JIT") == "1":
        return "not built at install time, and PERCEIVER_KERNELS_NO_JIT=1 forbids building it now"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build; the CUDA extension needs a CUDA build of torch"
    if SOURCES_DIR is None:
        return "not built at install time, and its sources are not installed to build it"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return "not built at install time, and no CUDA toolkit (nvcc) was found to build it; set CUDA_HOME"
    build()
    source = f"built on first use from {SOURCES_DIR} (cached by torch.utils.cpp_extension)"
    return None


def find_cuda_home() -> str | None:
    """The toolkit root: ``CUDA_HOME``/``CUDA_PATH``, else ``/usr/local/cuda``, else from ``nvcc`` on PATH.

    A ``nvcc`` on PATH may be a wrapper script outside its toolkit (so torch's guess, the directory above
    it, lacks ``lib64``): the standard location is preferred."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        root = Path(nvcc).resolve().parents[1]
        if (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def arch_flags(archs: str | None = None) -> list[str]:
    """nvcc ``-gencode`` flags for ``8.0;9.0a``-style lists; the first arch also embeds PTX, so newer GPUs
    JIT-compile it."""
    archs = archs or os.environ.get("PERCEIVER_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    flags = []
    for i, arch in enumerate(a.strip() for a in archs.split(";") if a.strip()):
        number = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if i == 0:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def include_dirs() -> list[str]:
    """Headers torch's CUDA headers include (cusparse.h, ...) that a minimal toolkit may lack: the ``nvidia``
    wheels installed with torch carry them."""
    site = Path(sysconfig.get_paths()["purelib"])
    return sorted(glob.glob(str(site / "nvidia" / "cu*" / "include"))) + sorted(
        glob.glob(str(site / "nvidia" / "*" / "include"))
    )


COMMON_FLAGS = ["-O3"]  # torch adds the C++ standard its headers need
CUDA_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def build() -> None:
    """JIT-build and load the extension (registers its ops); raises on a compile error."""
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # before torch's module reads it at import
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on a machine without a GPU
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.setLevel(level)

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # in case torch imported it earlier, with a wrong guess
    cpp_extension.load(
        name=extension_name(),
        sources=[str(SOURCES_DIR / name) for name in SOURCES],
        extra_cflags=COMMON_FLAGS,
        extra_cuda_cflags=CUDA_FLAGS + arch_flags(),
        extra_include_paths=[str(SOURCES_DIR), *include_dirs()],
        is_python_module=False,
        verbose=os.environ.get("PERCEIVER_KERNELS_BUILD_VERBOSE") == "1",
    )
