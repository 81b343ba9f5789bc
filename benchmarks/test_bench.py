"""pytest-benchmark view of the suite: one test per (shape, mode, provider), and one per (model entry,
size, variant).

On a GPU (``pytest benchmarks/ --benchmark-only``) the ``perceiver`` suite in bfloat16, each round
synchronised; on CPU the ``quick`` suite in float32 for one round, a smoke test of the same pipeline
that runs with the plain ``pytest``. Every forward output of our backends is checked against the
reference here too, so a benchmark never times a wrong answer.
"""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.bench.host import HOST_CASES, CountAllocations, make_call, make_sdpa_call
from perceiver_kernels.bench.host import MODES as HOST_MODES
from perceiver_kernels.bench.models import PERCEIVER_MODELS, QUICK_MODELS, first_step, relative_l2
from perceiver_kernels.bench.providers import PROVIDERS, Unavailable, make_inputs
from perceiver_kernels.bench.shapes import PERCEIVER_SUITE, QUICK_SUITE
from perceiver_kernels.bench.suite import SUITE_DTYPES, reference_output, relative_difference
from perceiver_kernels.bench.timing import make_step, synchronize
from perceiver_kernels.kernels.launch import record_launches
from perceiver_kernels.testing import BENCH_AGREEMENT_RTOL

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITE = PERCEIVER_SUITE if DEVICE.type == "cuda" else QUICK_SUITE
MODELS = PERCEIVER_MODELS if DEVICE.type == "cuda" else QUICK_MODELS
DTYPE = SUITE_DTYPES[DEVICE.type]
GPU_ROUNDS, GPU_WARMUP_ROUNDS = 20, 3

CASES = [pytest.param(shape, mode, id=f"{shape.name}-{mode}") for shape in SUITE for mode in shape.modes]
MODEL_CASES = [
    pytest.param(
        entry, size, variant.name, id=f"{entry.name}-{'-'.join(f'{k}{v}' for k, v in size.items())}-{variant.name}"
    )  # fmt: skip
    for entry in MODELS
    for size in entry.sizes()
    for variant in entry.variants
]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape,mode", CASES)
def test_attention(benchmark, shape, mode, provider):
    if DEVICE.type == "cpu" and provider == "flex":
        pytest.skip("FlexAttention compiles per shape (~20 s each on a small CPU); `perceiver-kernels bench` runs it")
    if PROVIDERS[provider].ours and (reason := pk.backend_unavailable_reason(provider, torch.empty(0, device=DEVICE))):
        pytest.skip(f"{provider}: {reason}")
    inputs = make_inputs(shape, DTYPE, DEVICE)
    try:
        attn = PROVIDERS[provider].build(shape, inputs, mode)
    except Unavailable as e:
        pytest.skip(f"{provider} cannot run {shape.name}: {e}")
    step, grads = make_step(attn, shape, inputs, mode)
    if not PROVIDERS[provider].ours:
        # What the suite reports as "n/a" (a compile or shared-memory failure, a backward that
        # refuses, out of memory) is a skip here; our own backends must run.
        try:
            step()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"{provider} cannot run {shape.name} {mode}: {type(e).__name__}: {str(e)[:200]}")

    def zero_grads():
        for t in grads:
            t.grad = None

    def run():
        out = step()
        synchronize(DEVICE)
        return out

    benchmark.group = f"{shape.name} {mode}"
    benchmark.extra_info.update(flops=shape.flops(mode), bytes=shape.bytes(mode, DTYPE.itemsize), dtype=str(DTYPE))
    if DEVICE.type == "cuda":
        out = benchmark.pedantic(run, setup=zero_grads, rounds=GPU_ROUNDS, warmup_rounds=GPU_WARMUP_ROUNDS)
    else:
        out = benchmark.pedantic(run, setup=zero_grads, rounds=1)
    if mode == "fwd" and PROVIDERS[provider].ours:
        diff = relative_difference(out, reference_output(shape, inputs))
        assert diff <= BENCH_AGREEMENT_RTOL[DTYPE], f"{provider} differs from the reference: {diff:.2e}"


@pytest.mark.parametrize("entry,size,variant", MODEL_CASES)
def test_model(benchmark, entry, size, variant):
    """A model entry's variant (``perceiver_kernels/bench/models.py``): one fwd+bwd step per round; our variants'
    first step is checked against the anchor's (output and gradients)."""
    variant = entry.variant(variant)
    backend = entry.backend_of(variant)
    if backend is not None and (reason := pk.backend_unavailable_reason(backend, torch.empty(0, device=DEVICE))):
        pytest.skip(f"{backend}: {reason}")
    model = entry.build(DEVICE, DTYPE, size)
    step = entry.step(model, variant, size, DEVICE)
    check, _ = first_step(step, DEVICE)
    if variant.ours:
        anchor, _ = first_step(entry.step(model, entry.variant(entry.anchor), size, DEVICE), DEVICE)
        assert relative_difference(check.output, anchor.output) <= BENCH_AGREEMENT_RTOL[DTYPE]
        assert relative_l2(check.grads, anchor.grads) <= BENCH_AGREEMENT_RTOL[DTYPE]
        del anchor
    del check

    def zero_grads():
        for p in step.params:
            p.grad = None

    def run():
        out = step.run()
        synchronize(DEVICE)
        return out

    benchmark.group = f"{entry.name} {' '.join(f'{k} {v}' for k, v in size.items())}"
    benchmark.extra_info.update(units=step.units, unit=entry.throughput_unit, dtype=str(DTYPE))
    if DEVICE.type == "cuda":
        benchmark.pedantic(run, setup=zero_grads, rounds=GPU_ROUNDS, warmup_rounds=GPU_WARMUP_ROUNDS)
    else:
        benchmark.pedantic(run, setup=zero_grads, rounds=1)


HOST_ROUNDS = 200  # host-overhead calls are microseconds: many rounds, even on CPU


@pytest.mark.parametrize("mode", HOST_MODES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in HOST_CASES] + [pytest.param(None, id="sdpa")])
def test_host_overhead(benchmark, case, mode):
    """Host time per call (``perceiver_kernels/bench/host.py``): ours with every Triton launch skipped through the
    package's measurement hook, or SDPA's whole call on the same tiny input (``case`` None)."""
    previous = pk.set_value_checks(False)  # the default path is what is measured
    try:
        if case is None:
            call = make_sdpa_call(mode, DEVICE, DTYPE)
            benchmark.group = f"host {mode}"
            benchmark.pedantic(call, rounds=HOST_ROUNDS, warmup_rounds=10)
            return
        call = make_call(case, mode, DEVICE, DTYPE)
        with record_launches(execute=False) as log, CountAllocations() as allocations:
            call()
        benchmark.group = f"host {mode}"
        benchmark.extra_info.update(launches=log.count, allocations=allocations.count, target=case.target)
        with record_launches(execute=False):
            benchmark.pedantic(call, rounds=HOST_ROUNDS, warmup_rounds=10)
    finally:
        pk.set_value_checks(previous)
