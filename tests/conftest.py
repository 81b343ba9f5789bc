"""Test setup: Triton's CPU interpreter when there is no GPU, the ``gpu`` marker, a device fixture.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined; the package defines its
kernels on first use, so setting it here, before the tests import anything, is enough.
"""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason shown, without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton kernels, bfloat16 dots); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, yet reproducible from the test id when a failure must be replayed.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
