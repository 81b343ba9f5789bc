"""Multi-head attention modules with perceiver-io's names, parameters and semantics, on ``pk.attention``.

Shapes: ``B`` batch, ``N`` query rows, ``L`` key/value rows, ``C`` channels, ``H`` heads; per-head
dims ``Dqk = num_qk_channels / H`` and ``Dv = num_v_channels / H`` may differ. The projections
reshape ``(B, N, H*D)`` to ``(B, N, H, D)`` as a view: that is the kernels' layout, so no transpose
or copy sits between a projection and the fused attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distributed.plan import ShardPlan
from ..distributed.sharded import sharded_attention
from ..functional import attention, check_backend
from ..reference import attention_reference


@dataclass(frozen=True)
class RotaryPositions:
    """Rotary embedding arguments of one attention call (perceiver-io's ``RotaryPositionEmbedding``).

    The kernels rotate on load from these integer positions; nothing rotated is stored.

    Attributes:
        dim: channels rotated at the start of every q/k head (even, ``<= Dqk``).
        q: int ``(B or 1, N)`` positions of the queries.
        k: int ``(B or 1, L)`` positions of the keys.
    """

    dim: int
    q: Tensor
    k: Tensor


def _heads(channels: int, num_heads: int, name: str) -> int:
    if channels <= 0 or channels % num_heads:
        raise ValueError(f"{name}={channels} must be a positive multiple of num_heads={num_heads}")
    return channels // num_heads


class MultiHeadAttention(nn.Module):
    """perceiver-io's multi-head attention: separate q/k/v projections, fused attention, output projection.

    Args:
        num_heads: attention heads ``H``.
        num_q_input_channels, num_kv_input_channels: channels of ``x_q`` and ``x_kv``.
        num_qk_channels: q/k channels over all heads (default ``num_q_input_channels``).
        num_v_channels: v channels over all heads (default ``num_qk_channels``).
        num_output_channels: default ``num_q_input_channels``.
        causal_attention: bottom-right aligned causal mask (the queries are the last ``N`` keys).
        dropout: dropout on the attention probabilities. The fused kernels have none, so a training
            step with ``dropout > 0`` runs the PyTorch reference path (materialised scores).
        qkv_bias, out_bias: biases of the q/k/v and the output projections.
        backend: ``pk.attention`` backend (``"auto"``, ``"triton"``, ``"cuda"``, ``"reference"``); a
            public attribute, which ``pk.patch`` sets.
    """

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        num_output_channels: int | None = None,
        causal_attention: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        num_qk_channels = num_q_input_channels if num_qk_channels is None else num_qk_channels
        num_v_channels = num_qk_channels if num_v_channels is None else num_v_channels
        num_output_channels = num_q_input_channels if num_output_channels is None else num_output_channels
        self.num_heads = num_heads
        self.head_dim_qk = _heads(num_qk_channels, num_heads, "num_qk_channels")
        self.head_dim_v = _heads(num_v_channels, num_heads, "num_v_channels")
        self.dp_scale = self.head_dim_qk**-0.5
        self.causal_attention = causal_attention
        self.dropout = dropout
        self.backend = check_backend(backend)
        self.q_proj = nn.Linear(num_q_input_channels, num_qk_channels, bias=qkv_bias)
        self.k_proj = nn.Linear(num_kv_input_channels, num_qk_channels, bias=qkv_bias)
        self.v_proj = nn.Linear(num_kv_input_channels, num_v_channels, bias=qkv_bias)
        self.o_proj = nn.Linear(num_v_channels, num_output_channels, bias=out_bias)

    def project_q(self, x_q: Tensor) -> Tensor:
        """``(B, N, C) -> (B, N, H, Dqk)`` (a view of the projection)."""
        return self.q_proj(x_q).unflatten(-1, (self.num_heads, self.head_dim_qk))

    def project_kv(self, x_kv: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, L, C) -> k (B, L, H, Dqk), v (B, L, H, Dv)``: what a KV cache keeps (un-rotated)."""
        k = self.k_proj(x_kv).unflatten(-1, (self.num_heads, self.head_dim_qk))
        v = self.v_proj(x_kv).unflatten(-1, (self.num_heads, self.head_dim_v))
        return k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pad_mask: Tensor | None = None,
        rotary: RotaryPositions | None = None,
        shards: ShardPlan | None = None,
    ) -> Tensor:
        """Attention of projected ``q (B|1, N, H, Dqk)`` over ``k, v (B, L, H, D)``, then the output
        projection: ``(B, N, num_output_channels)``. ``pad_mask``: bool ``(B, L)``, True = padding.

        ``shards``: the keys are this rank's part of a context-parallel split (``shards.sizes`` attended keys
        per rank of ``shards.group``, rotary positions global): :func:`sharded_attention` over all of them."""
        options = dict(causal=self.causal_attention, key_padding_mask=pad_mask, scale=self.dp_scale)
        if rotary is not None and rotary.dim:
            options.update(rotary_dim=rotary.dim, q_positions=rotary.q, k_positions=rotary.k)
        if self.training and self.dropout > 0.0:
            if shards is not None:
                raise ValueError("attention dropout (dropout > 0 while training) does not run with sharded keys")
            out = attention_reference(q, k, v, dropout_p=self.dropout, **options)
        elif shards is not None:
            out = sharded_attention(
                q, k, v, group=shards.group, backend=self.backend, keys_before=shards.rows_before,
                keys_after=shards.rows_after, **options,
            )  # fmt: skip
        else:
            out = attention(q, k, v, backend=self.backend, **options)
        return self.o_proj(out.flatten(-2))

    def forward(
        self,
        x_q: Tensor,
        x_kv: Tensor,
        pad_mask: Tensor | None = None,
        rotary: RotaryPositions | None = None,
        shards: ShardPlan | None = None,
    ) -> Tensor:
        """``x_q (B|1, N, Cq)``, ``x_kv (B, L, Ckv)`` -> ``(B, N, num_output_channels)``."""
        q, (k, v) = self.project_q(x_q), self.project_kv(x_kv)
        return self.attend(q, k, v, pad_mask=pad_mask, rotary=rotary, shards=shards)


class CrossAttention(nn.Module):
    """Pre-LayerNorm cross-attention: ``attention(q_norm(x_q), kv_norm(x_kv))``.

    With ``x_kv_prefix`` instead of ``x_kv`` the keys are ``cat(kv_norm(x_kv_prefix), q_norm(x_q))``:
    the queries attend to a prefix and to themselves (Perceiver AR)."""

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        causal_attention: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.q_norm = nn.LayerNorm(num_q_input_channels)
        self.kv_norm = nn.LayerNorm(num_kv_input_channels)
        self.attention = MultiHeadAttention(
            num_heads, num_q_input_channels, num_kv_input_channels, num_qk_channels, num_v_channels,
            causal_attention=causal_attention, dropout=dropout, qkv_bias=qkv_bias, out_bias=out_bias,
            backend=backend,
        )  # fmt: skip

    def forward(
        self,
        x_q: Tensor,
        x_kv: Tensor | None = None,
        x_kv_prefix: Tensor | None = None,
        pad_mask: Tensor | None = None,
        rotary: RotaryPositions | None = None,
        shards: ShardPlan | None = None,
    ) -> Tensor:
        """``x_q (B|1, N, Cq)``; ``x_kv (B, L, Ckv)`` or ``x_kv_prefix (B, L - N, Ckv)`` -> ``(B, N, Cq)``.
        ``shards``: the keys are this rank's part of a context-parallel split (see ``MultiHeadAttention``)."""
        if (x_kv is None) == (x_kv_prefix is None):
            raise ValueError("pass exactly one of x_kv and x_kv_prefix")
        x_q = self.q_norm(x_q)
        if x_kv is None:
            x_kv = torch.cat([self.kv_norm(x_kv_prefix), x_q], dim=1)
        else:
            x_kv = self.kv_norm(x_kv)
        return self.attention(x_q, x_kv, pad_mask=pad_mask, rotary=rotary, shards=shards)


class SelfAttention(nn.Module):
    """Pre-LayerNorm self-attention: ``attention(norm(x), norm(x))``."""

    def __init__(
        self,
        num_heads: int,
        num_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        causal_attention: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.norm = nn.LayerNorm(num_channels)
        self.attention = MultiHeadAttention(
            num_heads, num_channels, num_channels, num_qk_channels, num_v_channels,
            causal_attention=causal_attention, dropout=dropout, qkv_bias=qkv_bias, out_bias=out_bias,
            backend=backend,
        )  # fmt: skip

    def forward(self, x: Tensor, pad_mask: Tensor | None = None, rotary: RotaryPositions | None = None) -> Tensor:
        """``(B, N, C) -> (B, N, C)``."""
        x = self.norm(x)
        return self.attention(x, x, pad_mask=pad_mask, rotary=rotary)
