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


def inverse_frequencies(rotary_dim: int, base: float, device: torch.device | str) -> Tensor:
    """float32 ``(rotary_dim / 2,)``."""
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    return 1.0 / (base**exponents)


def rotary_tables(positions: Tensor, rotary_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """``cos, sin``: float32 ``(*positions.shape, rotary_dim / 2)``, contiguous."""
    angles = positions.to(torch.float32)[..., None] * inverse_frequencies(rotary_dim, base, positions.device)
    return angles.cos(), angles.sin()


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
        q_positions = (query_index + (num_keys - num_queries))[None, :]
    else:
        q_positions = kv_lengths.to(device=device, dtype=torch.int64)[:, None] - num_queries + query_index
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
