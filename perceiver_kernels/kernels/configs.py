"""Block sizes and launch heuristics for the Triton kernels: the one place they are chosen.

Head dims are handled in chunks. A head dim of at most ``MAX_FAST_HEAD_DIM`` is one power-of-two chunk
(the fast path: q, k, v tiles stay in registers across the key loop). Above it the kernels loop over
fixed-width chunks of the qk dim and spread chunks of the v dim over the grid, so any head dim up to
1024 runs with bounded registers (see docs/DESIGN.md).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

MAX_FAST_HEAD_DIM = 256
# Chunk widths used above MAX_FAST_HEAD_DIM.
QK_CHUNK = 64
V_CHUNK = 128


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse, delta and the dQ accumulator: float32, or float64 for float64 verification runs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when ``triton.language`` is imported, so it must be set before that;
    this package does not import triton until a kernel first runs.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def contiguous_strides(shape) -> tuple[int, ...]:
    """The strides ``torch.empty(shape)`` has."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class HeadDimTiling:
    """How one head dim is cut into power-of-two chunks."""

    block: int  # chunk width (power of two, >= 16)
    num_chunks: int


def head_dim_tiling(head_dim: int, chunk_above_fast: int) -> HeadDimTiling:
    if head_dim <= MAX_FAST_HEAD_DIM:
        return HeadDimTiling(max(16, next_power_of_2(head_dim)), 1)
    return HeadDimTiling(chunk_above_fast, cdiv(head_dim, chunk_above_fast))


def aligned_head_dim(head_dim: int, chunk_above_fast: int) -> int:
    """The head dim the kernels run on: a multiple of 16 (of the chunk width above the fast path).

    Rows whose length is not a multiple of 16 elements start at unaligned addresses, and Triton then
    falls back to scalar loads: the 261-wide ImageNet head ran 2x slower than the materialising
    reference that way on an H200. Zero-padding the inputs once (a copy of k and v) restores 16-byte
    vector loads and removes the head-dim masks; the zeros add nothing to q.k or to the output.
    """
    multiple = 16 if head_dim <= MAX_FAST_HEAD_DIM else chunk_above_fast
    return cdiv(head_dim, multiple) * multiple


DECODE_MAX_QUERIES = 16


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per program
    block_n: int  # key rows per program (backward) or per loop step (forward)
    num_warps: int
    num_stages: int


def forward_config(
    head_dim_qk: int,
    head_dim_v: int,
    causal: bool,
    is_cuda: bool,
    num_queries: int | None = None,
    *,
    element_size: int = 2,
    rotary: bool = False,
) -> LaunchConfig:
    """Forward tile shape, chosen by the wider of the two head-dim tiles, the query count, the input's
    element size and rotary.

    16-bit, D <= 64: from a sweep on an H200 (benchmarks/results/core-h200-2026-11-26-run2.json): 8 warps
    won on the non-causal cross-attention shapes, 4 warps on the causal one, where the masked diagonal
    blocks favour more programs in flight. Everything else was chosen with the static kernel report
    (``perceiver-kernels kernels``, sm_90a: no spills, shared memory within the card's limit) and is not
    yet timed on a GPU: rotary reloads each tile's pair partners, which takes more pipelined shared
    memory (hence fewer stages at D = 128 and smaller tiles at D = 256), and float32 goes through 3xTF32
    (see ``common.dot_precision``) with operands twice as wide. Decoding (at most ``DECODE_MAX_QUERIES``
    queries) takes the smallest query tile ``tl.dot`` allows, so one query row does not pay for 128, and
    long key steps, since it only streams K/V (two stages: with three, ptxas spilled and decode-rotary
    needed 210 KiB of shared memory).
    """
    if not is_cuda:
        # The interpreter pays per program and per loop step; small tiles keep awkward test shapes
        # exercising partial blocks.
        return LaunchConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    widest = max(head_dim_tiling(head_dim_qk, QK_CHUNK).block, head_dim_tiling(head_dim_v, V_CHUNK).block)
    decode = num_queries is not None and num_queries <= DECODE_MAX_QUERIES
    if element_size >= 4:
        if decode:
            return LaunchConfig(block_m=16, block_n=64 if widest <= 64 else 32, num_warps=4, num_stages=2)
        if widest <= 64:
            return LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
        return LaunchConfig(block_m=32, block_n=32 if widest <= 128 else 16, num_warps=4, num_stages=2)
    if decode:
        block_n = 128 if widest <= 64 else 64 if widest <= 128 else 32
        return LaunchConfig(block_m=16, block_n=block_n, num_warps=4, num_stages=2)
    if widest <= 64:
        return LaunchConfig(block_m=128, block_n=64, num_warps=4 if causal else 8, num_stages=3)
    if widest <= 128:
        return LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=2 if rotary else 3)
    if rotary:
        return LaunchConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    return LaunchConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)


@dataclass(frozen=True)
class BackwardConfig:
    """Backward tiles. dK/dV programs own ``block_n`` keys and step over ``block_m`` queries.

    ``dq_mode`` picks how dQ is formed (docs/DESIGN.md): ``"atomic"`` adds each key block's share into
    a float32 buffer from the dK/dV kernel (5 matmuls in all, atomics contend on the few query rows
    of a Perceiver problem); ``"split"`` runs a second kernel parallel over query blocks and key
    splits (2 recomputed matmuls, no atomics, deterministic). Head dims above the fast path always
    use atomics.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dq_mode: str = "split"
    dq_block_m: int = 64
    dq_block_n: int = 64
    dq_num_warps: int = 4
    dq_num_stages: int = 2


def backward_config(
    head_dim_qk: int, head_dim_v: int, is_cuda: bool, *, element_size: int = 2, rotary: bool = False
) -> BackwardConfig:
    """Backward tiles. 16-bit D <= 64 from the H200 sweep (split dQ beat atomics by 1.5-2x on every
    shape); the rest chosen by the static kernel report as for :func:`forward_config`."""
    if not is_cuda:
        return BackwardConfig(16, 16, 4, 1, dq_block_m=16, dq_block_n=16, dq_num_stages=1)
    widest = max(head_dim_tiling(head_dim_qk, QK_CHUNK).block, head_dim_tiling(head_dim_v, V_CHUNK).block)
    if element_size >= 4:
        if widest <= 64:
            return BackwardConfig(32, 32, 8, 2, "split", dq_block_m=32, dq_block_n=32, dq_num_warps=8, dq_num_stages=2)
        if widest <= 128:
            return BackwardConfig(32, 32, 8, 1, "split", dq_block_m=32, dq_block_n=32, dq_num_warps=8, dq_num_stages=1)
        return BackwardConfig(32, 16, 8, 1, "split", dq_block_m=16, dq_block_n=32, dq_num_warps=4, dq_num_stages=1)
    if widest <= 64:
        return BackwardConfig(64, 64, 4, 3, "split", dq_block_m=128, dq_block_n=32, dq_num_warps=4, dq_num_stages=3)
    if widest <= 128:
        block_n = 32 if rotary else 64  # rotary's partner loads: 64 keys spilled (sm_90a)
        return BackwardConfig(64, block_n, 8, 2, "split", dq_block_m=64, dq_block_n=64, dq_num_warps=8, dq_num_stages=2)
    if head_dim_tiling(head_dim_qk, QK_CHUNK).block <= 64:  # narrow qk, wide v (the MLM's 32/160)
        return BackwardConfig(32, 64, 8, 1, "split", dq_block_m=64, dq_block_n=32, dq_num_warps=8, dq_num_stages=1)
    # Both wide: 32 keys per program (64 spilled ~1 KiB). (With the narrow qk above, ptxas gave the 32-key
    # dK/dV kernel 32 registers and 10 KiB of spills.)
    return BackwardConfig(32, 32, 8, 1, "split", dq_block_m=32, dq_block_n=32, dq_num_warps=4, dq_num_stages=1)


# The static kernel report (perceiver_kernels/bench/kernel_report.py) plans launches for a GPU that is not there:
# inside planning_for_gpu(sms) every device is planned as a GPU with that many SMs.
_planned_sms: int | None = None


def set_planned_gpu(sms: int | None) -> int | None:
    """Plan every launch as for a GPU with ``sms`` SMs (None: plan for the actual device); returns the
    previous setting. Only for compiling kernels without a GPU: launch plans are cached per input
    signature, so the caller clears those caches around it (kernel_report.py does)."""
    global _planned_sms
    previous, _planned_sms = _planned_sms, sms
    return previous


def targets_gpu(device: torch.device) -> bool:
    """Whether launches for ``device`` get GPU tiles (else the interpreter's small ones)."""
    return device.type == "cuda" or _planned_sms is not None


def sm_count(device: torch.device) -> int | None:
    """SMs of the GPU ``device`` is planned for; None for the interpreter (no split-KV by itself)."""
    if _planned_sms is not None:
        return _planned_sms
    return _sm_count(device.index or 0) if device.type == "cuda" else None


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_kv_splits(base_programs: int, num_key_blocks: int, sms: int | None, min_blocks_per_split: int = 4) -> int:
    """How many programs share one query block's key range (split-KV).

    Perceiver cross-attention has few query blocks and a huge key axis, so ``B * H * query blocks``
    programs can leave most SMs idle. We split the key axis until there are about two programs per
    SM, keeping at least ``min_blocks_per_split`` key blocks per split so the merge stays cheap.
    """
    if sms is None:  # interpreter: splitting only costs time; tests force it explicitly
        return 1
    if base_programs >= sms:
        return 1
    wanted = cdiv(2 * sms, base_programs)
    return max(1, min(wanted, num_key_blocks // min_blocks_per_split))


def plan_kv_splits(requested: int, base_programs: int, num_keys: int, block_n: int, sms: int | None) -> tuple[int, int]:
    """``(num_splits, keys_per_split)`` for a split-KV launch (the forward and the dQ pass).

    ``requested`` > 0 forces the split count (tests), 0 asks ``num_kv_splits``. Splits own whole key
    blocks, and splits that would own none are dropped.
    """
    num_key_blocks = max(1, cdiv(num_keys, block_n))
    if requested <= 0:
        requested = num_kv_splits(base_programs, num_key_blocks, sms)
    blocks_per_split = cdiv(num_key_blocks, requested)
    return cdiv(num_key_blocks, blocks_per_split), blocks_per_split * block_n
