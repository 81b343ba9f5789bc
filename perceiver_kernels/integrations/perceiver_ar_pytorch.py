"""lucidrains' ``perceiver-ar-pytorch``: ``CausalPrefixAttention`` and ``CausalAttention`` of ``PerceiverAR``
(with its rotary embeddings and prefix dropout), plus a mark on the tables of its ``RotaryEmbedding`` so
that the rotation can run inside the kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import attention
from ..rotary import inverse_frequencies
from .base import TRAINING_DROPOUT, Fallback, Integration, dtype_problem, training_dropout

if TYPE_CHECKING:
    from .core import PatchedForward

#
# perceiver-ar passes every attention module the same table ``(T, R)`` of rotary *angles* for the whole
# sequence (prefix + latents): row ``p`` is ``p * inv_freq`` written twice (``cat(freqs, freqs)``), so
# channel pairs are ``(i, i + R/2)`` (NeoX layout) and pair ``i`` turns by ``p * 10000**(-2i/R)``. The
# first ``R = max(32, dim_head // 2)`` channels of each head are rotated. Queries, and keys, take the
# *last* rows of the table (the latents sit at the end). q is scaled before it is rotated.
#
# Our kernels rotate in-register from positions (``rotary_interleaved=False``) and compute the angles
# with the same float32 formula, which gives bitwise the same angles -- for the standard table. Since a
# table is just a tensor, our RotaryEmbedding forward checks the table it returns (once per length) and
# marks it; attention modules rotate in the kernel only for a marked table, and otherwise rotate q and k
# in PyTorch from the table they were given (a half-precision table under ``.half()`` or autocast, or
# any table passed by hand), reproducing perceiver-ar's arithmetic.

_AR_ROTARY_BASE = 10000.0
_AR_STANDARD_TABLE = "_perceiver_kernels_standard_rotary_table"  # attribute set on a verified table


def _ar_rotary_embedding_forward(patch: PatchedForward, arguments: dict[str, Any]) -> Tensor:
    """perceiver-ar's ``RotaryEmbedding.forward(max_seq_len, *, device)``, unchanged, plus the mark."""
    module = patch.module
    table = type(module).forward(module, **arguments)
    if _is_standard_table(patch, table):
        setattr(table, _AR_STANDARD_TABLE, True)
    return table


def _is_standard_table(patch: PatchedForward, table: Tensor) -> bool:
    """Whether ``table`` is bitwise the float32 table our kernels would compute for rows ``0..T-1``.

    The table is a deterministic function of its length and the module's ``inv_freq`` buffer, so the
    comparison (one device synchronisation) runs once per length and state of that buffer.
    """
    if not isinstance(table, Tensor) or table.dtype != torch.float32 or table.dim() != 2 or table.shape[-1] % 2:
        return False
    inv_freq = getattr(patch.module, "inv_freq", None)
    if not isinstance(inv_freq, Tensor):
        return False
    key = (tuple(table.shape), table.device, inv_freq.data_ptr(), inv_freq._version, inv_freq.dtype)
    if key not in patch.cache:
        positions = torch.arange(table.shape[0], device=table.device, dtype=torch.float32)
        # The same expression as perceiver_kernels.rotary.rotary_tables, so equal here means equal angles.
        angles = positions[:, None] * inverse_frequencies(table.shape[-1], _AR_ROTARY_BASE, table.device)
        patch.cache[key] = torch.equal(table, torch.cat((angles, angles), dim=-1))
    return patch.cache[key]


def _ar_table_problem(table: Any, head_dim: int, rows_needed: int) -> Fallback | None:
    """Tables perceiver-ar itself could not use (it would raise) or that we do not model."""
    if table is None:
        return None
    if not isinstance(table, Tensor) or table.dim() != 2:
        return Fallback("a rotary table that is not a (seq, dim) tensor")
    width = table.shape[-1]
    if width == 0 or width % 2 or width > head_dim:
        return Fallback(f"a rotary table of width {width} for head dim {head_dim}")
    if table.shape[0] < rows_needed:
        return Fallback("a rotary table shorter than the sequence")
    return None


def _ar_rotary(
    table: Tensor | None, q: Tensor, k: Tensor, q_rows: Tensor, k_rows: Tensor, scale: float
) -> tuple[Tensor, Tensor, float, dict[str, Any]]:
    """q, k, the score scale and the rotary arguments of ``attention`` for table rows ``q_rows (1, Nq)``
    and ``k_rows (B or 1, Nk)`` (the rows are the positions)."""
    if table is None:
        return q, k, scale, {}
    if getattr(table, _AR_STANDARD_TABLE, False) and q.dtype == table.dtype:
        rotary = dict(
            rotary_dim=table.shape[-1], q_positions=q_rows, k_positions=k_rows,
            rotary_base=_AR_ROTARY_BASE, rotary_interleaved=False,
        )  # fmt: skip
        return q, k, scale, rotary
    # Any other table: rotate as perceiver-ar does (q scaled first), in PyTorch, then no scaling in the kernel.
    q_rotated = _rotate_neox(q * scale, table[q_rows]).to(q.dtype)
    k_rotated = _rotate_neox(k, table[k_rows]).to(k.dtype)
    return q_rotated, k_rotated, 1.0, {}


def _rotate_neox(x: Tensor, angles: Tensor) -> Tensor:
    """``x (B, N, H, D)`` with its first ``R`` channels turned by ``angles (B or 1, N, R)``, half-split pairs:
    ``x * cos + (-x2, x1) * sin`` where ``x1, x2`` are the two halves of those channels."""
    width = angles.shape[-1]
    angles = angles[:, :, None, :]  # the same angles for every head
    rotated, rest = x[..., :width], x[..., width:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()
    return torch.cat((rotated, rest), dim=-1)


def _ar_self_forward(patch: PatchedForward, arguments: dict[str, Any]):
    """perceiver-ar's ``CausalAttention.forward(x, rotary_pos_emb=None)``: causal self-attention of the
    latents ``x (B, N, dim)`` (pre-norm inside), rotary from the last ``N`` table rows. Returns ``(B, N, dim)``."""
    module = patch.module
    x, table = arguments["x"], arguments.get("rotary_pos_emb")
    heads = module.heads
    head_dim = module.to_qkv.out_features // (3 * heads)
    if problem := training_dropout(module) or _ar_table_problem(table, head_dim, x.shape[1]):
        return problem

    x = module.norm(x)
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in module.to_qkv(x).chunk(3, dim=-1))
    if problem := dtype_problem(q, k, v):
        return problem
    rows = None
    if table is not None:
        rows = torch.arange(table.shape[0] - x.shape[1], table.shape[0], device=x.device)[None, :]
    q, k, scale, rotary = _ar_rotary(table, q, k, rows, rows, float(module.scale))
    # Their mask triu(j - i + 1) on a square score matrix is the ordinary causal mask.
    out = attention(q, k, v, causal=True, scale=scale, backend=patch.backend, **rotary)
    return module.to_out(out.flatten(2))


def _ar_prefix_forward(patch: PatchedForward, arguments: dict[str, Any]):
    """perceiver-ar's ``CausalPrefixAttention.forward(x, context, context_mask=None, rotary_pos_emb=None)``.

    The latents ``x (B, N, dim)`` attend to ``cat(prefix, x)`` (keys ``(B, P + N)``) under a bottom-right
    causal mask; ``context_mask (B, P)`` is bool with True = *keep*. While training with
    ``cross_attn_dropout > 0`` each sample keeps a random ``P - int(P * p)`` prefix positions, drawn with
    the same random calls as perceiver-ar (a seeded run keeps the same positions); kept keys keep their
    rotary rows. Returns ``(B, N, dim)``.
    """
    module = patch.module
    x, context = arguments["x"], arguments["context"]
    context_mask, table = arguments.get("context_mask"), arguments.get("rotary_pos_emb")
    heads = module.heads
    head_dim = module.to_q.out_features // heads
    batch, num_latents, prefix_len = x.shape[0], x.shape[1], context.shape[-2]
    prefix_dropout = module.training and module.cross_attn_dropout > 0
    kept_len = prefix_len - int(prefix_len * module.cross_attn_dropout) if prefix_dropout else prefix_len
    if dropped := training_dropout(module):
        return dropped
    if prefix_dropout and table is None:
        return Fallback("prefix dropout without a rotary table")  # perceiver-ar raises here
    if context.dim() != 3 or context.shape[0] != batch:
        return Fallback("a prefix that is not (B, P, dim)")
    # Every reason to fall back is decided before the prefix-dropout draws: falling back after them would
    # make the original draw again, and a seeded run would keep other prefix positions than unpatched.
    if problem := dtype_problem(x, context):
        return problem
    if context_mask is not None and (
        not isinstance(context_mask, Tensor)
        or context_mask.dtype != torch.bool
        or tuple(context_mask.shape) != (batch, prefix_len)
    ):
        return Fallback("a context_mask that is not bool (B, P)")
    # Rows of the table the keys take (see below): the last kept_len + N of the (gathered) table.
    if problem := _ar_table_problem(table, head_dim, num_latents if prefix_dropout else prefix_len + num_latents):
        return problem
    if prefix_dropout and table.shape[0] - prefix_len < num_latents:
        return Fallback("a rotary table shorter than the sequence")

    kept = None
    if prefix_dropout:
        # The same draws as perceiver-ar: uniform scores over the prefix, the top kept_len survive. Sorted
        # into prefix order like their boolean-mask gather (the result does not depend on the order: every
        # latent sees every kept prefix key, and each key keeps its position; reads stay in order).
        scores = torch.zeros((batch, prefix_len), device=x.device).uniform_()
        kept = scores.topk(kept_len, dim=-1).indices.sort(dim=-1).values  # (B, kept_len)
        context = context.gather(1, kept[:, :, None].expand(-1, -1, context.shape[-1]))
        if context_mask is not None:
            context_mask = context_mask.gather(1, kept)

    x = module.norm(x)
    context = module.context_norm(context)
    q = module.to_q(x).unflatten(-1, (heads, -1))
    k_latents, v_latents = module.to_kv(x).chunk(2, dim=-1)
    k_prefix, v_prefix = module.to_kv(context).chunk(2, dim=-1)
    k = torch.cat((k_prefix, k_latents), dim=1).unflatten(-1, (heads, -1))
    v = torch.cat((v_prefix, v_latents), dim=1).unflatten(-1, (heads, -1))
    if problem := dtype_problem(q, k, v):
        return problem
    num_keys = k.shape[1]
    padding = None
    if context_mask is not None:
        padding = F.pad(~context_mask, (0, num_latents), value=False)  # the latents' own keys are never padding

    q_rows = k_rows = None
    if table is not None:
        rows = table.shape[0]
        q_rows = torch.arange(rows - num_latents, rows, device=x.device)[None, :]
        if kept is None:
            k_rows = torch.arange(rows - num_keys, rows, device=x.device)[None, :]
        else:
            # Kept prefix keys keep their own rows, the rest of the table follows; keys take the last rows.
            rest = torch.arange(prefix_len, rows, device=x.device).expand(batch, -1)
            k_rows = torch.cat((kept, rest), dim=1)[:, -num_keys:].contiguous()
    q, k, scale, rotary = _ar_rotary(table, q, k, q_rows, k_rows, float(module.scale))
    out = attention(q, k, v, causal=True, key_padding_mask=padding, scale=scale, backend=patch.backend, **rotary)
    return module.to_out(out.flatten(2))


def _ar_describe(module: nn.Module) -> str:
    if hasattr(module, "to_qkv"):
        return f"{type(module).__name__} (causal self-attention, {module.heads} head(s))"
    dropout = f", prefix dropout {module.cross_attn_dropout}" if module.cross_attn_dropout else ""
    return f"{type(module).__name__} (causal prefix cross-attention, {module.heads} head(s){dropout})"


def _ar_rotary_describe(module: nn.Module) -> str:
    return f"{type(module).__name__} (marks its float32 table so attention rotates in the kernel; values unchanged)"


_MODULE = "perceiver_ar_pytorch.perceiver_ar_pytorch"
INTEGRATIONS = (
    Integration(
        key="perceiver-ar-pytorch",
        name="perceiver-ar-pytorch",
        classes=((_MODULE, "CausalPrefixAttention"),),
        forward=_ar_prefix_forward,
        describe=_ar_describe,
        fallbacks=f"{TRAINING_DROPOUT}; context masks or rotary tables of shapes perceiver-ar cannot use",
        required=("norm", "context_norm", "to_q", "to_kv", "to_out", "heads", "scale", "dropout", "cross_attn_dropout"),
    ),
    Integration(
        key="perceiver-ar-pytorch-self",
        name="perceiver-ar-pytorch",
        classes=((_MODULE, "CausalAttention"),),
        forward=_ar_self_forward,
        describe=_ar_describe,
        fallbacks=f"{TRAINING_DROPOUT}; rotary tables of shapes perceiver-ar cannot use",
        required=("norm", "to_qkv", "to_out", "heads", "scale", "dropout"),
    ),
    Integration(
        key="perceiver-ar-pytorch-rotary",
        name="perceiver-ar-pytorch",
        classes=((_MODULE, "RotaryEmbedding"),),
        forward=_ar_rotary_embedding_forward,
        describe=_ar_rotary_describe,
        fallbacks="",
        required=("inv_freq",),
    ),
)
