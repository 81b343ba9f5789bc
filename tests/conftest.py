"""Fixtures of the test suite (the interpreter switch and the ``gpu`` marker are in ../conftest.py)."""

import zlib

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, yet reproducible from the test id when a failure must be replayed.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# The libraries pk.patch supports (tests/test_patch_*.py): skipped with the reason when not installed.
@pytest.fixture
def hf():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install .[integrations])")


@pytest.fixture
def perceiver_pytorch():
    return pytest.importorskip(
        "perceiver_pytorch", reason="perceiver-pytorch is not installed (pip install .[integrations])"
    )


@pytest.fixture
def perceiver_ar():
    return pytest.importorskip(
        "perceiver_ar_pytorch", reason="perceiver-ar-pytorch is not installed (pip install .[integrations])"
    )
