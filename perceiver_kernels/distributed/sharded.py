"""``sharded_attention``: attention over keys split across the ranks of a process group, exchanging only the
small per-rank partials (out, lse), never the keys.

Forward: every rank attends its local keys with the ordinary kernels (``pk.attention(..., return_lse=True)``),
all-gathers the lse ``(B, H, Nq)`` and all-reduces its weighted partial output ``(B, Nq, H, Dv)`` in float32:
``O(B x H x Nq x Dv)`` traffic per call, against ``O(Nk x D)`` for ring attention's K/V rotation.

Backward, and the gradient convention. The merge's backward all-reduces (sums) the upstream ``[dO | dlse]``
of all ranks, then backpropagates through the local attention with ``d out_r = w_r dO`` and
``d lse_r = w_r (dlse + <dO, out_r - out>)``: the local backward kernel then forms exactly the global
``P`` and ``delta`` for its keys. Each rank's dk/dv (and so the gradients of whatever made
its keys: the key/value projections, the input adapter) are those of the summed upstream gradient; each
rank's dq is its partial, and the partials sum to the full dq. With every rank computing the same loss on
replicated latents (the model's usual layout), that makes plain gradient *averaging* over the data x
context group (DDP, FSDP2) exact for every parameter: a replicated parameter's R rank gradients average to
the full one, and a shard-local parameter's is R times its local share, which the average divides back.
Outside such averaging, sum dq over the group (or scale dk/dv by 1/R) to get single-process gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import attention
from ..problem import tracing, value_checks_enabled
from .merge import merge_weights

# all_gather_single is the name from torch 2.14 on (all_gather_into_tensor warns there); the package supports 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather_into(output: Tensor, tensor: Tensor, group) -> None:
    """All ranks' ``tensor`` concatenated along dim 0 into ``output``."""
    _all_gather_single(output, tensor, group=group)


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sharded_attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")  # fmt: skip
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("sharded_attention: group does not contain this process")
    return rank, dist.get_world_size(group)


class _MergeAcrossRanks(torch.autograd.Function):
    """``(out_r (B, Nq, H, Dv), lse_r (B, H, Nq))`` of this rank -> the merged ``(out, lse)`` of all ranks."""

    @staticmethod
    def forward(ctx, out_r: Tensor, lse_r: Tensor, group, *anchors: Tensor) -> tuple[Tensor, Tensor]:
        # ``anchors`` (q, k, v) only tie the outputs into the graph: a rank whose shard is empty (or fully
        # masked) has an out_r that depends on nothing, yet its backward must run, or the others' all-reduce
        # waits for it forever.
        world = dist.get_world_size(group)
        lses = lse_r.new_empty((world * lse_r.shape[0], *lse_r.shape[1:]))  # ranks concatenated on dim 0
        _all_gather_into(lses, lse_r.contiguous(), group)
        lse, weights = merge_weights(lses.view(world, *lse_r.shape))
        weight = weights[dist.get_rank(group)]  # (B, H, Nq)
        acc = torch.promote_types(out_r.dtype, torch.float32)  # float32, float64 for float64 (verification)
        out = weight.to(acc).transpose(1, 2).unsqueeze(-1) * out_r.to(acc)
        dist.all_reduce(out, group=group)
        ctx.save_for_backward(out_r, out, weight)
        ctx.group, ctx.num_anchors = group, len(anchors)
        # Nothing local depends on the inputs: their gradients are zeros (not None, which DDP would miss).
        ctx.anchor_zeros = [] if out_r.requires_grad else [(a.shape, a.dtype, a.device) for a in anchors]
        ctx.set_materialize_grads(False)
        return out.to(out_r.dtype), lse

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
        out_r, out, weight = ctx.saved_tensors
        # The convention: every rank continues with the sum of all ranks' upstream gradients.
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype)
        grad_lse = torch.zeros_like(weight) if grad_lse is None else grad_lse.to(weight.dtype)
        flat = torch.cat((grad_out.reshape(-1), grad_lse.to(out.dtype).reshape(-1)))
        dist.all_reduce(flat, group=ctx.group)
        grad_out, grad_lse = flat[: out.numel()].view_as(out), flat[out.numel() :].view_as(weight).to(weight.dtype)
        # out = sum_r w_r out_r with w_r = exp(lse_r - lse), lse = logsumexp_r lse_r:
        #   d out_r = w_r dO,   d lse_r = w_r (dlse + <dO, out_r - out>)  (over Dv, per head and query).
        w = weight.to(out.dtype).transpose(1, 2).unsqueeze(-1)  # (B, Nq, H, 1)
        grad_out_r = (w * grad_out).to(out_r.dtype)
        inner = (grad_out * (out_r.to(out.dtype) - out)).sum(dim=-1).transpose(1, 2).to(weight.dtype)  # (B, H, Nq)
        grad_lse_r = weight * (grad_lse + inner)
        anchors = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.anchor_zeros]
        anchors = anchors or [None] * ctx.num_anchors
        return grad_out_r, grad_lse_r, None, *anchors


def sharded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    kv_lengths: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    rotary_dim: int = 0,
    q_positions: Tensor | None = None,
    k_positions: Tensor | None = None,
    rotary_base: float = 10000.0,
    rotary_interleaved: bool = True,
    kv_index: Tensor | None = None,
    keys_before: int | None = None,
    keys_after: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of the (replicated) queries over the keys of all ranks of ``group``.

    Contract: on every rank, the result equals :func:`perceiver_kernels.attention` on the concatenation of all
    ranks' keys (and values, padding masks, kept-row lists) in rank order. Every rank must call it, with the
    same ``q`` and options; shards may differ in length and may be empty. Gradients follow the convention
    in the module docstring (exact under DDP/FSDP2 averaging).

    Args:
        q: ``(Bq, Nq, H, Dqk)``, the same on every rank.
        k, v: this rank's shard ``(B, Nk_r, H, Dqk)``, ``(B, Nk_r, H, Dv)``.
        group: the process group (default: the world).
        causal: bottom-right causal over the concatenated keys, for any layout: a rank whose keys are
            followed by others runs its local causal mask with the diagonal moved by them
            (``pk.attention``'s ``keys_after``), or none when its keys all lie before the latents.
        key_padding_mask: this shard's bool ``(B, Nk_r)``. kv_lengths: this shard's valid rows ``(B,)``: the
            concatenation of every rank's valid keys, with their sum as its ``kv_lengths`` (a right-padded
            sequence split across ranks: its valid tail may cross shards). With ``causal`` or default rotary
            positions the ranks' lengths are all-gathered (a collective, no host synchronisation).
            kv_index: this shard's kept rows ``(B, Nk_r')`` (local indices).
        rotary_dim, q_positions, k_positions, rotary_base, rotary_interleaved: as in ``pk.attention``, with
            global positions: ``k_positions`` defaults to the keys' places in the concatenation and
            ``q_positions`` to its last ``Nq`` places, or the last ``Nq`` before each sample's total valid
            length with ``kv_lengths`` (with ``kv_index``, give both).
        keys_before, keys_after: how many attended keys the ranks before and after this one hold (on the
            kept axis with ``kv_index``; a :class:`ShardPlan`'s ``rows_before`` / ``rows_after``). Needed only
            for ``causal`` or default rotary positions. When not given they are all-gathered with a layout
            check (a host synchronisation): head dims, dtypes and options that differ across ranks then raise
            on every rank alike. Given, they must come
            from one plan valid on all ranks: a rank that raises alone leaves the others waiting in the
            collective. Under value checks (:func:`~perceiver_kernels.set_value_checks`) the layout is always
            exchanged and checked, with a checksum of ``q`` (which must be replicated). Under
            ``torch.compile`` nothing is exchanged: give them whenever they are needed (the models do).
        scale, backend, return_lse: as in ``pk.attention``.

    Returns:
        ``out (B, Nq, H, Dv)`` in q's dtype (and ``lse (B, H, Nq)`` float32), the same on every rank.
    """
    rank, _ = _world(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"sharded_attention: {name} must be a (batch, rows, heads, head_dim) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")  # fmt: skip
    attended = k.shape[1] if kv_index is None else kv_index.shape[1]
    num_queries = q.shape[1]
    counts = None
    need_counts = causal or (rotary_dim and (q_positions is None or k_positions is None))
    missing = need_counts and (keys_before is None or keys_after is None)
    if missing and tracing():  # the exchange reads values on the host
        raise ValueError("sharded_attention: under torch.compile (or tracing) pass keys_before and keys_after "
                         "(e.g. from a ShardPlan) for causal or default rotary positions")  # fmt: skip
    if missing or (value_checks_enabled() and not tracing()):
        layout = (bool(causal), scale, rotary_dim, rotary_base, bool(rotary_interleaved))
        counts = _exchange_layout(q, k, v, attended, layout, group)
        keys_before, keys_after = sum(counts[:rank]), sum(counts[rank + 1 :])
    if rotary_dim and (q_positions is None or k_positions is None) and kv_index is not None:
        # positions count original rows, the neighbours' counts kept ones
        raise ValueError("sharded_attention: rotary with kv_index needs explicit q_positions and k_positions")
    lengths = None  # (world, B): every rank's valid keys per sample
    if kv_lengths is not None and (causal or (rotary_dim and q_positions is None)):
        lengths = _gather_lengths(kv_lengths, attended, group)
    local_causal, shift = causal, None
    if causal and lengths is not None:  # each sample's diagonal counts the later ranks' valid keys
        shift = lengths[rank + 1 :].sum(0)
    elif causal and keys_after >= num_queries:  # every local key lies before the first latent: no mask
        local_causal = False
    elif causal and keys_after > 0:  # the latents start on this rank and go on beyond it
        shift = torch.full((k.shape[0],), keys_after, dtype=torch.int64, device=q.device)
    if rotary_dim and k_positions is None:
        k_positions = (torch.arange(attended, device=q.device) + keys_before)[None]
    if rotary_dim and q_positions is None:
        queries = torch.arange(num_queries, device=q.device)
        if lengths is None:
            q_positions = (queries + (keys_before + attended + keys_after - num_queries))[None]
        else:
            q_positions = (lengths.sum(0) - num_queries)[:, None] + queries
    out_r, lse_r = attention(
        q, k, v, local_causal, key_padding_mask, kv_lengths, scale, backend, True, rotary_dim=rotary_dim,
        q_positions=q_positions, k_positions=k_positions, rotary_base=rotary_base,
        rotary_interleaved=rotary_interleaved, kv_index=kv_index, keys_after=shift,
    )  # fmt: skip
    out, lse = _MergeAcrossRanks.apply(out_r, lse_r, group, q, k, v)
    return (out, lse) if return_lse else out


# What every rank must pass alike, in one float64 vector (exact for ints below 2**53): the query's shape,
# the head dims, the dtypes and the options; ``[0]`` is the rank's own key count, ``[-2:]`` q's checksum.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _gather_lengths(kv_lengths: Tensor, attended: int, group) -> Tensor:
    """Every rank's ``kv_lengths`` (clamped to its key count, as its kernels clamp them): ``(world, B)`` int64, on
    the device (a collective, no host synchronisation)."""
    world = dist.get_world_size(group)
    mine = kv_lengths.to(torch.int64).clamp(0, attended).contiguous()
    lengths = mine.new_empty((world * mine.shape[0],))
    _all_gather_into(lengths, mine, group)
    return lengths.view(world, -1)


def _exchange_layout(q: Tensor, k: Tensor, v: Tensor, attended: int, options: tuple, group) -> list[int]:
    """All-gather every rank's key count with what must agree across ranks, and raise on every rank alike when
    something differs (one rank raising alone would leave the others waiting in the merge's collectives).
    Under value checks (:func:`~perceiver_kernels.set_value_checks`) q's values are compared too, by a
    checksum. One small all-gather and a host synchronisation; the key counts it returns, in rank order."""
    causal, scale, rotary_dim, rotary_base, interleaved = options
    dtype_code = lambda t: _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1  # noqa: E731
    fields = [
        attended, *q.shape, k.shape[0], k.shape[2], k.shape[3], v.shape[0], v.shape[2], v.shape[3], dtype_code(q),
        dtype_code(k), dtype_code(v), causal, -1.0 if scale is None else scale, rotary_dim, rotary_base, interleaved,
    ]  # fmt: skip
    names = ["keys", "q batch", "Nq", "heads", "Dqk", "k batch", "k heads", "Dqk of k", "v batch", "v heads", "Dv",
             "q dtype", "k dtype", "v dtype", "causal", "scale", "rotary_dim", "rotary_base",
             "rotary_interleaved"]  # fmt: skip
    checksum = [0.0, 0.0]
    if value_checks_enabled() and not q.is_meta:
        q64 = q.detach().double()
        checksum = [q64.sum().item(), q64.abs().sum().item()]
    backend_device = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor(fields + checksum, dtype=torch.float64, device=backend_device)
    world = dist.get_world_size(group)
    table = mine.new_empty(world * mine.numel())
    _all_gather_into(table, mine, group)
    table = table.view(world, -1).cpu()
    for column, name in enumerate(names[1:], start=1):
        values = table[:, column]
        if not bool((values == values[0]).all()):
            raise ValueError(f"sharded_attention: every rank must pass the same {name}; the ranks passed "
                             f"{[_show(x, name) for x in values.tolist()]}")  # fmt: skip
    sums, magnitudes = table[:, -2], table[:, -1]
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-6 * float(magnitudes.max()) + 1e-30,
                          equal_nan=True):  # fmt: skip
        raise ValueError(f"sharded_attention: q differs across ranks (checksums {sums.tolist()}); the queries must "
                         "be replicated (the same latents on every rank of the group)")  # fmt: skip
    return [int(n) for n in table[:, 0].tolist()]


def _show(value: float, name: str):
    if "dtype" in name:
        return str(_DTYPES[int(value)]) if value >= 0 else "other"
    return int(value) if float(value).is_integer() and name != "scale" else value
