"""Multi-process checks of the sharded ops, on any machine: ``spawn`` starts a gloo process group of
``world_size`` CPU processes (``torch.multiprocessing`` spawn, ``file://`` rendezvous), and the ``check_*``
functions run in every rank and raise on a mismatch (spawned processes can only import workers from an
importable module, hence here and not in ``tests/``).

``check_sharded_attention`` is the contract: every rank builds the same global problem from one seed, keeps
its shard, and compares ``sharded_attention``'s output and gradients with ``pk.attention`` on the whole
problem (float64 reference), each rank with its own upstream gradient and the reference with their sum (the
gradient convention of :mod:`perceiver_kernels.distributed.sharded`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn: Callable, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in a gloo group; re-raises the
    first failure (with the rank's traceback)."""
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        mp.start_processes(_entry, args=(fn, world_size, init, args), nprocs=world_size, join=True,
                           start_method="spawn")  # fmt: skip


def _entry(rank: int, fn: Callable, world_size: int, init: str, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # A bounded timeout: a rank that skips a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _split(lengths: list[int], rank: int) -> slice:
    start = sum(lengths[:rank])
    return slice(start, start + lengths[rank])


def check_sharded_attention(rank: int, world_size: int, case: dict) -> None:
    """``case``: ``lengths`` (keys per rank), ``backend``, ``dtype`` (name), and optionally ``batch``, ``q_batch``,
    ``nq``, ``heads``, ``dqk``, ``dv``, ``causal``, ``padding`` (a list of global key indices padded in
    sample 0), ``rotary_dim``, ``positions`` ("default" or "explicit"), ``kv_index`` (keep every other row),
    ``return_lse``, ``seed``."""
    from ..functional import attention
    from ..testing import compare
    from .sharded import sharded_attention

    lengths = case["lengths"]
    assert len(lengths) == world_size, (lengths, world_size)
    dtype = getattr(torch, case["dtype"])
    batch, heads = case.get("batch", 2), case.get("heads", 2)
    q_batch, nq = case.get("q_batch", batch), case.get("nq", 4)
    dqk, dv, nk = case.get("dqk", 16), case.get("dv", 16), sum(lengths)
    generator = torch.Generator().manual_seed(case.get("seed", 0))

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = rand(q_batch, nq, heads, dqk), rand(batch, nk, heads, dqk), rand(batch, nk, heads, dv)
    grads_out = rand(world_size, batch, nq, heads, dv)
    grads_lse = rand(world_size, batch, heads, nq)
    options, local = {"causal": case.get("causal", False)}, {}
    mine = _split(lengths, rank)
    if "padding" in case:
        mask = torch.zeros(batch, nk, dtype=torch.bool)
        mask[0, case["padding"]] = True
        options["key_padding_mask"], local["key_padding_mask"] = mask, mask[:, mine]
    if case.get("rotary_dim"):
        options["rotary_dim"] = local["rotary_dim"] = case["rotary_dim"]
        if case.get("positions") == "explicit":  # left padding of sample 1 by 3: its positions start at -3
            k_pos = torch.arange(nk).repeat(batch, 1)
            k_pos[1] -= 3
            q_pos = k_pos[:, -nq:] + 1
            options.update(q_positions=q_pos, k_positions=k_pos)
            local.update(q_positions=q_pos, k_positions=k_pos[:, mine])
    if case.get("kv_index"):
        kept = [torch.arange(0, n, 2).expand(batch, -1) for n in lengths]
        local["kv_index"] = kept[rank].contiguous()
        offsets = [sum(lengths[:r]) for r in range(world_size)]
        options["kv_index"] = torch.cat([idx + off for idx, off in zip(kept, offsets, strict=True)], dim=1)

    # The reference: one process, the whole problem, float64, the summed upstream gradients.
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention(*ref_inputs, backend="reference", return_lse=True, **options)
    upstream = [(ref_out, grads_out.sum(0))]
    if case.get("return_lse"):
        upstream.append((ref_lse, grads_lse.sum(0).masked_fill(ref_lse == float("-inf"), 0)))
    torch.autograd.backward([t for t, _ in upstream], [g for _, g in upstream])
    ref_dq, ref_dk, ref_dv = (t.grad for t in ref_inputs)

    inputs = [t.to(dtype).requires_grad_() for t in (q, k[:, mine], v[:, mine])]
    out, lse = sharded_attention(*inputs, causal=options["causal"], backend=case["backend"], return_lse=True, **local)
    terms = [(out, grads_out[rank].to(dtype))]
    if case.get("return_lse"):
        terms.append((lse, grads_lse[rank].to(lse.dtype).masked_fill(lse == float("-inf"), 0)))
    torch.autograd.backward([t for t, _ in terms], [g for _, g in terms])
    dq = inputs[0].grad.double()
    dist.all_reduce(dq)  # the partials sum to the full dq

    for name, actual, expected in (
        ("out", out, ref_out), ("lse", lse, ref_lse), ("dq (summed)", dq.to(dtype), ref_dq),
        ("dk", inputs[1].grad, ref_dk[:, mine]), ("dv", inputs[2].grad, ref_dv[:, mine]),
    ):  # fmt: skip
        result = compare(actual, expected, dtype=dtype)
        if not result.ok:
            raise AssertionError(f"rank {rank}/{world_size}, {case}: {name} off by {result}")


def check_plan_error_on_every_rank(rank: int, world_size: int, lengths: list[int], num_queries: int) -> None:
    """A causal layout that needs a shifted diagonal (the tail split across ranks) raises the same error on
    every rank, before any rank enters the merge's collectives (else the others would wait forever)."""
    from .sharded import sharded_attention

    q = torch.randn(1, num_queries, 1, 8)
    k = v = torch.randn(1, lengths[rank], 1, 8)
    try:
        sharded_attention(q, k, v, causal=True, backend="reference")
    except ValueError as error:
        assert "a shifted causal diagonal is not supported" in str(error), error
    else:
        raise AssertionError(f"rank {rank}: no error for lengths {lengths}, Nq={num_queries}")
    dist.barrier()  # every rank got here: none is stuck in a collective
