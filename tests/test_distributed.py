"""perceiver_kernels.distributed: the merge of partial attentions and shard plans (one process); sharded_attention
against pk.attention on the whole problem, forward and every gradient, in gloo groups of 2, 3 and 4 CPU
processes; errors raised alike on every rank; models on a data x context mesh under DDP and FSDP2 (the workers
live in perceiver_kernels/distributed/testing.py, where spawned processes can import them)."""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.distributed import ShardPlan, merge_attention, shard_sequence, sharded_attention
from perceiver_kernels.distributed.testing import (
    check_compiled_model,
    check_errors_on_every_rank,
    check_models_data_x_context,
    check_sharded_attention,
    spawn,
)
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


@pytest.mark.parametrize(
    "length, world, tail, sizes",
    [
        (10, 3, 0, (3, 3, 4)),  # even, the larger shares last
        (10, 3, 4, (3, 3, 4)),  # the tail fits in the last share
        (10, 3, 6, (2, 2, 6)),  # it does not: exactly the tail, the rest split evenly
        (3, 4, 0, (0, 1, 1, 1)),  # more ranks than rows: an empty shard
        (5, 2, 5, (0, 5)),  # all latents: the other rank holds nothing
        (7, 1, 3, (7,)),
    ],
)
def test_balanced_plans(length, world, tail, sizes):
    plans = [ShardPlan.balanced(length, world, rank, tail=tail) for rank in range(world)]
    assert all(plan.sizes == sizes for plan in plans)
    assert [(plan.start, plan.stop) for plan in plans] == plans[0].bounds()
    assert plans[-1].stop == length and plans[-1].sizes[-1] >= tail  # the tail on the last rank
    x = torch.arange(length)[None]
    assert torch.equal(torch.cat([plan.shard(x) for plan in plans], dim=1), x)
    assert all(torch.equal(plan.positions(), plan.shard(x)) for plan in plans)
    assert [plan.rows_before + plan.rows_after + plan.sizes[plan.rank] for plan in plans] == [length] * world


def test_plan_validation():
    for kwargs, message in [
        (dict(length=-1, world_size=2, rank=0), "length must be"),
        (dict(length=4, world_size=0, rank=0), "world_size must be"),
        (dict(length=4, world_size=2, rank=2), "rank must be"),
        (dict(length=4, world_size=2, rank=0, tail=5), "tail must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            ShardPlan.balanced(**kwargs)
    with pytest.raises(ValueError, match="the plan splits 4"):
        ShardPlan.balanced(4, 2, 0).shard(torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        shard_sequence(torch.zeros(1, 5))


def test_sharded_attention_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        sharded_attention(torch.zeros(1, 2, 1, 4), torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))


# Spawned gloo groups: one per world size, running all its cases (both backends) in turn, since starting the
# processes costs more than most cases. A failure names its case.
CASES = {
    "uneven": dict(lengths=[5, 11]),
    "causal-tail": dict(lengths=[7, 9], causal=True, nq=5, return_lse=True),
    "causal-crossing": dict(lengths=[7, 3], causal=True, nq=5, padding=[6, 8]),  # the latents straddle the ranks
    "padding-rotary": dict(lengths=[8, 8], causal=True, padding=[1, 2, 3], rotary_dim=8),
    "rotary-positions": dict(lengths=[3, 10], rotary_dim=8, positions="explicit", return_lse=True),
    "kv-index": dict(lengths=[9, 7], kv_index=True, q_batch=1),
    "empty-rank": dict(lengths=[6, 0, 9], q_batch=1, dv=24),
    "causal-tail-3": dict(lengths=[4, 6, 9], causal=True, nq=6, padding=[0, 1, 2, 3, 5]),
    # right-padded: sample 0's latents cross ranks 1 and 2, sample 1's sit on rank 1 (rank 2 has none of its keys)
    "kv-lengths-causal-3": dict(
        lengths=[6, 6, 6], causal=True, nq=5, kv_lengths=[16, 9], rotary_dim=8, return_lse=True
    ),
    "causal-4-planned": dict(
        lengths=[3, 0, 5, 8], causal=True, nq=6, q_batch=1, dqk=24, dv=8, padding=[2, 3, 9], rotary_dim=8, plan=True
    ),  # fmt: skip
    "kv-index-4": dict(lengths=[4, 6, 1, 5], kv_index=True, dv=12, heads=3, return_lse=True),
}
BACKENDS = [dict(backend="reference", dtype="float64"), dict(backend="triton", dtype="float32")]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharded_attention_equals_attention_on_all_keys(world_size):
    """Forward and every gradient against ``pk.attention`` on the whole problem, for every case whose shard
    lengths fit this world size, on the reference (float64) and Triton (float32) backends."""
    cases = [dict(case, name=name, **backend) for name, case in CASES.items() for backend in BACKENDS
             if len(case["lengths"]) == world_size]  # fmt: skip
    assert cases
    spawn(check_sharded_attention, world_size, cases)


def test_bad_layouts_raise_on_every_rank():
    spawn(check_errors_on_every_rank, 2)


MODEL_CASES = [
    dict(model="io", wrap="ddp", backend="reference", shared_block_execution="recompute"),
    dict(model="io", wrap="ddp", backend="reference", activation_checkpointing=True),
    dict(model="io", wrap="fsdp-layers", backend="reference", shared_block_execution="recompute"),  # per-layer units
    dict(model="io", wrap="fsdp", backend="reference", activation_checkpointing=True),
    dict(model="io", wrap="fsdp", backend="reference", length=1),  # one context rank holds no input at all
    dict(model="io", wrap="fsdp-bf16", backend="reference", shared_block_execution="recompute"),
    dict(model="ar", wrap="ddp", backend="reference"),
    dict(model="ar", wrap="fsdp", backend="reference", activation_checkpointing=True),
    dict(model="ar", wrap="fsdp-bf16", backend="reference", length=13),
    dict(model="ar", wrap="ddp", backend="triton", length=13),
]


@pytest.mark.long_running
def test_models_train_on_a_data_x_context_mesh():
    """A PerceiverIO and a CausalSequenceModel step on a 2 x 2 (data x context) mesh under DDP and FSDP2: every
    parameter's averaged gradient equals the single-process model's on the full batch and sequence."""
    spawn(check_models_data_x_context, 4, MODEL_CASES)


def test_compiled_context_parallel_model_is_one_graph():
    """torch.compile(fullgraph=True) of a context-parallel CausalSequenceModel step: the merge's collectives
    trace into the graph; logits and gradients equal the eager step's."""
    spawn(check_compiled_model, 2)
