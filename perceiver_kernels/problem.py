"""One attention problem, described once: :class:`AttentionProblem`, built and validated by :func:`describe`.

``pk.attention`` describes its arguments here once per call and hands the description to whichever
backend runs it (the reference, the Triton kernels, the CUDA kernels), so the contract's arguments,
their checks and the sizes derived from them live in one place.

Checks that need only shapes, dtypes, devices and strides always run; they cost no device work. Checks
that read tensor *values* (``kv_lengths`` in range, ``kv_index`` sorted, unique and in range) would
synchronise the host with the device on every call, so they run only when switched on
(:func:`set_value_checks`, or ``PERCEIVER_KERNELS_CHECK_VALUES=1``; the test suite switches them on).
Switched off, out-of-range values cannot read or write out of bounds: every backend clamps
``kv_lengths`` to ``[0, Nk]`` and gathered rows to ``[0, Nk)``. An unsorted or repeated ``kv_index``
row gives undefined gradients (the kernels scatter dK/dV to the gathered rows).

This module imports nothing else of the package: the reference, the ops and the kernels all read it.
"""

from __future__ import annotations

import numbers
import os
from typing import NamedTuple

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


class AttentionProblem(NamedTuple):
    """A validated attention call (an immutable tuple; build it with :func:`describe`).

    Tensors are the caller's own, unchanged: ``q (Bq, Nq, H, Dqk)`` with ``Bq`` in ``{1, B}``,
    ``k (B, Nk, H, Dqk)``, ``v (B, Nk, H, Dv)``, ``key_padding_mask`` bool ``(B, Nk)``, ``kv_lengths``
    int ``(B,)``, ``kv_index`` int64 ``(B, Nk')``, positions int ``(B or 1, Nq)`` / ``(B or 1, Nk)``.
    ``scale`` is resolved (``Dqk ** -0.5`` by default). ``num_keys`` is the key axis the masks and the
    causal alignment refer to: ``Nk'`` with ``kv_index``, else ``Nk``.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    key_padding_mask: Tensor | None
    kv_lengths: Tensor | None
    kv_index: Tensor | None
    scale: float
    rotary_dim: int
    q_positions: Tensor | None
    k_positions: Tensor | None
    rotary_base: float
    rotary_interleaved: bool
    num_splits: int  # key-axis splits forced by tests and benchmarks; 0: the backend's heuristic
    batch: int
    num_queries: int
    num_keys: int
    heads: int
    head_dim_qk: int
    head_dim_v: int
    keys_after: Tensor | None = None  # int (B,): the sequence's keys after these; moves the causal diagonal


def causal_offset(length, num_queries, keys_after=0):
    """The causal diagonal, bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + offset``
    with ``offset = L_b + A_b - Nq`` (``L_b`` the sample's valid keys, ``A_b = keys_after[b]`` the keys of
    the sequence that follow them elsewhere, 0 by default). The latents are the last ``Nq`` positions of the
    sequence (Perceiver AR). Works on ints and tensors alike; the Triton kernels' ``causal_offset``
    (kernels/common.py) and the CUDA kernels' (csrc/device_utils.cuh) are the same."""
    return length + keys_after - num_queries


_value_checks = os.environ.get("PERCEIVER_KERNELS_CHECK_VALUES", "0").lower() in ("1", "true", "on", "yes")


def set_value_checks(enabled: bool) -> bool:
    """Switch the checks that read tensor values (``kv_lengths`` range; ``kv_index`` order and range) on
    or off for every later call; returns the previous setting. Off by default: on a GPU each such check
    is a host-device synchronisation. The environment variable ``PERCEIVER_KERNELS_CHECK_VALUES=1`` sets
    the default. Checks never run inside ``torch.compile``d code (values are not known while tracing)."""
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _value_checks = _value_checks, enabled
    return previous


def value_checks_enabled() -> bool:
    """Whether :func:`describe` reads ``kv_lengths`` and ``kv_index`` values (see :func:`set_value_checks`)."""
    return _value_checks


def describe(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    kv_lengths: Tensor | None = None,
    scale: float | None = None,
    *,
    rotary_dim: int = 0,
    q_positions: Tensor | None = None,
    k_positions: Tensor | None = None,
    rotary_base: float = 10000.0,
    rotary_interleaved: bool = True,
    kv_index: Tensor | None = None,
    num_splits: int = 0,
    keys_after: Tensor | None = None,
) -> AttentionProblem:
    """Validate ``pk.attention``'s arguments (see its docstring) and describe the problem.

    Raises ``TypeError`` / ``ValueError`` naming the argument. Written for the common case first: a
    valid call costs a few attribute reads per tensor, no device work and no tensor allocation.
    """
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
            if len(shape) != 4:
                raise ValueError(f"{name} must have 4 dims (batch, seq, heads, head_dim), got shape {tuple(shape)}")
    dtype = q.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {dtype}; expected float16, bfloat16 or float32")
    if k.dtype != dtype or v.dtype != dtype:
        for name, t in (("k", k), ("v", v)):
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
        raise TypeError(f"q, k and v must share a dtype, got q {dtype}, k {k.dtype}, v {v.dtype}")
    if (
        (q.stride(3) != 1 and q_shape[3] > 1)
        or (k.stride(3) != 1 and k_shape[3] > 1)
        or (v.stride(3) != 1 and v_shape[3] > 1)
    ):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(3) != 1 and t.shape[3] > 1:
                raise ValueError(
                    f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}; "
                    "call .contiguous() or permute only the leading dims"
                )
    device = q.device
    if k.device != device or v.device != device:
        name, t = ("k", k) if k.device != device else ("v", v)
        raise ValueError(f"{name} is on {t.device} but q is on {device}; all inputs must share a device")
    batch, num_rows, heads, head_dim_qk = k_shape
    head_dim_v = v_shape[3]
    if v_shape[0] != batch or v_shape[1] != num_rows or v_shape[2] != heads:
        raise ValueError(f"v must be (B, Nk, H, Dv) = ({batch}, {num_rows}, {heads}, Dv) like k, got {tuple(v_shape)}")
    if q_shape[0] != batch and q_shape[0] != 1:
        raise ValueError(f"q's batch must be 1 (broadcast) or B={batch} as in k, got q shape {tuple(q_shape)}")
    if q_shape[2] != heads:
        raise ValueError(f"q has {q_shape[2]} heads but k has {heads}")
    if q_shape[3] != head_dim_qk:
        raise ValueError(f"q's head dim {q_shape[3]} must equal k's head dim {head_dim_qk}")
    if head_dim_qk < 1 or head_dim_v < 1:
        raise ValueError(f"head dims must be >= 1, got Dqk={head_dim_qk}, Dv={head_dim_v}")
    if causal is not True and causal is not False:
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = head_dim_qk**-0.5
    elif type(scale) is not float:
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
    if not -float("inf") < scale < float("inf"):
        raise ValueError(f"scale must be finite, got {scale}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if key_padding_mask.shape != (batch, num_rows):
            raise ValueError(
                f"key_padding_mask must have shape (B, Nk) = ({batch}, {num_rows}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {device}")
    if kv_lengths is not None:
        validate_per_sample("kv_lengths", kv_lengths, batch, device)
    if keys_after is not None:
        validate_per_sample("keys_after", keys_after, batch, device)
        if not causal:
            raise ValueError("keys_after only moves the causal diagonal: it needs causal=True")
    num_keys = num_rows
    if kv_index is not None:
        if not isinstance(kv_index, Tensor) or kv_index.dtype != torch.int64:
            raise TypeError("kv_index must be an int64 tensor")
        if kv_index.dim() != 2 or kv_index.shape[0] != batch:
            raise ValueError(f"kv_index must have shape (B, Nk') = ({batch}, Nk'), got {tuple(kv_index.shape)}")
        if kv_index.device != device:
            raise ValueError(f"kv_index is on {kv_index.device} but q is on {device}")
        num_keys = kv_index.shape[1]
    if (
        rotary_dim
        or q_positions is not None
        or k_positions is not None
        or rotary_base != 10000.0
        or (rotary_interleaved is not True)
    ):
        validate_rotary(rotary_dim, rotary_base, rotary_interleaved, head_dim_qk, "Dqk")
        for name, positions, length in (
            ("q_positions", q_positions, q_shape[1]),
            ("k_positions", k_positions, num_rows),
        ):
            if positions is None:
                continue
            if not rotary_dim:
                raise ValueError(f"{name} is given but rotary_dim is 0; positions only matter with rotary embeddings")
            validate_positions(name, positions, batch, length, device)
        rotary_base = float(rotary_base)
    if keys_after is not None and rotary_dim and q_positions is None:
        raise ValueError("rotary with keys_after needs explicit q_positions (the default places the queries at "
                         "the end of the keys given)")  # fmt: skip
    if type(num_splits) is not int or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: the backend's choice), got {num_splits!r}")
    if _value_checks and not tracing():
        check_values(kv_lengths, kv_index, num_rows, keys_after)
    return AttentionProblem(
        q, k, v, causal, key_padding_mask, kv_lengths, kv_index, scale, rotary_dim, q_positions, k_positions,
        rotary_base, rotary_interleaved, num_splits, batch, q_shape[1], num_keys, heads, head_dim_qk, head_dim_v,
        keys_after,
    )  # fmt: skip


def validate_per_sample(name: str, t, batch: int, device: torch.device) -> None:
    """A per-sample count (``kv_lengths``, ``keys_after``): an int32/int64 ``(B,)`` tensor on q's device."""
    if not isinstance(t, Tensor) or t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def tracing() -> bool:
    """True while tensors are symbolic: ``torch.compile`` (dynamo), ``make_fx``/``torch.export`` (proxy
    mode), fake tensors or functionalization. Such calls go through the custom ops, read no values and
    leave the host-side caches alone. About 0.2 us when no dispatch mode is active."""
    if torch.compiler.is_compiling():
        return True
    if not torch._C._len_torch_dispatch_stack():
        return False
    get, key = torch._C._get_dispatch_mode, torch._C._TorchDispatchModeKey
    return get(key.FAKE) is not None or get(key.PROXY) is not None or get(key.FUNCTIONAL) is not None


def check_values(
    kv_lengths: Tensor | None, kv_index: Tensor | None, num_rows: int, keys_after: Tensor | None = None
) -> None:
    """The value checks :func:`set_value_checks` switches on (each reads the tensor: a device sync)."""
    if keys_after is not None and keys_after.numel() and bool((keys_after < 0).any()):
        raise ValueError(f"keys_after values must be >= 0, got {keys_after.tolist()}")
    if kv_lengths is not None and kv_lengths.numel():
        if bool(((kv_lengths < 0) | (kv_lengths > num_rows)).any()):
            raise ValueError(f"kv_lengths values must lie in [0, Nk={num_rows}], got {kv_lengths.tolist()}")
    if kv_index is not None and kv_index.numel():
        if bool(((kv_index < 0) | (kv_index >= num_rows)).any()):
            raise ValueError(
                f"kv_index values must lie in [0, Nk={num_rows}), got min {int(kv_index.min())}, "
                f"max {int(kv_index.max())}"
            )
        if kv_index.shape[1] > 1 and not bool((kv_index[:, 1:] > kv_index[:, :-1]).all()):
            raise ValueError("kv_index rows must be sorted and unique (strictly increasing per sample)")


def validate_rotary(rotary_dim, base, interleaved, head_dim: int, head_dim_name: str) -> None:
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if rotary_dim < 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in [0, {head_dim_name}={head_dim}], got {rotary_dim}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(interleaved).__name__}")
    if not isinstance(base, numbers.Real) or isinstance(base, bool):
        raise TypeError(f"rotary_base must be a float, got {type(base).__name__}")
    if not 0 < float(base) < float("inf"):
        raise ValueError(f"rotary_base must be positive and finite, got {base}")


def validate_positions(name: str, positions, batch: int, length: int, device: torch.device) -> None:
    if not isinstance(positions, Tensor) or positions.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {getattr(positions, 'dtype', positions)}")
    if positions.dim() != 2 or positions.shape[0] not in (1, batch) or positions.shape[1] != length:
        raise ValueError(
            f"{name} must have shape (B, N) = ({batch}, {length}) or (1, {length}), got {tuple(positions.shape)}"
        )
    if positions.device != device:
        raise ValueError(f"{name} is on {positions.device} but the data is on {device}")
