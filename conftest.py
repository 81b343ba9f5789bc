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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core already: intra-op threads (and the processes a test spawns, which inherit the
    # variable) would only contend with the other workers (on 2 cores: the SIMT emulation tests 116 -> 94 s,
    # the extension's build 70 -> 53 s).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("PERCEIVER_KERNELS_CHECK_VALUES", "1")
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (exhaustive profiles)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason shown, without one)")
    config.addinivalue_line("markers", "slow: an exhaustive profile, run with --run-slow (skipped otherwise)")
    config.addinivalue_line(
        "markers",
        "long_running(build=False): a test of half a minute or more on CI's machine, collected first; with "
        "build=True a build that other tests wait for, collected before those",
    )
    config.addinivalue_line(
        "markers",
        "dtypes_in_turn: on CPU a case runs in float32 or float16, by a checkerboard over its other parameters "
        "(every dtype with --run-slow, and always on a GPU)",
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton or CUDA C++ kernels); none on this machine")
    skip_slow = pytest.mark.skip(reason="an exhaustive profile: run with --run-slow")
    run_slow = config.getoption("--run-slow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
    if not HAS_CUDA and not run_slow:
        _take_dtypes_in_turn(items)
    # pytest-xdist hands out tests in collection order, and the last ones one at a time: a long test collected
    # late leaves the other worker idle until it ends. Collected first, the long tests start at once and the
    # short ones fill the other worker around them; builds come first of all, before the tests that need them.
    items.sort(key=_collection_rank)


def _collection_rank(item) -> int:
    marker = item.get_closest_marker("long_running")
    return 2 if marker is None else 0 if marker.kwargs.get("build") else 1


def _take_dtypes_in_turn(items):
    """Items marked ``dtypes_in_turn`` run in float32 or float16 by the parity of their parameters' positions (the
    sum over the other ``parametrize`` decorators of the value's index), a checkerboard: every value of every
    parameter meets both dtypes, and neighbouring cases take different ones. The other dtype is skipped with the
    reason shown. Each run costs seconds in the CPU interpreter or emulation while the kernels treat dtypes alike
    in every case; --run-slow (and a GPU, where a run costs milliseconds) runs them all."""
    turns = ["float32", "float16"]
    skip = pytest.mark.skip(
        reason="the case runs in the other of float32/float16 on CPU (dtypes in turn): all with --run-slow"
    )
    positions: dict[tuple, dict[str, int]] = {}  # (test, parameter names) -> a value's position, in order seen
    for item in items:
        spec = getattr(item, "callspec", None)
        if "dtypes_in_turn" not in item.keywords or spec is None or "dtype" not in spec.params:
            continue
        dtype = str(spec.params["dtype"]).removeprefix("torch.")
        if dtype not in turns:
            continue
        position = 0
        for marker in item.iter_markers("parametrize"):  # one parameter per decorator ("nq,nk" is one)
            names = marker.args[0]
            names = tuple(n.strip() for n in (names.split(",") if isinstance(names, str) else names))
            if "dtype" not in names:
                seen = positions.setdefault((item.originalname, names), {})
                position += seen.setdefault(repr([spec.params[n] for n in names]), len(seen))
        if turns[position % len(turns)] != dtype:
            item.add_marker(skip)
