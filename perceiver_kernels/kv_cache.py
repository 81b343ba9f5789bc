"""A preallocated KV cache for decoding: append rows in place, attend with ``kv_lengths``.

A decode step writes each sample's new key/value rows after its valid ones and calls
``attention(q, k_cache, v_cache, causal=True, kv_lengths=lengths)``: the causal mask aligns the new
queries with the last valid rows of every sample, and split-KV spreads the long cache over the GPU.
Nothing is reallocated between steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import tracing, value_checks_enabled


def append_to_cache(
    k_cache: Tensor,
    v_cache: Tensor,
    kv_lengths: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    check_capacity: bool | None = None,
) -> Tensor:
    """Write ``k_new``/``v_new`` into the caches at rows ``kv_lengths[b] + [0, n)`` of each sample.

    Args:
        k_cache: ``(B, capacity, H, Dqk)``, written in place.
        v_cache: ``(B, capacity, H, Dv)``, written in place.
        kv_lengths: int ``(B,)``, the valid rows of each sample before the append.
        k_new: ``(B, n, H, Dqk)``; v_new: ``(B, n, H, Dv)``, cast to the caches' dtype.
        check_capacity: verify that every sample has room (reads ``kv_lengths``, which is a device
            synchronisation on CUDA; skipped under ``torch.compile``). Default: the value-checks switch
            (``pk.set_value_checks``, off by default). Without it, an append out of ``[0, capacity)``
            (an overflow or a negative length) is an indexing error (on a GPU, a device-side assert),
            never a silent write elsewhere.

    Returns:
        ``kv_lengths + n``, a new tensor of ``kv_lengths``' dtype.
    """
    for name, cache, new in (("k", k_cache, k_new), ("v", v_cache, v_new)):
        if cache.dim() != 4 or new.dim() != 4:
            raise ValueError(f"{name}_cache and {name}_new must be 4-dim (B, N, H, D), got "
                             f"{tuple(cache.shape)} and {tuple(new.shape)}")  # fmt: skip
        if (new.shape[0], new.shape[2], new.shape[3]) != (cache.shape[0], cache.shape[2], cache.shape[3]):
            raise ValueError(f"{name}_new {tuple(new.shape)} does not fit {name}_cache {tuple(cache.shape)}")
        if new.device != cache.device or kv_lengths.device != cache.device:
            raise ValueError(f"{name}_cache, {name}_new and kv_lengths must share a device")
    batch, capacity = k_cache.shape[:2]
    num_new = k_new.shape[1]
    if v_cache.shape[:2] != (batch, capacity) or v_new.shape[1] != num_new:
        raise ValueError(f"k and v disagree: k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}, "
                         f"k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}")  # fmt: skip
    if kv_lengths.dtype not in (torch.int32, torch.int64) or tuple(kv_lengths.shape) != (batch,):
        raise ValueError(f"kv_lengths must be an int32/int64 tensor of shape ({batch},), got "
                         f"{kv_lengths.dtype} {tuple(kv_lengths.shape)}")  # fmt: skip
    if check_capacity is None:
        check_capacity = value_checks_enabled()
    if check_capacity and not tracing() and batch:
        if bool(((kv_lengths < 0) | (kv_lengths + num_new > capacity)).any()):
            raise ValueError(
                f"the cache holds {capacity} rows per sample; appending {num_new} to kv_lengths "
                f"{kv_lengths.tolist()} does not fit"
            )
    rows = kv_lengths.to(torch.int64)[:, None] + torch.arange(num_new, device=k_cache.device)  # (B, n)
    # A negative row would index from the end (a silent write into valid rows): make it out of range.
    rows = rows.masked_fill(rows < 0, capacity)
    samples = torch.arange(batch, device=k_cache.device)[:, None]
    k_cache[samples, rows] = k_new.to(k_cache.dtype)
    v_cache[samples, rows] = v_new.to(v_cache.dtype)
    return kv_lengths + num_new
