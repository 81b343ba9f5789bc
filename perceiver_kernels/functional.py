"""``attention(...)``: the public entry point. Validates arguments and dispatches to a backend."""

from __future__ import annotations

import importlib.util
import numbers

import torch
from torch import Tensor

from .kernels.configs import interpreter_enabled
from .ops.rotary import rotary
from .ops.triton_attention import triton_attention
from .reference import attention_reference
from .rotary import rotary_tables, rotate

BACKENDS = ("auto", "triton", "cuda", "reference")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        kv_lengths: int32/int64 ``(B,)``; keys at index ``>= kv_lengths[b]`` are ignored.
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
            axis of length ``Nk'``, and rows not gathered get zero gradients.

    Tensors may have any strides as long as the last dim is contiguous. dtypes: float16, bfloat16,
    float32 (computed at float32 accuracy, no TF32); float64 is accepted for verification. Softmax
    statistics and accumulation are float32.

    Returns:
        ``out (B, Nq, H, Dv)`` in q's dtype, and with ``return_lse`` also ``lse (B, H, Nq)`` float32
        (natural log). A query row that sees no key gets zeros, ``lse = -inf`` and zero gradients.
    """
    _validate(q, k, v, causal, key_padding_mask, kv_lengths, scale, return_lse)
    _validate_perceiver_ar(q, k, rotary_dim, q_positions, k_positions, rotary_base, rotary_interleaved, kv_index)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    chosen = resolve_backend(backend, q)
    options = dict(
        causal=causal, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths, scale=scale, rotary_dim=rotary_dim,
        q_positions=q_positions, k_positions=k_positions, rotary_base=rotary_base,
        rotary_interleaved=rotary_interleaved, kv_index=kv_index,
    )  # fmt: skip
    if chosen == "reference":
        out, lse = attention_reference(q, k, v, return_lse=True, **options)
    elif chosen == "cuda":
        out, lse = _cuda(q, k, v, options)
    else:
        out, lse = triton_attention(q, k, v, **options)
    return (out, lse) if return_lse else out


def _cuda(q: Tensor, k: Tensor, v: Tensor, options: dict) -> tuple[Tensor, Tensor]:
    from .ops import cuda_attention

    reason = cuda_attention.unsupported_reason(q, k, v, options["scale"])
    if reason is not None:
        raise ValueError(f"backend='cuda' cannot run these inputs: {reason}; backend='triton' (or 'auto') can")
    return cuda_attention.cuda_attention(q, k, v, **options)


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
    _validate_rotary(rotary_dim, base, interleaved, x.shape[-1], "D")
    _validate_positions("positions", positions, x.shape[0], x.shape[1], x.device)
    if rotary_dim == 0 or x.numel() == 0:
        return x.clone()
    cos, sin = rotary_tables(positions, rotary_dim, base)
    if resolve_backend(backend, x) == "reference":
        return rotate(x, cos, sin, rotary_dim, interleaved)
    return rotary(x, torch.stack((cos, sin)), rotary_dim, interleaved, False)


def backend_unavailable_reason(backend: str, q: Tensor | None = None) -> str | None:
    """Why ``backend`` cannot run for inputs like ``q`` (None when it can)."""
    if backend == "reference":
        return None
    if backend == "cuda":
        from .ops import cuda_attention  # loads (or builds) the extension on first use

        reason = cuda_attention.load()
        if reason is not None:
            return reason
        if q is not None and q.device.type != "cuda":
            return f"the CUDA backend runs on CUDA tensors, got a {q.device.type} tensor (the extension is loaded)"
        return None
    if check_backend(backend) != "triton":
        raise ValueError(f"backend={backend!r} has no availability check")  # "auto" names no one backend
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q is None:
        return None
    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            # Triton has no float64 dot on GPUs; float64 is a CPU-interpreter verification mode.
            return "Triton has no float64 matrix product on GPUs; use float32 (computed without TF32)"
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
    check_backend(backend)
    if backend == "auto":
        return "triton" if backend_unavailable_reason("triton", q) is None else "reference"
    reason = backend_unavailable_reason(backend, q)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend


def _validate(q, k, v, causal, key_padding_mask, kv_lengths, scale, return_lse) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}; "
                "call .contiguous() or permute only the leading dims"
            )
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    batch, num_keys, heads, head_dim_qk = k.shape
    if v.shape[0] != batch or v.shape[1] != num_keys or v.shape[2] != heads:
        raise ValueError(f"v must be (B, Nk, H, Dv) = ({batch}, {num_keys}, {heads}, Dv) like k, got {tuple(v.shape)}")
    if q.shape[0] not in (1, batch):
        raise ValueError(f"q's batch must be 1 (broadcast) or B={batch} as in k, got q shape {tuple(q.shape)}")
    if q.shape[2] != heads:
        raise ValueError(f"q has {q.shape[2]} heads but k has {heads}")
    if q.shape[3] != head_dim_qk:
        raise ValueError(f"q's head dim {q.shape[3]} must equal k's head dim {head_dim_qk}")
    if head_dim_qk < 1 or v.shape[3] < 1:
        raise ValueError(f"head dims must be >= 1, got Dqk={head_dim_qk}, Dv={v.shape[3]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if scale is not None:
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not float("-inf") < float(scale) < float("inf"):
            raise ValueError(f"scale must be finite, got {scale}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if tuple(key_padding_mask.shape) != (batch, num_keys):
            raise ValueError(
                f"key_padding_mask must have shape (B, Nk) = ({batch}, {num_keys}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if kv_lengths is not None:
        if not isinstance(kv_lengths, Tensor) or kv_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError("kv_lengths must be an int32 or int64 tensor")
        if tuple(kv_lengths.shape) != (batch,):
            raise ValueError(f"kv_lengths must have shape (B,) = ({batch},), got {tuple(kv_lengths.shape)}")
        if kv_lengths.device != q.device:
            raise ValueError(f"kv_lengths is on {kv_lengths.device} but q is on {q.device}")
        # A value check needs the data, which a compiled graph does not have; kernels also clamp.
        if not torch.compiler.is_compiling() and batch > 0:
            if bool(((kv_lengths < 0) | (kv_lengths > num_keys)).any()):
                raise ValueError(f"kv_lengths values must lie in [0, Nk={num_keys}], got {kv_lengths.tolist()}")


def _validate_rotary(rotary_dim, base, interleaved, head_dim: int, head_dim_name: str) -> None:
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


def _validate_positions(name: str, positions, batch: int, length: int, device: torch.device) -> None:
    if not isinstance(positions, Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {getattr(positions, 'dtype', positions)}")
    if positions.dim() != 2 or positions.shape[0] not in (1, batch) or positions.shape[1] != length:
        raise ValueError(
            f"{name} must have shape (B, N) = ({batch}, {length}) or (1, {length}), got {tuple(positions.shape)}"
        )
    if positions.device != device:
        raise ValueError(f"{name} is on {positions.device} but the data is on {device}")


def _validate_perceiver_ar(q, k, rotary_dim, q_positions, k_positions, rotary_base, rotary_interleaved, kv_index):
    batch, num_keys, _, head_dim_qk = k.shape
    _validate_rotary(rotary_dim, rotary_base, rotary_interleaved, head_dim_qk, "Dqk")
    for name, positions, length in (("q_positions", q_positions, q.shape[1]), ("k_positions", k_positions, num_keys)):
        if positions is None:
            continue
        if not rotary_dim:
            raise ValueError(f"{name} is given but rotary_dim is 0; positions only matter with rotary embeddings")
        _validate_positions(name, positions, batch, length, q.device)
    if kv_index is None:
        return
    if not isinstance(kv_index, Tensor) or kv_index.dtype != torch.int64:
        raise TypeError("kv_index must be an int64 tensor")
    if kv_index.dim() != 2 or kv_index.shape[0] != batch:
        raise ValueError(f"kv_index must have shape (B, Nk') = ({batch}, Nk'), got {tuple(kv_index.shape)}")
    if kv_index.device != q.device:
        raise ValueError(f"kv_index is on {kv_index.device} but q is on {q.device}")
    if kv_index.numel() and not torch.compiler.is_compiling():
        # Reads the values (a device synchronisation on CUDA); the kernels clamp rows in any case.
        if bool(((kv_index < 0) | (kv_index >= num_keys)).any()):
            raise ValueError(
                f"kv_index values must lie in [0, Nk={num_keys}), got min {int(kv_index.min())}, "
                f"max {int(kv_index.max())}"
            )
        if kv_index.shape[1] > 1 and not bool((kv_index[:, 1:] > kv_index[:, :-1]).all()):
            raise ValueError("kv_index rows must be sorted and unique (strictly increasing per sample)")
