"""Shared by tests/ and benchmarks/: Triton's CPU interpreter when there is no GPU, and the ``gpu``
marker (skipped, with the reason shown, on a machine without one).

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined; the package defines its
kernels on first use, so setting it here, before any test module imports anything, is enough.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason shown, without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton or CUDA C++ kernels); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
