"""The benchmark suite, shipped with the package so that ``perceiver-kernels bench`` works from any install.

- ``shapes``: the Perceiver-shaped problems (the one table of benchmark shapes) and the suites.
- ``providers``: ours and the alternatives (SDPA flash/cuDNN/efficient/math, FlexAttention, naive).
- ``timing``: synchronised timing, peak memory, device ceilings.
- ``models``: model-level entries (Perceiver AR training step, weight-shared blocks).
- ``suite``: runs a suite and writes ``bench.json``; ``report``: tables and plots from it
  (``python -m perceiver_kernels.bench.report bench.json``).
- ``host``: per-call host overhead with launches skipped; ``kernel_report``: every kernel compiled for a
  GPU that need not be present; ``sweep``: tile sweeps on a GPU.

This package sits above the library (it imports ``perceiver_kernels``, never the reverse: only the command
line imports it, on demand). The repository's ``benchmarks/`` folder keeps the committed results, the GPU
check script and the pytest-benchmark entry points.
"""
