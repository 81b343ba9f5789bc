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


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (exhaustive profiles)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason shown, without one)")
    config.addinivalue_line("markers", "slow: an exhaustive profile, run with --run-slow (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton or CUDA C++ kernels); none on this machine")
    skip_slow = pytest.mark.skip(reason="an exhaustive profile: run with --run-slow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
