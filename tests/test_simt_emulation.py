"""The CUDA backend's kernels on the CPU: the tensor-core forward and backward (``csrc/attention_fwd.cuh``,
``attention_bwd.cuh``), the SIMT ones (``csrc/simt_kernels.cuh``), the split-KV combine and rotary
turn-back (``csrc/finish_kernels.cuh``) and the host flow of ``csrc/host.h``, compiled with the host
compiler against an emulation of the CUDA execution model (``tests/simt_emulation/emulator.h``: every
thread a fiber switching at barriers in a seeded random order; mma.sync, ldmatrix and cp.async from their
PTX definitions), checked against the float64 reference on the whole correctness matrix.

So the kernels' fragment layouts, indexing, masks, tile ranges, rotary positions, gathers, scatters,
split-KV, barrier structure and cp.async waits are tested on every CI run, without a GPU. What the
emulation cannot show (GPU rounding and fast-math, the memory model, performance) is left to the GPU tests
(``tests/test_cuda_backend.py``) and compute-sanitizer."""

import functools
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from fuzz_strategies import FUZZ_SETTINGS, cases, dtypes, failures, seeds
from hypothesis import given
from hypothesis import strategies as st

import perceiver_kernels as pk
from perceiver_kernels.ops import cuda_attention, cuda_extension
from perceiver_kernels.ops.arguments import op_arguments
from perceiver_kernels.problem import describe
from perceiver_kernels.testing import (
    AR_CASES,
    CUDA_CASES,
    FEATURE_CASES,
    attention_options,
    check_case,
    far_apart_inputs,
    forward_backward,
    make_inputs,
)

HERE = Path(__file__).parent
CSRC = HERE.parent / "csrc"


def cuda_headers() -> Path | None:
    """cuda_fp16.h and friends (host-compilable); the kernels' sources include them."""
    home = cuda_extension.find_cuda_home()
    include = Path(home) / "include" if home else None
    return include if include is not None and (include / "cuda_fp16.h").exists() else None


# UBSan's alignment check always; more sanitizers on request, e.g. "address,undefined" (then run pytest with
# LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0): ASan bounds-checks every global
# access of the kernels against the tensors' allocations, as compute-sanitizer's memcheck does on a GPU.
SANITIZERS = os.environ.get("PERCEIVER_KERNELS_EMULATION_SANITIZE", "alignment")


def host_fma_flags() -> list[str]:
    """nvcc contracts ``a * b - c`` into one FMA by default; so does the emulation, where the host has FMA (x86-64
    needs -mfma for it, and the CPU must have it; AArch64 always has it)."""
    flags = ["-ffp-contract=fast"]
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu = ""
    if platform.machine() in ("x86_64", "AMD64") and " fma" in cpu:
        flags.append("-mfma")
    return flags


EMULATION_FLAGS = ["-O2", "-std=c++20", "-Wno-attributes", "-fno-strict-aliasing", f"-fsanitize={SANITIZERS}",
                   "-fno-sanitize-recover=all", *host_fma_flags()]  # fmt: skip
PROBE = """#include <source_location>
#include <ucontext.h>
int line() { return std::source_location::current().line(); }
"""


@functools.cache
def toolchain_reason() -> str | None:
    """Why the host compiler cannot build the emulation (C++20 <source_location>, ucontext, UBSan's alignment
    check in a shared library), or None. Probed apart from the build, so that a compile error in the kernels
    fails the tests instead of skipping them."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cpp"
        source.write_text(PROBE)
        command = [compiler, *EMULATION_FLAGS, "-shared", "-fPIC", str(source), "-o", str(Path(tmp) / "probe.so")]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"no usable host compiler ({compiler}): {error}"
    if result.returncode != 0:
        needs = f"C++20, ucontext, -fsanitize={SANITIZERS}"
        return f"{compiler} cannot build the emulation ({needs}): {result.stderr[-300:]}"
    return None


@functools.cache
def load() -> None:
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.load(
        name="perceiver_kernels_simt_emulation_" + SANITIZERS.replace(",", "_"),
        sources=[str(HERE / "simt_emulation" / "emulated_ops.cpp")],
        # The kernels pun 16-bit arrays through 32-bit words as nvcc allows; UBSan reports misaligned accesses.
        extra_cflags=EMULATION_FLAGS,
        extra_ldflags=[f"-fsanitize={SANITIZERS}"],
        extra_include_paths=[
            str(CSRC),
            str(HERE / "simt_emulation"),
            str(cuda_headers()),
            *cuda_extension.include_dirs(),
        ],  # fmt: skip
        is_python_module=False,
    )


pytestmark = [
    pytest.mark.skipif(cuda_headers() is None, reason="no CUDA toolkit headers here to compile the kernels"),
    pytest.mark.skipif(toolchain_reason() is not None, reason=str(toolchain_reason())),
]


class Emulated(torch.autograd.Function):
    """The emulated ops as a differentiable function (as ``ops/cuda_attention.py`` registers the real ones)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, lengths, index, q_rope, k_rope, rotary_dim, interleaved, causal, scale, splits,
                keys_after, tensor_cores, seed):  # fmt: skip
        options = (rotary_dim, interleaved, causal, scale, splits)
        family = (tensor_cores, seed)
        out, lse = torch.ops.perceiver_kernels_emulation.attention_fwd(
            q, k, v, mask, lengths, index, q_rope, k_rope, *options, keys_after, *family
        )
        ctx.save_for_backward(q, k, v, out, lse, mask, lengths, index, q_rope, k_rope, keys_after)
        ctx.options, ctx.family = options, family
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, mask, lengths, index, q_rope, k_rope, keys_after = ctx.saved_tensors
        grads = torch.ops.perceiver_kernels_emulation.attention_bwd(
            grad_out.contiguous(), grad_lse, q, k, v, out, lse, mask, lengths, index, q_rope, k_rope, *ctx.options,
            keys_after, *ctx.family,
        )  # fmt: skip
        return *grads, *([None] * 13)


def emulated_fn(num_splits: int, seed: int, tensor_cores: bool = False):
    """``attention_fn`` for ``check_case``: arguments as ``pk.attention``, through the emulated kernels
    (tensor-core or SIMT)."""

    def fn(q, k, v, **options):
        return Emulated.apply(*op_arguments(describe(q, k, v, num_splits=num_splits, **options)), tensor_cores, seed)

    return fn


MATRIX = {
    name: case
    for name, case in {**FEATURE_CASES, **AR_CASES, **CUDA_CASES}.items()
    if max(case.dqk, case.dv) <= cuda_attention.MAX_HEAD_DIM
}


def takes_tensor_cores(case, dtype) -> bool:
    """As ``use_tensor_cores`` in csrc/ops.cpp decides for fresh (aligned) tensors."""
    return dtype != torch.float32 and case.dqk % 8 == 0 and case.dv % 8 == 0


def runs():
    """Every case in every dtype on the SIMT family, and on the tensor-core family where it takes them. The
    tensor-core runs cost most (the emulated mma): a case runs float16 or bfloat16 on them, taking the two in
    turn over the cases, and both with --run-slow (the emulation always runs on the CPU). Not conftest's
    dtypes_in_turn: that checkerboard needs the dtype as a parametrize of its own, and these runs are filtered
    per case."""
    for index, (name, case) in enumerate(MATRIX.items()):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for family in ("simt", "tensor-core"):
                if family == "tensor-core" and not takes_tensor_cores(case, dtype):
                    continue
                in_turn = family == "simt" or (dtype == torch.float16) == (index % 2 == 0)
                marks = [] if in_turn else [pytest.mark.slow]
                yield pytest.param(name, dtype, family, id=f"{name}-{str(dtype)[6:]}-{family}", marks=marks)


RUNS = list(runs())


def schedules(name: str) -> list[tuple[int, int]]:
    """``(num_splits, seed)`` runs of a case: the plain schedule (seed 0: in order, warps in lockstep, copies
    landing at their wait), then two seeded ones (emulator.h ``Schedule::from_seed``): copies landing at
    issue with warps running ahead, and copies landing at random barriers in lockstep with key splits."""
    n = sum(map(ord, name)) % 1000
    return [(1, 0), (1, 6 * n + 4), (3, 6 * n + 2)]


# A case's runs (dtypes x families) take its three schedules in turn: each case meets every kind of schedule,
# split-KV included, in one CI run; --run-slow runs every schedule on every run (an exhaustive profile).
# (Counted over the runs CI makes, so that the tensor-core run a case skips does not take a schedule kind away.)
TURN = {(name, dtype, family): i for name in MATRIX for i, (_, dtype, family) in
        enumerate(run.values for run in RUNS if run.values[0] == name and not run.marks)}  # fmt: skip


@pytest.mark.long_running(build=True)
def test_the_emulation_builds():
    """The kernels compile for the host (a compile error fails here). Collected first, so that the other workers'
    tests find the build done instead of waiting on its lock."""
    load()


@pytest.mark.parametrize("name, dtype, family", RUNS)
def test_kernels_match_reference(name, dtype, family, request):
    """Forward and backward under the case's schedules, within the tolerances every backend meets."""
    load()
    case = MATRIX[name]
    runs = schedules(name)
    if not request.config.getoption("--run-slow"):
        runs = [runs[TURN[name, dtype, family] % len(runs)]]
    for splits, seed in runs:
        torch.manual_seed(seed)
        results = check_case(case, dtype, "cpu", emulated_fn(splits, seed, tensor_cores=family == "tensor-core"))
        failed = {n: f"err {c.max_abs_error:.2e} > limit {c.limit:.2e}" for n, c in results.items() if not c.ok}
        assert not failed, f"{family} {case.describe()} {dtype} splits={splits} seed={seed}: {failed}"


@pytest.mark.parametrize("family", ["simt", "tensor-core"])
@pytest.mark.parametrize("name", ["padding-causal", "prefix-dropout-rotary-left-pad", "head-dim-256"])
def test_results_do_not_depend_on_thread_order(name, family):
    """Schedules differ in thread, warp and CTA order and in when cp.async copies land: a shared-memory race
    would change out, lse, dk or dv from one schedule to the next. dq sums float32 atomics, whose order
    legitimately changes its rounding, so it is compared with a tolerance."""
    load()
    case = MATRIX[name]
    dtype = torch.float32 if family == "simt" else torch.float16
    inputs = make_inputs(case, dtype, "cpu")
    options = attention_options(inputs)
    runs = []
    for seed in (0, 4, 5, 12):  # (copies, warps): (wait, lockstep), (issue, ahead), (random, ahead), (wait, lockstep)
        q, k, v = (inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
        out, lse = emulated_fn(2, seed, tensor_cores=family == "tensor-core")(q, k, v, **options)
        out.backward(inputs["grad_out"])
        runs.append((out, lse, q.grad, k.grad, v.grad))
    first = runs[0]
    for other in runs[1:]:
        for name_, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, other, strict=True):
            if name_ == "dq":
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
            else:
                assert torch.equal(a, b), f"{name_} depends on the order threads run in"


@pytest.mark.parametrize("family, dtype", [("simt", torch.float32), ("tensor-core", torch.float16)])
@pytest.mark.parametrize("layout", ["padding", "kv-lengths", "rotary-gather"])
def test_nan_and_inf_in_ignored_rows_are_ignored(family, dtype, layout):
    """As the Triton test of the same name: rows the call ignores (padded keys, rows past kv_lengths, rows kv_index
    leaves out) are never loaded, so NaN/Inf there leave out, lse and every gradient bitwise as for clean inputs
    (causal, split-KV), and those rows' gradients zero."""
    load()
    nk = 70
    q = torch.randn(2, 5, 2, 16, dtype=dtype)
    k, v = torch.randn(2, nk, 2, 16, dtype=dtype), torch.randn(2, nk, 2, 24, dtype=dtype)
    mask = torch.zeros(2, nk, dtype=torch.bool)
    mask[0, 3:9] = True
    mask[1, nk - 6 :] = True
    options, ignored = dict(key_padding_mask=mask, causal=True), mask.clone()
    if layout == "kv-lengths":
        options["kv_lengths"] = torch.tensor([50, 17])
        ignored |= torch.arange(nk)[None] >= options["kv_lengths"][:, None]
    if layout == "rotary-gather":
        options.update(rotary_dim=8, kv_index=torch.arange(0, nk, 2).expand(2, -1).contiguous())
        ignored[:, 1::2] = True
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[ignored], dirty_v[ignored] = float("nan"), float("inf")
    fn = emulated_fn(3, 0, tensor_cores=family == "tensor-core")
    results = [forward_backward(fn, q, keys, values, **options) for keys, values in ((k, v), (dirty_k, dirty_v))]
    for what, clean, dirty in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(clean, dirty), f"{family}: {what} changed by garbage in ignored rows"
    assert not results[1][3][ignored].any() and not results[1][4][ignored].any()


@pytest.mark.parametrize("family, dtype", [("simt", torch.float32), ("tensor-core", torch.float16)])
def test_lse_does_not_drift_over_many_key_tiles(family, dtype):
    """Every score equal (one large value), over 128 key tiles: the row maximum never moves, so the online
    softmax's rescale must be exactly 1 every tile. Computed as exp2f(max * scale_log2 - base), an FMA (on the GPU,
    and in this emulation where the host has FMA) leaves the rounding residue of the base, which compounds once
    per tile; from the difference of the maxima it cannot. The lse must be the float64 one to a few ulps."""
    load()
    nk = 128 * 64
    q = torch.zeros(1, 4, 1, 16, dtype=dtype)
    q[..., 0] = 23.0
    k = torch.zeros(1, nk, 1, 16, dtype=dtype)
    k[..., 0] = 21.0  # every score 483: scale_log2 x 483 is far from a float32 value with a short mantissa
    v = torch.randn(1, nk, 1, 16, dtype=dtype)
    out, lse = emulated_fn(1, 0, tensor_cores=family == "tensor-core")(q, k, v)
    scores = torch.full((nk,), 483.0 * 16**-0.5, dtype=torch.float64)
    expected = torch.logsumexp(scores, 0).item()
    assert (lse.double() - expected).abs().max().item() < 4 * torch.finfo(torch.float32).eps * abs(expected)


@pytest.mark.parametrize("family", ["simt", "tensor-core"])
def test_samples_more_than_2_31_elements_apart(family):
    """64-bit offsets in the CUDA kernels and their host code: as the Triton test of the same name (k and v's
    second sample past 2**31 elements), bitwise equal to the same values laid out contiguously, with split-KV."""
    load()
    q, k, v = far_apart_inputs(torch.float16)
    mask = torch.zeros(2, k.shape[1], dtype=torch.bool)
    mask[1, 5:9] = True
    fn = emulated_fn(3, 0, tensor_cores=family == "tensor-core")
    near = [t.detach().contiguous() for t in (q, k, v)]
    results = [forward_backward(fn, *inputs, causal=True, key_padding_mask=mask) for inputs in ((q, k, v), near)]
    for what, far, near in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(far, near), f"{family}: {what} differs when the samples are 2**31 elements apart"


@FUZZ_SETTINGS
@given(case=cases(), dtype=dtypes, num_splits=st.sampled_from([1, 3]), seed=seeds, tensor_cores=st.booleans())
def test_fuzz_kernels_match_reference(case, dtype, num_splits, seed, tensor_cores):
    """Property-based fuzzing (tests/fuzz_strategies.py) of both kernel families under a random schedule: forward
    and backward against the float64 reference. Tensor cores where the op would take them (16-bit, head dims
    multiples of 8), else the SIMT kernels."""
    load()
    tensor_cores = tensor_cores and takes_tensor_cores(case, dtype)
    torch.manual_seed(seed)
    failed = failures(check_case(case, dtype, "cpu", emulated_fn(num_splits, seed % 1000, tensor_cores)))
    family = "tensor-core" if tensor_cores else "simt"
    assert not failed, f"{family} {case} {dtype} splits={num_splits} seed={seed}: {failed}"


@pytest.mark.parametrize("family, dtype", [("simt", torch.float32), ("tensor-core", torch.float16)])
def test_keys_after_lets_chunks_merge_to_the_whole(family, dtype):
    """As the Triton test of the same name: chunks of a right-padded causal sequence, each with its
    ``keys_after`` (the diagonal crossing chunk bounds; a chunk past a sample's length; split-KV in one chunk),
    merge to attention over all keys, forward and every gradient."""
    from perceiver_kernels.distributed import merge_attention

    load()
    torch.manual_seed(3)
    q, k, v = (torch.randn(3, n, 2, 16, dtype=torch.float64, requires_grad=True) for n in (5, 70, 70))
    lengths = torch.tensor([70, 41, 20])
    expected, expected_lse = pk.attention(q, k, v, causal=True, kv_lengths=lengths, return_lse=True,
                                          backend="reference")  # fmt: skip
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    outs, lses = [], []
    for (start, end), splits in (((0, 18), 1), ((18, 40), 2), ((40, 70), 1)):
        local, after = (lengths - start).clamp(0, end - start), (lengths - end).clamp(min=0)
        attend = emulated_fn(splits, 0, tensor_cores=family == "tensor-core")
        out, lse = attend(qc, kc[:, start:end], vc[:, start:end], causal=True, kv_lengths=local, keys_after=after)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    grads = torch.autograd.grad(out, (qc, kc, vc), grad.to(dtype))
    for name, actual, reference in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                                       (expected, expected_lse, *expected_grads), strict=True):  # fmt: skip
        tolerance = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(actual.double(), reference, rtol=tolerance, atol=tolerance, msg=name)
