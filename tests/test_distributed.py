"""perceiver_kernels.distributed: the merge of partial attentions (one process), and sharded_attention against
pk.attention on the whole problem, forward and every gradient, in gloo groups of 2 and 3 CPU processes
(the workers live in perceiver_kernels/distributed/testing.py, where spawned processes can import them)."""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.distributed import merge_attention, sharded_attention
from perceiver_kernels.distributed.testing import check_plan_error_on_every_rank, check_sharded_attention, spawn
from perceiver_kernels.testing import compare


def chunked(q, k, v, bounds, backend, **options):
    """``pk.attention`` of each key chunk ``[a, b)``: the partials a split or a shard would produce."""
    outs, lses = [], []
    for a, b in bounds:
        mask = options.get("key_padding_mask")
        part = dict(options, key_padding_mask=None if mask is None else mask[:, a:b])
        out, lse = pk.attention(q, k[:, a:b], v[:, a:b], backend=backend, return_lse=True, **part)
        outs.append(out)
        lses.append(lse)
    return outs, lses


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_merge_of_chunks_is_attention_over_all_keys(backend, dtype, device):
    """Chunks of 0, 1 and many keys, a chunk fully padded for one sample, a row padded everywhere in another
    sample's case: the merge equals attention over every key; empty rows stay zeros / -inf."""
    q, k, v = (torch.randn(s, device=device, dtype=dtype) for s in ((3, 5, 2, 16), (3, 19, 2, 16), (3, 19, 2, 24)))
    mask = torch.zeros(3, 19, dtype=torch.bool, device=device)
    mask[0, 4:11] = True  # the whole second chunk of sample 0
    mask[2] = True  # sample 2 sees no key at all
    bounds = [(0, 4), (4, 11), (11, 11), (11, 12), (12, 19)]
    out, lse = merge_attention(*chunked(q, k, v, bounds, backend, key_padding_mask=mask))
    ref_out, ref_lse = pk.attention(
        q.double(), k.double(), v.double(), key_padding_mask=mask, backend="reference", return_lse=True
    )
    assert compare(out, ref_out).ok and compare(lse, ref_lse, dtype=dtype).ok
    assert torch.equal(out[2], torch.zeros_like(out[2])) and bool((lse[2] == float("-inf")).all())


def test_merge_gradients():
    """float64 gradcheck of the merge in every part, and finite (zero) gradients through empty rows."""
    outs = torch.randn(3, 2, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    lses = torch.randn(3, 2, 2, 4, dtype=torch.float64)
    lses[1, 0, 0, 2] = lses[2, 1, 1, 3] = float("-inf")
    lses.requires_grad_()
    assert torch.autograd.gradcheck(lambda o, s: merge_attention(o, s), (outs, lses))
    empty = lses.detach().clone()
    empty[:, 0, 1, 0] = float("-inf")  # a row no part saw
    empty.requires_grad_()
    out, lse = merge_attention(outs, empty)
    (out.sum() + lse.masked_fill(lse == float("-inf"), 0).sum()).backward()
    assert torch.isfinite(empty.grad).all() and torch.isfinite(outs.grad).all()
    assert bool((lse[0, 1, 0] == float("-inf")).all()) and not out[0, 0, 1].any()


def test_merge_rejects_mismatched_parts():
    with pytest.raises(ValueError, match="do not match outs"):
        merge_attention(torch.zeros(2, 1, 3, 2, 4), torch.zeros(2, 1, 3, 2))


def test_sharded_attention_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        sharded_attention(torch.zeros(1, 2, 1, 4), torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))


CASES = {
    "uneven": dict(lengths=[5, 11]),
    "empty-rank": dict(lengths=[6, 0, 9], q_batch=1, dv=24),
    "causal-tail": dict(lengths=[7, 9], causal=True, nq=5, return_lse=True),
    "causal-tail-3": dict(lengths=[4, 6, 9], causal=True, nq=6, padding=[0, 1, 2, 3, 5]),
    "padding-rotary": dict(lengths=[8, 8], causal=True, padding=[1, 2, 3], rotary_dim=8),
    "rotary-positions": dict(lengths=[3, 10], rotary_dim=8, positions="explicit", return_lse=True),
    "kv-index": dict(lengths=[9, 7], kv_index=True, q_batch=1),
}


@pytest.mark.parametrize("backend, dtype", [("reference", "float64"), ("triton", "float32")])
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_attention_equals_attention_on_all_keys(name, backend, dtype):
    case = dict(CASES[name], backend=backend, dtype=dtype)
    spawn(check_sharded_attention, len(case["lengths"]), case)


def test_a_causal_plan_without_the_tail_on_one_rank_raises_on_every_rank():
    spawn(check_plan_error_on_every_rank, 2, [6, 2], 4)
