"""Rotary position embeddings: the angle tables shared by the reference and the kernels.

Pair ``i`` (of ``rotary_dim / 2``) at position ``p`` turns by ``p * base ** (-2i / rotary_dim)``; the
inverse frequencies are computed as perceiver-io does (``1 / base ** (arange(0, R, 2) / R)``) and the
angles in float32, whatever the model dtype, so half-precision models do not lose position accuracy.
Pairs are channels ``(2i, 2i + 1)`` when interleaved (perceiver-io, GPT-J) and ``(i, i + R/2)``
otherwise (GPT-NeoX); a pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import causal_offset, tracing


def inverse_frequencies(rotary_dim: int, base: float, device: torch.device | str | None) -> Tensor:
    """float32 ``(rotary_dim / 2,)`` on ``device`` (None: the default device)."""
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    return 1.0 / (base**exponents)


def rotary_tables(positions: Tensor, rotary_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """``cos, sin``: float32 ``(*positions.shape, rotary_dim / 2)``, contiguous."""
    angles = positions.to(torch.float32)[..., None] * inverse_frequencies(rotary_dim, base, positions.device)
    return angles.cos(), angles.sin()


def rope_table(positions: Tensor, rotary_dim: int, base: float) -> Tensor:
    """The kernels' table: float32 ``(2, *positions.shape, rotary_dim / 2)``, cos then sin (the same values
    as :func:`rotary_tables`)."""
    return torch.stack(rotary_tables(positions, rotary_dim, base))


# Tables of the default positions, per (device, rotary_dim, base): positions [-P, P) at rows [0, 2P).
_position_tables: dict[tuple, Tensor] = {}
# Tables a larger one replaced, kept alive: a captured CUDA graph (or a saved backward) may still read them,
# and they add up to less than the live one (sizes double).
_retired_tables: list[Tensor] = []


def _cacheable(device: torch.device) -> bool:
    """Whether a table built now may be kept: not while tracing (symbolic tensors) nor while a CUDA graph
    is captured (its kernels would only run on replay)."""
    return not (tracing() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()))


def _position_table(device: torch.device, rotary_dim: int, base: float, reach: int) -> tuple[Tensor, int]:
    """``(table (2, 1, 2P, rotary_dim / 2), P)`` covering positions ``[-P, P)``, ``P >= reach``, cached
    and grown by powers of two (see :func:`_cacheable`). Built outside inference mode, so that a table first
    made under ``torch.inference_mode()`` can later be saved for a backward."""
    key = (device, rotary_dim, base)
    cacheable = _cacheable(device)
    table = _position_tables.get(key) if cacheable else None
    if table is not None and table.shape[2] >= 2 * reach:
        return table, table.shape[2] // 2
    half = max(256, 1 << max(0, reach - 1).bit_length())
    if not cacheable:
        return rope_table(torch.arange(-half, half, device=device)[None], rotary_dim, base), half
    with torch.inference_mode(False), torch.no_grad():
        new = rope_table(torch.arange(-half, half, device=device)[None], rotary_dim, base)
    if table is not None:
        _retired_tables.append(table)
    _position_tables[key] = new
    return new, half


def rope_tables(problem) -> tuple[Tensor, Tensor]:
    """``(q_table, k_table)`` of a rotary :class:`~perceiver_kernels.problem.AttentionProblem`: float32
    ``(2, 1 or B, Nq, rotary_dim / 2)`` and ``(2, 1 or B, Nk, rotary_dim / 2)`` for the positions of the
    queries and of the (original, ungathered) key rows. Default positions (see :func:`default_positions`)
    are views of a cached table, or, with per-sample ``kv_lengths``, one gather from it; given positions
    are turned into tables per call."""
    q, k, rotary_dim, base = problem.q, problem.k, problem.rotary_dim, problem.rotary_base
    num_queries, num_rows = q.shape[1], k.shape[1]
    q_positions, k_positions = problem.q_positions, problem.k_positions
    if q_positions is not None and k_positions is not None:
        return rope_table(q_positions, rotary_dim, base), rope_table(k_positions, rotary_dim, base)
    table, half = _position_table(q.device, rotary_dim, base, max(num_rows, num_queries))
    # narrow, not slicing: tensor __getitem__ parses its index in Python, several microseconds a call.
    k_table = table.narrow(2, half, num_rows) if k_positions is None else rope_table(k_positions, rotary_dim, base)
    if q_positions is not None:
        q_table = rope_table(q_positions, rotary_dim, base)
    elif problem.kv_lengths is None or problem.kv_index is not None:
        q_table = table.narrow(2, half + causal_offset(num_rows, num_queries), num_queries)
    else:  # per sample: the last Nq of the sample's valid keys (clamped as the kernels clamp them)
        rows = problem.kv_lengths.clamp(0, num_rows).unsqueeze(1) + _query_offsets(q.device, num_queries, half)
        batch = rows.shape[0]
        # index_select, not advanced indexing: a few microseconds less per decode step.
        q_table = table.index_select(2, rows.view(-1)).view(2, batch, num_queries, rotary_dim // 2)
    return q_table, k_table


_offsets: dict[tuple, Tensor] = {}


def _query_offsets(device: torch.device, num_queries: int, half: int) -> Tensor:
    """``arange(Nq) + half - Nq`` (int64), cached (see :func:`_cacheable`): query ``i``'s table row is
    ``L_b`` plus this."""
    key = (device, num_queries, half)
    cacheable = _cacheable(device)
    offsets = _offsets.get(key) if cacheable else None
    if offsets is not None:
        return offsets
    if not cacheable:
        return torch.arange(num_queries, device=device) + (half - num_queries)
    with torch.inference_mode(False):
        offsets = _offsets[key] = torch.arange(num_queries, device=device) + (half - num_queries)
    return offsets


def default_positions(
    batch: int, num_queries: int, num_keys: int, kv_lengths: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``q_positions (1 or B, Nq)`` and ``k_positions (1, Nk)`` when the caller gives none.

    Key ``j`` sits at position ``j``; the queries are the last ``Nq`` positions of the keys' sequence
    (Perceiver AR's latents): ``L - Nq + i`` with ``L = kv_lengths[b]`` when lengths are given (a
    preallocated cache: the queries follow the valid keys, as the causal mask aligns them), else ``Nk``.
    """
    query_index = torch.arange(num_queries, device=device)
    if kv_lengths is None:
        q_positions = (query_index + causal_offset(num_keys, num_queries))[None, :]
    else:
        lengths = kv_lengths.to(device=device, dtype=torch.int64).clamp(0, num_keys)  # as the kernels clamp them
        q_positions = causal_offset(lengths, num_queries)[:, None] + query_index
    return q_positions, torch.arange(num_keys, device=device)[None, :]


def rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool, inverse: bool = False) -> Tensor:
    """Plain-PyTorch rotation of the first ``rotary_dim`` channels of ``x (B, N, H, D)``.

    ``cos``/``sin`` are ``(1 or B, N, rotary_dim / 2)`` tables; ``inverse`` turns the other way (the
    transpose, used for gradients). Computed in float32 (float64 for float64 input), returned in
    ``x``'s dtype. This is the reference the Triton rotary kernel is checked against.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos[:, :, None, :].to(compute), sin[:, :, None, :].to(compute)  # over heads
    if inverse:
        sin = -sin
    rot, rest = x[..., :rotary_dim].to(compute), x[..., rotary_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    a_new, b_new = a * cos - b * sin, b * cos + a * sin
    if interleaved:
        rot = torch.stack((a_new, b_new), dim=-1).flatten(-2)
    else:
        rot = torch.cat((a_new, b_new), dim=-1)
    # A batch-1 x turned by per-sample tables becomes per-sample: the pass-through channels follow.
    return torch.cat((rot.to(x.dtype), rest.expand(*rot.shape[:-1], rest.shape[-1])), dim=-1)
