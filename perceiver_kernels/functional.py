"""``attention(...)``: the public entry point. Validates arguments and dispatches to a backend."""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from .kernels.configs import interpreter_enabled
from .ops.rotary import rotary
from .ops.triton_attention import triton_attention
from .problem import SUPPORTED_DTYPES, AttentionProblem, describe, validate_positions, validate_rotary
from .reference import reference_attention
from .rotary import rope_table, rotary_tables, rotate

BACKENDS = ("auto", "triton", "cuda", "reference")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    kv_lengths: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    *,
    rotary_dim: int = 0,
    q_positions: Tensor | None = None,
    k_positions: Tensor | None = None,
    rotary_base: float = 10000.0,
    rotary_interleaved: bool = True,
    kv_index: Tensor | None = None,
    keys_after: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused multi-head attention with Perceiver semantics.

    Args:
        q: ``(Bq, Nq, H, Dqk)``; ``Bq`` is ``B`` or 1 (a latent array broadcast over the batch without
            a copy; its gradient is summed over the batch).
        k: ``(B, Nk, H, Dqk)``.
        v: ``(B, Nk, H, Dv)``; ``Dv`` may differ from ``Dqk``.
        causal: bottom-right aligned causal mask: query ``i`` of sample ``b`` sees key ``j`` iff
            ``j <= i + L_b - Nq`` with ``L_b = kv_lengths[b]`` (or ``Nk``). The latents are the last
            ``Nq`` positions, as in Perceiver AR. (SDPA's ``is_causal`` is top-left aligned.)
        key_padding_mask: bool ``(B, Nk)``, True marks a padded key (perceiver-io's ``pad_mask``).
        kv_lengths: int32/int64 ``(B,)``; keys at index ``>= kv_lengths[b]`` are ignored. Values outside
            ``[0, Nk]`` are clamped to it (an error when value checks are on:
            :func:`~perceiver_kernels.set_value_checks`).
        scale: score scale, default ``Dqk ** -0.5``.
        backend: ``"auto"`` (fastest correct backend for the inputs' device), ``"triton"``,
            ``"reference"``, ``"cuda"`` (the CUDA C++ kernels; float32/float16/bfloat16, head dims up to
            256: other inputs raise, naming what is missing).
            ``"auto"`` does not choose ``"cuda"`` yet.
        return_lse: also return the log-sum-exp of the scaled scores.
        rotary_dim: rotate the first ``rotary_dim`` channels (even, ``<= Dqk``) of every q and k head
            by their positions (rotary embeddings, applied in float32 as tiles are loaded; nothing
            rotated is written to memory). 0: no rotary.
        q_positions, k_positions: int ``(B, Nq)`` / ``(B, Nk)`` (or batch 1, shared). Default: key
            ``j`` at ``j``; query ``i`` at ``L - Nq + i``, the queries being the last ``Nq`` positions
            (``L = kv_lengths[b]`` when given without ``kv_index``, else ``Nk``).
        rotary_base: frequency base; pair ``i`` at position ``p`` turns by ``p * base**(-2i/rotary_dim)``.
        rotary_interleaved: pairs ``(2i, 2i+1)`` (perceiver-io, GPT-J); False: ``(i, i + rotary_dim/2)``
            (GPT-NeoX).
        kv_index: int64 ``(B, Nk')``: attend only to key rows ``kv_index[b]`` (sorted, unique) of k/v,
            e.g. Perceiver AR's prefix dropout. The gathered K/V are never materialised; a kept key
            keeps its position and padding flag, ``causal`` and ``kv_lengths`` refer to the gathered
            axis of length ``Nk'``, and rows not gathered get zero gradients. Out-of-range rows are
            clamped; order and range are checked only when value checks are on.
        keys_after: int32/int64 ``(B,)``, with ``causal`` only: these keys are a chunk of a longer
            sequence that goes on for ``keys_after[b]`` more keys (held elsewhere, e.g. on other ranks);
            the causal diagonal counts them: query ``i`` sees key ``j`` iff ``j <= i + L_b + keys_after[b]
            - Nq``. Values are clamped to ``[0, Nk]`` (more shifts nothing further; below 0 an error when
            value checks are on). With rotary, give ``q_positions``.

    Tensors may have any strides as long as the last dim is contiguous. dtypes: float16, bfloat16,
    float32 (computed at float32 accuracy: 3xTF32 on a GPU, never plain TF32); float64 is accepted for
    verification. Softmax
    statistics and accumulation are float32. Gradients come back laid out like their inputs.

    No call reads a tensor's values on the host (no device synchronisation) unless value checks are
    switched on (:func:`~perceiver_kernels.set_value_checks`).

    Returns:
        ``out (B, Nq, H, Dv)`` in q's dtype, and with ``return_lse`` also ``lse (B, H, Nq)`` float32
        (natural log). A query row that sees no key gets zeros, ``lse = -inf`` and zero gradients.
    """
    problem = describe(
        q, k, v, causal, key_padding_mask, kv_lengths, scale, rotary_dim=rotary_dim, q_positions=q_positions,
        k_positions=k_positions, rotary_base=rotary_base, rotary_interleaved=rotary_interleaved, kv_index=kv_index,
        keys_after=keys_after,
    )  # fmt: skip
    if return_lse is not True and return_lse is not False:
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    out, lse = _RUNNERS[resolve_backend(backend, q)](problem)
    return (out, lse) if return_lse else out


def _cuda(problem: AttentionProblem) -> tuple[Tensor, Tensor]:
    from .ops import cuda_attention

    reason = cuda_attention.unsupported_reason(problem.q, problem.k, problem.v, problem.scale)
    if reason is not None:
        raise ValueError(f"backend='cuda' cannot run these inputs: {reason}; backend='triton' (or 'auto') can")
    return cuda_attention.cuda_attention(problem)


_RUNNERS = {"reference": reference_attention, "triton": triton_attention, "cuda": _cuda}


def apply_rotary(
    x: Tensor,
    positions: Tensor,
    rotary_dim: int,
    base: float = 10000.0,
    interleaved: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Rotary position embedding of the first ``rotary_dim`` channels of every head of ``x``.

    The same math as ``attention(..., rotary_dim=...)`` applies on the fly, for callers that keep
    a KV cache of already-rotated keys. Differentiable (the gradient is the inverse rotation).

    Args:
        x: ``(B, N, H, D)``, last dim contiguous; float16, bfloat16, float32 (float64 for checks).
        positions: int ``(B, N)`` or ``(1, N)``: the position of every row.
        rotary_dim: even, ``<= D``; the other channels pass through.
        base: frequency base; pair ``i`` at position ``p`` turns by ``p * base**(-2i/rotary_dim)``.
        interleaved: pairs ``(2i, 2i+1)`` (perceiver-io, GPT-J); False: ``(i, i + rotary_dim/2)``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (plain PyTorch).

    Returns:
        A new ``(B, N, H, D)`` tensor in ``x``'s dtype (the angles and the rotation are float32).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-dim (B, N, H, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim (stride 1), got strides {x.stride()}")
    validate_rotary(rotary_dim, base, interleaved, x.shape[-1], "D")
    validate_positions("positions", positions, x.shape[0], x.shape[1], x.device)
    if rotary_dim == 0 or x.numel() == 0:
        return x.clone()
    if resolve_backend(backend, x) == "reference":
        return rotate(x, *rotary_tables(positions, rotary_dim, base), rotary_dim, interleaved)
    return rotary(x, rope_table(positions, rotary_dim, base), rotary_dim, interleaved, False)


def backend_unavailable_reason(backend: str, q: Tensor | None = None) -> str | None:
    """Why ``backend`` cannot run for inputs like ``q`` (None when it can)."""
    if backend == "reference":
        return None
    if backend == "cuda":
        if q is not None and q.device.type != "cuda":  # asked first: no build for inputs it cannot take
            return f"the CUDA backend runs on CUDA tensors, got a {q.device.type} tensor"
        from .ops import cuda_attention  # loads (or builds) the extension on first use

        return cuda_attention.load()
    if check_backend(backend) != "triton":
        raise ValueError(f"backend={backend!r} has no availability check")  # "auto" names no one backend
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q is None:
        return None
    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            # Triton has no float64 dot on GPUs; float64 is a CPU-interpreter verification mode.
            return "Triton has no float64 matrix product on GPUs; use float32 (computed at float32 accuracy)"
        return None
    if q.device.type != "cpu":
        return f"the Triton backend runs on CUDA tensors, got a {q.device.type} tensor"
    if not interpreter_enabled():
        return (
            "on CPU tensors the Triton backend needs the interpreter: set TRITON_INTERPRET=1 before "
            "importing perceiver_kernels"
        )
    if q.dtype == torch.bfloat16:
        return "the Triton CPU interpreter cannot compute bfloat16 dot products; use a GPU"
    return None


def check_backend(backend: str) -> str:
    """``backend`` if it names one (:data:`BACKENDS`), else a ValueError naming the argument."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete backend that runs for ``backend`` on inputs like ``q``; raises if it cannot."""
    # Cached per (backend, device type, dtype): the answer depends on nothing else but the interpreter
    # switch, which is part of the key for CPU tensors.
    key = (backend, q.dtype, "cuda") if q.is_cuda else (backend, q.dtype, q.device.type, interpreter_enabled())
    chosen = _resolved.get(key)
    if chosen is None:
        chosen = _resolve(backend, q)
        _resolved[key] = chosen
    return chosen


_resolved: dict[tuple, str] = {}


def _resolve(backend: str, q: Tensor) -> str:
    check_backend(backend)
    if backend == "auto":
        return "triton" if backend_unavailable_reason("triton", q) is None else "reference"
    reason = backend_unavailable_reason(backend, q)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend
