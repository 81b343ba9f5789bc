"""A few CUDA-backend calls for compute-sanitizer (memcheck, racecheck), run by gpu_check.sh:

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/sanitizer_cases.py

Small on purpose (the sanitizer slows kernels down a lot); each case covers a different path: partial
tiles, split-KV and its combine, causal early exit, padding and lengths, a broadcast query, wide heads,
rotary on load, the kv_index gather and scatter. Forward and backward; float32 and the odd head dims
run the SIMT kernels, the 16-bit cases with dims that are multiples of 8 the tensor-core ones."""

import torch

from perceiver_kernels.ops import cuda_attention
from perceiver_kernels.testing import AttentionCase, attention_options, backend_fn, make_inputs

CASES = [  # (case, forced key splits)
    (AttentionCase(batch=2, nq=33, nk=129, heads=2, dqk=24, dv=40), 1),
    (AttentionCase(batch=2, nq=5, nk=300, heads=2, dqk=64, dv=64), 3),
    (AttentionCase(batch=2, nq=100, nk=100, heads=2, dqk=64, dv=64, causal=True), 1),
    (AttentionCase(batch=3, q_batch=1, nq=20, nk=70, causal=True, pad_fraction=0.3), 2),
    (AttentionCase(batch=4, nq=17, nk=129, heads=1, dqk=128, dv=128, causal=True, kv_lengths=(0, 129, 40, 17)), 1),
    (AttentionCase(batch=2, nq=65, nk=200, heads=1, dqk=32, dv=128, pad_fraction=0.3), 4),
    (AttentionCase(batch=3, nq=17, nk=80, causal=True, rotary_dim=16, positions="left-pad"), 1),
    (AttentionCase(batch=3, nq=17, nk=150, causal=True, rotary_dim=16, prefix_dropout=True, pad_fraction=0.2), 2),
    (AttentionCase(batch=2, nq=19, nk=90, heads=2, dqk=36, dv=13, causal=True, rotary_dim=12), 2),
    (AttentionCase(batch=2, nq=17, nk=70, heads=1, dqk=200, dv=256, pad_fraction=0.2), 1),
]
# float16 runs the tensor-core kernels where they can (bfloat16 differs only in conversions), float32 the
# SIMT ones: both families, at about half the sanitizer time of all three dtypes.
DTYPES = (torch.float16, torch.float32)


def main() -> None:
    reason = cuda_attention.load()
    assert reason is None, reason
    torch.manual_seed(0)
    for case, splits in CASES:
        for dtype in DTYPES:
            inputs = make_inputs(case, dtype, "cuda")
            q, k, v = inputs["q"], inputs["k"], inputs["v"]
            options = attention_options(inputs)
            out, lse = backend_fn(cuda_attention.cuda_attention, splits)(q, k, v, **options)
            loss = (out * inputs["grad_out"]).sum() + (torch.where(torch.isfinite(lse), lse, 0.0)).sum()
            loss.backward()
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(q.grad).all(), case.describe()
    print(f"sanitizer cases: {len(CASES) * len(DTYPES)} forward and backward calls ran")


if __name__ == "__main__":
    main()
