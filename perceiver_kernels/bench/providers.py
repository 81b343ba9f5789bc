"""Who is measured: our backends and what a Perceiver user would use instead.

A provider turns a shape and its inputs into ``attn(q, k, v) -> out``, all ``(B, H, N, D)`` (the
layout SDPA wants; ours takes the ``(B, N, H, D)`` view of the same storage, which costs nothing).
Everything a user would build once per batch (masks, FlexAttention block masks, compiled functions)
is built in ``build``, outside the timing. A provider that cannot run a shape raises ``Unavailable``
with the reason, and the suite shows it as "n/a (reason)".
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import perceiver_kernels as pk
from perceiver_kernels.reference import visible_keys

from .shapes import Shape

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]

# Materialising providers hold about this many score-sized buffers at their peak (scores, masked
# scores / probabilities, and in the backward their gradients); used to refuse shapes that cannot fit.
SCORE_BUFFERS = {"fwd": 2, "fwd+bwd": 4}
MEMORY_HEADROOM = 0.8  # of the free device memory


class Unavailable(Exception):
    """The provider cannot run this shape here; the message says why."""


@dataclass
class Inputs:
    """q ``(B, H, Nq, Dqk)``, k ``(B, H, Nk, Dqk)``, v ``(B, H, Nk, Dv)``; masks as the shape defines them."""

    q: Tensor
    k: Tensor
    v: Tensor
    key_padding_mask: Tensor | None  # bool (B, Nk), True = padded
    kv_lengths: Tensor | None  # int64 (B,), on the attended key axis
    kv_index: Tensor | None = None  # int64 (B, Nk'): prefix dropout
    q_positions: Tensor | None = None  # rotary positions; None: the op's defaults
    k_positions: Tensor | None = None

    @property
    def attended_padding(self) -> Tensor | None:
        """The padding mask on the attended key axis (gathered with ``kv_index``)."""
        if self.key_padding_mask is None or self.kv_index is None:
            return self.key_padding_mask
        return self.key_padding_mask.gather(1, self.kv_index)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(n: int, d: int) -> Tensor:
        return torch.randn(shape.batch, shape.heads, n, d, device=device, dtype=dtype, generator=g)

    def to_device(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device)

    positions = shape.positions() or (None, None)
    return Inputs(
        rand(shape.nq, shape.dqk),
        rand(shape.nk, shape.dqk),
        rand(shape.nk, shape.dv),
        to_device(shape.key_padding_mask()),
        to_device(shape.kv_lengths()),
        to_device(shape.kv_index()),
        *(to_device(p) for p in positions),
    )


def visible_mask(shape: Shape, inputs: Inputs) -> Tensor | None:
    """The reference's mask on the attended key axis (as small as the masks allow, broadcastable to
    ``(B, H, Nq, Nk')``), True = the query sees the key; None when every key is visible."""
    pad = inputs.attended_padding
    if not shape.causal and pad is None and inputs.kv_lengths is None:
        return None
    return visible_keys(
        shape.batch, shape.nq, shape.nk_attended, causal=shape.causal, key_padding_mask=pad,
        kv_lengths=inputs.kv_lengths, device=inputs.q.device,
    )  # fmt: skip


def _require_memory(shape: Shape, inputs: Inputs, mode: str, bytes_per_score: int) -> None:
    """Refuse a materialising provider whose score buffers would not fit in the free device memory."""
    if inputs.q.device.type != "cuda":
        return
    device = inputs.q.device
    need = SCORE_BUFFERS[mode] * bytes_per_score * shape.batch * shape.heads * shape.nq * shape.nk_attended
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by PyTorch
    if need > MEMORY_HEADROOM * free:
        raise Unavailable(f"materialises ~{need / 2**30:.0f} GiB of scores, {free / 2**30:.0f} GiB free")


# -- ours --------------------------------------------------------------------------------------------


def ours(backend: str) -> Callable[[Shape, Inputs, str], AttentionFn]:
    def build(shape: Shape, inputs: Inputs, mode: str) -> AttentionFn:
        reason = pk.backend_unavailable_reason(backend, inputs.q)
        if reason is None and backend == "cuda":  # the CUDA kernels cover part of the contract so far
            from perceiver_kernels.ops import cuda_attention

            q, k, v = (t.transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
            reason = cuda_attention.unsupported_reason(q, k, v, q.shape[-1] ** -0.5)
        if reason is not None:
            raise Unavailable(reason)
        options = dict(
            causal=shape.causal, key_padding_mask=inputs.key_padding_mask, kv_lengths=inputs.kv_lengths,
            kv_index=inputs.kv_index, rotary_dim=shape.rotary_dim, q_positions=inputs.q_positions,
            k_positions=inputs.k_positions, backend=backend,
        )  # fmt: skip

        def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            out = pk.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **options)
            return out.transpose(1, 2)

        return attn

    return build


# -- what the other providers must do first ------------------------------------------------------------


def prologue(shape: Shape, inputs: Inputs) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Rotary and the prefix-dropout gather as separate PyTorch ops, as a user of SDPA, FlexAttention
    or naive attention has to run them in every step (the angle tables are built once, outside).
    Returns ``(q, k, v) -> (q, k, v)`` in ``(B, H, N, D)``; the identity without those features."""
    if not shape.rotary_dim and inputs.kv_index is None:
        return lambda q, k, v: (q, k, v)
    from perceiver_kernels.rotary import default_positions, rotary_tables, rotate

    tables = None
    if shape.rotary_dim:
        default_q, default_k = default_positions(
            shape.batch, shape.nq, shape.nk, inputs.kv_lengths if inputs.kv_index is None else None, inputs.q.device
        )
        q_pos = default_q if inputs.q_positions is None else inputs.q_positions
        k_pos = default_k if inputs.k_positions is None else inputs.k_positions
        tables = rotary_tables(q_pos, shape.rotary_dim, 10000.0), rotary_tables(k_pos, shape.rotary_dim, 10000.0)
    index = None if inputs.kv_index is None else inputs.kv_index[:, None, :, None]

    def run(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if tables is not None:
            (q_cos, q_sin), (k_cos, k_sin) = tables
            q = rotate(q.transpose(1, 2), q_cos, q_sin, shape.rotary_dim, True).transpose(1, 2)
            k = rotate(k.transpose(1, 2), k_cos, k_sin, shape.rotary_dim, True).transpose(1, 2)
        if index is not None:
            k = k.gather(2, index.expand(-1, k.shape[1], -1, k.shape[3]))
            v = v.gather(2, index.expand(-1, v.shape[1], -1, v.shape[3]))
        return q, k, v

    return run


# -- PyTorch SDPA with one backend forced ------------------------------------------------------------


def sdpa(backend_name: str) -> Callable[[Shape, Inputs, str], AttentionFn]:
    def build(shape: Shape, inputs: Inputs, mode: str) -> AttentionFn:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        backend = getattr(SDPBackend, backend_name)
        if inputs.q.device.type != "cuda" and backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            raise Unavailable("a CUDA-only backend")
        if backend == SDPBackend.MATH:  # computes in float32 for 16-bit inputs
            _require_memory(shape, inputs, mode, bytes_per_score=4)
        fused_causal = backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
        if shape.causal and inputs.attended_padding is None and inputs.kv_lengths is None and fused_causal:
            # SDPA's is_causal is top-left aligned; causal_lower_right reaches these two backends'
            # own bottom-right masks. For the others it would build a dense mask on every call,
            # so they get that mask built once, here, as a user would.
            mask = causal_lower_right(shape.nq, shape.nk_attended)
        else:
            mask = visible_mask(shape, inputs)
        before = prologue(shape, inputs)

        def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            q, k, v = before(q, k, v)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        # Probe once: a refusal raises, and SDPA gives its reasons only as warnings.
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                attn(inputs.q, inputs.k, inputs.v)
            except RuntimeError as e:
                raise Unavailable(_sdpa_refusal(e, caught)) from e
        return attn

    return build


def _sdpa_refusal(error: RuntimeError, caught: list) -> str:
    """SDPA explains a refusal in warnings ("... not used because:", then one warning per reason)."""
    if not any(text in str(error) for text in ("No available kernel", "No viable backend")):
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"  # not a refusal
    messages = [re.sub(r"\s*\(Triggered internally at .*\)\s*$", "", str(w.message).strip()) for w in caught]
    reasons = [m for m in messages if m and not m.endswith("because:")]
    return "; ".join(dict.fromkeys(reasons)) or str(error).splitlines()[0]


# -- FlexAttention -----------------------------------------------------------------------------------


def flex(shape: Shape, inputs: Inputs, mode: str) -> AttentionFn:
    """``torch.compile``d FlexAttention with the equivalent block mask (compiled once per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pad, lengths = inputs.attended_padding, inputs.kv_lengths
    nk = shape.nk_attended
    offset = nk - shape.nq

    def mask_mod(b, h, q_idx, kv_idx):
        seen = q_idx >= 0  # all True, in the index tensors' shape
        if lengths is not None:
            seen = seen & (kv_idx < lengths[b])
            if shape.causal:
                seen = seen & (kv_idx <= q_idx + lengths[b] - shape.nq)
        elif shape.causal:
            seen = seen & (kv_idx <= q_idx + offset)
        if pad is not None:
            seen = seen & ~pad[b, kv_idx]
        return seen

    block_mask = None
    if shape.causal or pad is not None or lengths is not None:
        per_sample = pad is not None or lengths is not None
        batch = shape.batch if per_sample else None
        block_mask = create_block_mask(mask_mod, batch, None, shape.nq, nk, device=inputs.q.device)
    compiled = _compiled_flex(flex_attention, shape)
    before = prologue(shape, inputs)

    def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return compiled(*before(q, k, v), block_mask=block_mask)

    return attn


_FLEX_CACHE: dict[str, Callable] = {}


def _compiled_flex(flex_attention: Callable, shape: Shape) -> Callable:
    # One compiled function per shape, forward and backward sharing it; dynamo's caches are reset
    # between shapes so that the recompilation limit never silently drops us to eager mode.
    if shape.name not in _FLEX_CACHE:
        torch._dynamo.reset()
        _FLEX_CACHE.clear()
        _FLEX_CACHE[shape.name] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_CACHE[shape.name]


# -- naive, as perceiver-io computes it --------------------------------------------------------------


def naive(shape: Shape, inputs: Inputs, mode: str) -> AttentionFn:
    """Scores materialised in the input dtype, masked with ``-finfo.max``, softmax, then the values."""
    _require_memory(shape, inputs, mode, bytes_per_score=inputs.q.element_size())
    mask = visible_mask(shape, inputs)
    hidden = None if mask is None else ~mask
    scale = shape.dqk**-0.5
    before = prologue(shape, inputs)

    def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = before(q, k, v)
        scores = torch.einsum("bhic,bhjc->bhij", q * scale, k)
        if hidden is not None:
            scores.masked_fill_(hidden, -torch.finfo(scores.dtype).max)
        return torch.einsum("bhij,bhjc->bhic", scores.softmax(dim=-1), v)

    return attn


@dataclass(frozen=True)
class Provider:
    name: str
    ours: bool
    build: Callable[[Shape, Inputs, str], AttentionFn]
    description: str


PROVIDERS = {
    p.name: p
    for p in (
        Provider("triton", True, ours("triton"), "perceiver-kernels, Triton backend"),
        Provider("cuda", True, ours("cuda"), "perceiver-kernels, CUDA C++ backend"),
        Provider("sdpa-flash", False, sdpa("FLASH_ATTENTION"), "torch SDPA, FlashAttention backend"),
        Provider("sdpa-cudnn", False, sdpa("CUDNN_ATTENTION"), "torch SDPA, cuDNN backend"),
        Provider("sdpa-efficient", False, sdpa("EFFICIENT_ATTENTION"), "torch SDPA, memory-efficient backend"),
        Provider("sdpa-math", False, sdpa("MATH"), "torch SDPA, math backend (materialises scores)"),
        Provider("flex", False, flex, "FlexAttention, torch.compile'd, block mask"),
        Provider("naive", False, naive, "einsum attention as perceiver-io computes it"),
    )
}
