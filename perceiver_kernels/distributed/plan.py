"""Shard plans: which contiguous rows of an input (or a token sequence) each rank of a context group holds.

A plan splits an axis of ``length`` rows into one contiguous range per rank, in rank order, as evenly as
it can, with one constraint for Perceiver AR: the last ``tail`` rows (the latents, whose causal diagonal is
the only masked part of the cross-attention) all sit on the last rank. That rank then runs the ordinary
bottom-right ``causal=True`` on its own keys, and every other rank (whose keys all come before every latent)
runs unmasked; no shifted diagonal is needed anywhere.

Every rank computes the same plan from the same numbers (no communication), which is what lets
:func:`~perceiver_kernels.distributed.sharded_attention` skip its host synchronisation: the plan says how many
keys come before and after each rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def split_evenly(length: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``length``, differing by at most one (the larger ones first)."""
    base, extra = divmod(length, parts)
    return [base + (i < extra) for i in range(parts)]


@dataclass(frozen=True)
class ShardPlan:
    """One rank's view of a contiguous split of an axis over a group.

    Attributes:
        sizes: rows held by each rank, in rank order (sum: ``length``).
        rank: this rank's index in the group.
        group: the process group (None: the default group), handed to ``sharded_attention``.
    """

    sizes: tuple[int, ...]
    rank: int
    group: object = None

    @classmethod
    def balanced(cls, length: int, world_size: int, rank: int, *, tail: int = 0, group=None) -> ShardPlan:
        """An even split of ``length`` rows over ``world_size`` ranks whose last rank holds at least the last
        ``tail`` rows (Perceiver AR's latents). When an even share is smaller than ``tail``, the last rank holds
        exactly the tail and the rows before it are split evenly over the other ranks."""
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        if not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if not isinstance(tail, int) or not 0 <= tail <= length:
            raise ValueError(f"tail must be an int in [0, length={length}], got {tail!r}")
        sizes = split_evenly(length, world_size)[::-1]  # the smaller shares first: the tail rank has more work
        if sizes[-1] < tail:
            sizes = [*split_evenly(length - tail, world_size - 1)[::-1], tail] if world_size > 1 else [length]
        return cls(tuple(sizes), rank, group)

    @classmethod
    def for_group(cls, length: int, group=None, *, tail: int = 0) -> ShardPlan:
        """:meth:`balanced` for this process's rank in ``group`` (default: the world)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("a shard plan over a group needs an initialised torch.distributed process group")
        return cls.balanced(length, dist.get_world_size(group), dist.get_rank(group), tail=tail, group=group)

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def length(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        """This rank's first row (global index)."""
        return sum(self.sizes[: self.rank])

    @property
    def stop(self) -> int:
        """One past this rank's last row (global index)."""
        return self.start + self.sizes[self.rank]

    def bounds(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of every rank, in rank order."""
        stops = [sum(self.sizes[: r + 1]) for r in range(self.world_size)]
        return [(stop - size, stop) for size, stop in zip(self.sizes, stops, strict=True)]

    @property
    def rows_before(self) -> int:
        return self.start

    @property
    def rows_after(self) -> int:
        return self.length - self.stop

    def shard(self, x: Tensor | None, dim: int = 1) -> Tensor | None:
        """This rank's rows of ``x`` along ``dim`` (a view); None stays None. ``x.shape[dim]`` must be ``length``."""
        if x is None:
            return None
        if x.shape[dim] != self.length:
            raise ValueError(f"shard: x has {x.shape[dim]} rows along dim {dim}, the plan splits {self.length}")
        return x.narrow(dim, self.start, self.sizes[self.rank])

    def positions(self, device: torch.device | None = None) -> Tensor:
        """``(1, size)`` global row indices of this rank's rows."""
        return torch.arange(self.start, self.stop, device=device)[None]


def shard_sequence(x: Tensor, group=None, *, tail: int = 0, dim: int = 1) -> tuple[Tensor, ShardPlan]:
    """This rank's contiguous part of ``x`` along ``dim`` (e.g. ``(B, n)`` tokens or ``(B, M, C)`` an adapted
    input) under the :meth:`ShardPlan.balanced` split over ``group``, and the plan (which says the global rows
    it holds: ``plan.start``, ``plan.stop``, ``plan.positions()``). ``tail``: rows that must stay together on
    the last rank (Perceiver AR's latents)."""
    plan = ShardPlan.for_group(x.shape[dim], group, tail=tail)
    return plan.shard(x, dim), plan
