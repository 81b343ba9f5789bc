"""Bad input raises a clear error naming the argument; backends that cannot run say why."""

import pytest
import torch

import perceiver_kernels as pk


def qkv(b=2, nq=3, nk=5, h=2, dqk=8, dv=8, dtype=torch.float32):
    return (
        torch.randn(b, nq, h, dqk, dtype=dtype),
        torch.randn(b, nk, h, dqk, dtype=dtype),
        torch.randn(b, nk, h, dv, dtype=dtype),
    )


def call(**overrides):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, backend="reference")
    args.update(overrides)
    return pk.attention(**args)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
        (dict(q=torch.randn(2, 3, 8)), ValueError, "q must have 4 dims"),
        (dict(k=torch.randn(2, 5, 2, 8, 1)), ValueError, "k must have 4 dims"),
        (dict(v=torch.randn(2, 5, 16)), ValueError, "v must have 4 dims"),
        (dict(q=torch.randn(2, 3, 2, 8, dtype=torch.float16)), TypeError, "share a dtype"),
        (dict(q=torch.randint(0, 3, (2, 3, 2, 8))), TypeError, "q has dtype"),
        (dict(q=torch.randn(3, 3, 2, 8)), ValueError, "q's batch must be 1"),
        (dict(q=torch.randn(2, 3, 4, 8)), ValueError, "q has 4 heads but k has 2"),
        (dict(q=torch.randn(2, 3, 2, 6)), ValueError, "q's head dim 6 must equal k's head dim 8"),
        (dict(v=torch.randn(2, 6, 2, 8)), ValueError, "v must be (B, Nk, H, Dv)"),
        (dict(v=torch.randn(3, 5, 2, 8)), ValueError, "v must be (B, Nk, H, Dv)"),
        (dict(q=torch.randn(2, 3, 8, 2).transpose(2, 3)), ValueError, "q must have a contiguous last dim"),
        (dict(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool tensor"),
        (dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (dict(kv_lengths=torch.tensor([1.0, 2.0])), TypeError, "kv_lengths must be an int32 or int64"),
        (dict(kv_lengths=torch.tensor([1, 2, 3])), ValueError, "kv_lengths must have shape"),
        (dict(kv_lengths=torch.tensor([1, 6])), ValueError, "kv_lengths values must lie in [0, Nk=5]"),
        (dict(kv_lengths=torch.tensor([-1, 2])), ValueError, "kv_lengths values must lie in"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(scale="0.5"), TypeError, "scale must be a float"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(return_lse=None), TypeError, "return_lse must be a bool"),
        (dict(backend="flash"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), ValueError, "backend='cuda' cannot run here: "),
    ],
)
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error) as info:
        call(**overrides)
    assert words in str(info.value)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="checks the message of a CPU-only machine")
def test_mixed_devices_are_rejected():
    # A meta tensor stands in for a second device on a machine without a GPU.
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        pk.attention(q, k.to("meta"), v, backend="reference")


def test_bfloat16_on_cpu_triton_says_why():
    q, k, v = qkv(dtype=torch.bfloat16)
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the CPU message is not the point")
    with pytest.raises(ValueError, match="cannot compute bfloat16 dot products"):
        pk.attention(q, k, v, backend="triton")
    # auto falls back to the reference instead of failing.
    out = pk.attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 2, 8)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        pk.attention(q, k, v, backend="triton")
    assert pk.resolve_backend("auto", q) == "reference"


def test_auto_picks_triton_where_it_runs():
    q, _, _ = qkv()
    expected = "triton"  # the test session runs the interpreter on CPU, compiled kernels on GPU
    assert pk.resolve_backend("auto", q.to("cuda") if torch.cuda.is_available() else q) == expected


def test_empty_batch_queries_and_keys():
    for shape_q, shape_k in (((0, 3, 2, 8), (0, 5, 2, 8)), ((2, 0, 2, 8), (2, 5, 2, 8)), ((2, 3, 2, 8), (2, 0, 2, 8))):
        q, k = torch.randn(shape_q), torch.randn(shape_k)
        v = torch.randn(*shape_k[:3], 4)
        for backend in ("reference", "auto"):
            out, lse = pk.attention(q, k, v, backend=backend, return_lse=True)
            assert out.shape == (shape_k[0], shape_q[1], 2, 4)
            assert lse.shape == (shape_k[0], 2, shape_q[1])
            if shape_k[1] == 0:  # no keys at all: zero rows, lse -inf
                assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.gpu
def test_float64_on_gpu_says_why():
    q, k, v = (t.cuda() for t in qkv(dtype=torch.float64))
    with pytest.raises(ValueError, match="no float64 matrix product on GPUs"):
        pk.attention(q, k, v, backend="triton")
    assert pk.resolve_backend("auto", q) == "reference"
