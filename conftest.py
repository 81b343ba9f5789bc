"""Shared by tests/ and benchmarks/: Triton's CPU interpreter when there is no GPU, the ``gpu`` marker
(skipped, with the reason shown, on a machine without one), and the value checks of ``pk.attention``
switched on (``kv_lengths`` / ``kv_index`` values; off by default because each is a device sync).

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined; the package defines its
kernels on first use, so setting it here, before any test module imports anything, is enough.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("PERCEIVER_KERNELS_CHECK_VALUES", "1")
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
