"""A few CUDA-backend forward calls for compute-sanitizer (memcheck, racecheck), run by gpu_check.sh:

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/sanitizer_cases.py

Small on purpose (the sanitizer slows kernels down a lot); each case covers a different path: partial
tiles, split-KV and its combine, causal early exit, padding and lengths, a broadcast query, wide heads.
Only the CUDA forward runs here (the backward is the Triton kernels')."""

import torch

from perceiver_kernels.ops import cuda_attention

CASES = [
    # (batch, q_batch, nq, nk, heads, dqk, dv, causal, padding, kv_lengths, num_splits)
    (2, 2, 33, 129, 2, 24, 40, False, False, None, 1),
    (2, 2, 5, 300, 2, 64, 64, False, False, None, 3),
    (2, 2, 100, 100, 2, 64, 64, True, False, None, 1),
    (3, 1, 20, 70, 2, 32, 32, True, True, None, 2),
    (4, 4, 17, 129, 1, 128, 128, True, False, (0, 129, 40, 17), 1),
    (2, 2, 65, 200, 1, 32, 128, False, True, (200, 3), 4),
]


def main() -> None:
    reason = cuda_attention.load()
    assert reason is None, reason
    generator = torch.Generator(device="cuda").manual_seed(0)
    for batch, q_batch, nq, nk, heads, dqk, dv, causal, padding, lengths, splits in CASES:
        for dtype in (torch.float16, torch.bfloat16):

            def rand(b, n, d, dtype=dtype, heads=heads):
                return torch.randn(b, n, heads, d, device="cuda", generator=generator).to(dtype)

            q, k, v = (t.requires_grad_() for t in (rand(q_batch, nq, dqk), rand(batch, nk, dqk), rand(batch, nk, dv)))
            mask = torch.rand(batch, nk, device="cuda", generator=generator) < 0.3 if padding else None
            kv_lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
            out, lse = cuda_attention.cuda_attention(
                q, k, v, causal=causal, key_padding_mask=mask, kv_lengths=kv_lengths, scale=dqk**-0.5,
                num_splits=splits,
            )  # fmt: skip
            (out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(q.grad).all(), (batch, nq, nk, dqk, dv, dtype)
    print(f"sanitizer cases: {len(CASES) * 2} forward and backward calls ran")


if __name__ == "__main__":
    main()
