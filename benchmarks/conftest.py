"""The pytest-benchmark tests: a one-round smoke on CPU (part of the plain ``pytest`` run), real
synchronised timings on a GPU only when asked for with ``pytest benchmarks/ --benchmark-only``."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available() or config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="GPU timings run with `pytest benchmarks/ --benchmark-only`")
    for item in items:
        if item.path.parent.name == "benchmarks" and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
