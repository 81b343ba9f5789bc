"""The CUDA C++ backend (csrc/): the extension builds (for sm_80 and sm_90a) and registers its ops; the
ops' CPU implementations and registrations pass ``opcheck``; on a GPU the kernels match the float64
reference (out, lse, dq, dk, dv) on the whole correctness matrix (tensor-core and SIMT kernels), and what
they do not take (head dims above 256, float64) is refused with the reason."""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.ops import cuda_attention, cuda_extension
from perceiver_kernels.rotary import rotary_tables
from perceiver_kernels.testing import (
    AR_CASES,
    CUDA_CASES,
    FEATURE_CASES,
    AttentionCase,
    attention_options,
    backend_fn,
    check_case,
    make_inputs,
)

CAN_BUILD = torch.version.cuda is not None and cuda_extension.find_cuda_home() is not None


@pytest.mark.long_running(build=True)
def test_extension_builds_and_registers_or_says_why():
    """Where torch is a CUDA build and a toolkit is found (CI), a compile error fails here."""
    reason = cuda_attention.load()
    if CAN_BUILD:
        assert reason is None, reason
        assert hasattr(torch.ops.perceiver_kernels, "cuda_attention_fwd")
    else:
        assert isinstance(reason, str) and reason


def test_arch_flags_cover_sm80_with_ptx_and_sm90a():
    assert cuda_extension.arch_flags("8.0;9.0a") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_80,code=compute_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]


needs_extension = pytest.mark.skipif(not CAN_BUILD, reason="no CUDA extension here (CPU torch or no nvcc)")


def op_args(case: AttentionCase, dtype=torch.float32, device="cpu", num_splits=1):
    inputs = make_inputs(case, dtype, device)
    q_rope = k_rope = None
    if case.rotary_dim:
        q_pos = torch.arange(case.nk - case.nq, case.nk, device=device)[None]
        k_pos = torch.arange(case.nk, device=device)[None]
        q_rope = torch.stack(rotary_tables(q_pos, case.rotary_dim, 10000.0))
        k_rope = torch.stack(rotary_tables(k_pos, case.rotary_dim, 10000.0))
    return (
        inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"], inputs["kv_lengths"],
        inputs.get("kv_index"), q_rope, k_rope, case.rotary_dim, case.rotary_interleaved, case.causal,
        case.dqk**-0.5, num_splits,
    )  # fmt: skip


CPU_SCHEMA_CASES = {
    "plain": AttentionCase(batch=2, nq=5, nk=17),
    "broadcast-causal-padding": AttentionCase(batch=2, q_batch=1, nq=5, nk=17, causal=True, pad_fraction=0.3),
    "kv-lengths": AttentionCase(batch=3, nq=4, nk=9, kv_lengths=(0, 9, 3)),
    "rotary-prefix-dropout": AttentionCase(batch=2, nq=4, nk=12, causal=True, rotary_dim=8, prefix_dropout=True),
}


@needs_extension
@pytest.mark.parametrize("name", list(CPU_SCHEMA_CASES))
def test_cpu_schema_is_the_reference(name):
    case = CPU_SCHEMA_CASES[name]
    assert cuda_attention.load() is None
    args = op_args(case)
    out, lse = torch.ops.perceiver_kernels.cuda_attention_fwd(*args)
    q, k, v, mask, lengths, kv_index = args[:6]
    positions = {}
    if case.rotary_dim:
        positions = dict(rotary_dim=case.rotary_dim, q_positions=torch.arange(case.nk - case.nq, case.nk)[None],
                         k_positions=torch.arange(case.nk)[None])  # fmt: skip
    expected, expected_lse = pk.attention_reference(
        q, k, v, causal=case.causal, key_padding_mask=mask, kv_lengths=lengths, kv_index=kv_index,
        return_lse=True, **positions,
    )  # fmt: skip
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)


@needs_extension
@pytest.mark.parametrize("name", list(CPU_SCHEMA_CASES))
def test_cpu_backward_schema_is_the_reference(name):
    case = CPU_SCHEMA_CASES[name]
    assert cuda_attention.load() is None
    args = op_args(case)
    out, lse = torch.ops.perceiver_kernels.cuda_attention_fwd(*args)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.ops.perceiver_kernels.cuda_attention_bwd(grad_out, grad_lse, *args[:3], out, lse, *args[3:])
    q, k, v = (t.detach().requires_grad_() for t in args[:3])
    ref_out, ref_lse = torch.ops.perceiver_kernels.cuda_attention_fwd(q, k, v, *args[3:])
    finite = torch.isfinite(ref_lse)
    loss = (ref_out * grad_out).sum() + (torch.where(finite, ref_lse, 0.0) * grad_lse).sum()
    for got, expected in zip(grads, torch.autograd.grad(loss, (q, k, v)), strict=True):
        torch.testing.assert_close(got, expected)


@needs_extension
def test_backward_fake_implementation():
    """The backward op's fake implementation gives the gradients' shapes (opcheck of the forward runs the
    backward through AOT dispatch; opcheck of the backward itself would differentiate the reference under
    its fake mode, which functorch does not allow)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert cuda_attention.load() is None
    args = op_args(CPU_SCHEMA_CASES["broadcast-causal-padding"])
    out, lse = torch.ops.perceiver_kernels.cuda_attention_fwd(*args)
    real = (torch.randn_like(out), torch.randn_like(lse), *args[:3], out, lse, *args[3:])
    expected = torch.ops.perceiver_kernels.cuda_attention_bwd(*real)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real]
        grads = torch.ops.perceiver_kernels.cuda_attention_bwd(*fake)
    assert [g.shape for g in grads] == [e.shape for e in expected]
    assert [g.dtype for g in grads] == [e.dtype for e in expected]


@needs_extension
@pytest.mark.parametrize("name", ["plain", "broadcast-causal-padding"])
def test_opcheck_cpu_schema(name):
    """Schema, fake implementation, autograd registration and AOT dispatch of the op (CPU implementation)."""
    assert cuda_attention.load() is None
    torch.library.opcheck(torch.ops.perceiver_kernels.cuda_attention_fwd, op_args(CPU_SCHEMA_CASES[name]))


# -- GPU: the kernels ------------------------------------------------------------------------------

# float32 runs on the SIMT kernels, float16/bfloat16 on the tensor-core kernels where they can (head dims
# that are multiples of 8, 16-byte rows) and on the SIMT kernels otherwise (e.g. head-dims-odd).
GPU_DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]
MATRIX = {**FEATURE_CASES, **AR_CASES, **CUDA_CASES}


def cuda_fn(num_splits: int = 0):
    return backend_fn(cuda_attention.cuda_attention, num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("name", list(MATRIX))
def test_kernels_match_reference(name, num_splits, dtype, device):
    """Every case of the matrix: within the tolerances the Triton backend meets, or (head dims the kernels
    do not take) refused by ``pk.attention(backend="cuda")`` with the reason, never silently wrong."""
    assert cuda_attention.load() is None
    case = MATRIX[name]
    inputs = make_inputs(case, dtype, device)
    reason = cuda_attention.unsupported_reason(inputs["q"], inputs["k"], inputs["v"], case.dqk**-0.5)
    if reason is not None:
        options = attention_options(inputs)
        with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs: .*head dims up to 256"):
            pk.attention(inputs["q"], inputs["k"], inputs["v"], backend="cuda", **options)
        return
    results = check_case(case, dtype, device, cuda_fn(num_splits))
    failed = {n: f"err {c.max_abs_error:.2e} > limit {c.limit:.2e}" for n, c in results.items() if not c.ok}
    assert not failed, f"{case.describe()} {dtype} splits={num_splits}: {failed}"


def unaligned(t):
    """``t`` (differentiably) moved one element off the 16-byte grid: the SIMT kernels' 16-bit path."""
    flat = torch.cat([t.new_zeros(1), t.reshape(-1)])
    return flat[1:].view(t.shape)


def strided_last_dim(t):
    """``t`` with a last-dim stride of 2 (copied by the op before the kernels read rows)."""
    wide = torch.stack([t, torch.zeros_like(t)], dim=-1)
    return wide[..., 0]


SIMT_16BIT_CASES = [
    "padding-causal", "broadcast-query", "head-dim-256", "prefix-dropout-padding", "decode-rotary", "head-dims-odd",
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES[1:])
@pytest.mark.parametrize("layout", [unaligned, strided_last_dim], ids=["unaligned", "strided-last-dim"])
@pytest.mark.parametrize("name", SIMT_16BIT_CASES)
def test_16_bit_inputs_in_other_layouts(name, layout, dtype, device):
    """16-bit q/k/v off the 16-byte grid run on the SIMT kernels; a last-dim stride other than 1 is copied by the
    op first. Both within the same tolerances."""
    assert cuda_attention.load() is None
    case = MATRIX[name]

    def fn(q, k, v, **kw):
        return cuda_fn(num_splits=2)(layout(q), layout(k), layout(v), **kw)

    results = check_case(case, dtype, device, fn)
    failed = {n: f"err {c.max_abs_error:.2e} > limit {c.limit:.2e}" for n, c in results.items() if not c.ok}
    assert not failed, f"{case.describe()} {dtype} {layout.__name__}: {failed}"


@pytest.mark.gpu
def test_public_api_runs_the_cuda_kernels(device):
    q, k, v = (torch.randn(2, 70, 4, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    out = pk.attention(q, k, v, causal=True, backend="cuda")
    torch.testing.assert_close(out, pk.attention(q, k, v, causal=True, backend="reference"), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_empty_gather(device):
    """kv_index of width 0: no key is seen; zeros out, -inf lse, zero gradients (no empty grid launched)."""
    q, k, v = (torch.randn(2, 8, 2, 32, device=device, dtype=torch.float16, requires_grad=True) for _ in range(3))
    kv_index = torch.empty(2, 0, dtype=torch.int64, device=device)
    out, lse = pk.attention(q, k, v, kv_index=kv_index, return_lse=True, backend="cuda")
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all((g == 0).all() for g in grads)


@pytest.mark.gpu
def test_compiles_without_graph_breaks(device):
    q, k, v = (torch.randn(2, 70, 4, 64, device=device, dtype=torch.float16, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        return pk.attention(q, k, v, causal=True, rotary_dim=32, backend="cuda").float().square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(step(q, k, v), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(dtype=torch.float64), "float32, float16 and bfloat16"),
        (dict(dqk=300), "head dims up to 256"),
        (dict(dv=264), "head dims up to 256"),
    ],
)
def test_unsupported_inputs_are_refused_with_the_reason(overrides, words, device):
    dtype, dqk, dv = overrides.get("dtype", torch.float16), overrides.get("dqk", 32), overrides.get("dv", 32)
    q, k = (torch.randn(2, 16, 2, dqk, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(2, 16, 2, dv, device=device, dtype=dtype)
    with pytest.raises(ValueError, match=f"backend='cuda' cannot run these inputs: .*{words}"):
        pk.attention(q, k, v, backend="cuda")
    pk.attention(q, k, v, backend="auto")  # auto runs them (Triton)
