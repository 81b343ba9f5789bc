"""Residual attention layers and blocks: pre-LayerNorm, residuals add the un-normalised input, MLP with a
widening factor and exact GELU, no final norm (perceiver-io's structure and parameter names)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttention, RotaryPositions, SelfAttention
from .shared import recomputing


def init_parameters(module: nn.Module, init_scale: float) -> None:
    """perceiver-io's init: Linear and Embedding weights ~ N(0, init_scale), Linear biases 0 (LayerNorms
    keep ones and zeros)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, init_scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, init_scale)


class Residual(nn.Module):
    """``module(x, ...) + x``, with dropout on the branch (perceiver-io's ``residual_dropout``)."""

    def __init__(self, module: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.module = module
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.dropout(self.module(x, *args, **kwargs)) + x


class MLP(nn.Sequential):
    """``LayerNorm -> Linear(C, wC) -> GELU (exact) -> Linear(wC, C)``."""

    def __init__(self, num_channels: int, widening_factor: int, bias: bool = True):
        if not isinstance(widening_factor, int) or widening_factor <= 0:
            raise ValueError(f"widening_factor must be a positive int, got {widening_factor!r}")
        super().__init__(
            nn.LayerNorm(num_channels),
            nn.Linear(num_channels, widening_factor * num_channels, bias=bias),
            nn.GELU(),
            nn.Linear(widening_factor * num_channels, num_channels, bias=bias),
        )


class _AttentionThenMLP(nn.Sequential):
    """``[0]``: the (residual) attention, which takes the extra arguments; ``[1]``: the residual MLP."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self[1](self[0](x, *args, **kwargs))


class CrossAttentionLayer(_AttentionThenMLP):
    """Residual cross-attention, then a residual MLP: ``forward(x_q, x_kv | x_kv_prefix=, pad_mask=, rotary=)``
    ``-> (B, N, num_q_input_channels)``. Without ``attention_residual`` (Perceiver IO decoders) the attention
    output replaces the query instead of adding to it."""

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        causal_attention: bool = False,
        widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        attention_residual: bool = True,
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
        backend: str = "auto",
    ):
        cross_attn = CrossAttention(
            num_heads, num_q_input_channels, num_kv_input_channels, num_qk_channels, num_v_channels,
            causal_attention=causal_attention, dropout=dropout, qkv_bias=qkv_bias, out_bias=out_bias,
            backend=backend,
        )  # fmt: skip
        super().__init__(
            Residual(cross_attn, residual_dropout) if attention_residual else cross_attn,
            Residual(MLP(num_q_input_channels, widening_factor, bias=mlp_bias), residual_dropout),
        )


class SelfAttentionLayer(_AttentionThenMLP):
    """Residual self-attention, then a residual MLP: ``forward(x, pad_mask=, rotary=) -> (B, N, C)``."""

    def __init__(
        self,
        num_heads: int,
        num_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        causal_attention: bool = False,
        widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
        backend: str = "auto",
    ):
        self_attn = SelfAttention(
            num_heads, num_channels, num_qk_channels, num_v_channels, causal_attention=causal_attention,
            dropout=dropout, qkv_bias=qkv_bias, out_bias=out_bias, backend=backend,
        )  # fmt: skip
        super().__init__(
            Residual(self_attn, residual_dropout),
            Residual(MLP(num_channels, widening_factor, bias=mlp_bias), residual_dropout),
        )


class SelfAttentionBlock(nn.Sequential):
    """``num_layers`` self-attention layers; rotary embeddings (when given) in the first
    ``num_rotary_layers`` of them (-1: all).

    ``forward(x (B, N, C), pad_mask=None, rotary=None) -> (B, N, C)``. With ``activation_checkpointing``
    each layer keeps only its input and recomputes the rest in backward.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        num_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        num_rotary_layers: int = 1,
        activation_checkpointing: bool = False,
        **layer_options,
    ):
        """``layer_options``: :class:`SelfAttentionLayer`'s keywords (``causal_attention``,
        ``widening_factor``, ``dropout``, ``residual_dropout``, ``qkv_bias``, ``out_bias``, ``mlp_bias``,
        ``backend``), the same for every layer."""
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        super().__init__(
            *(
                SelfAttentionLayer(num_heads, num_channels, num_qk_channels, num_v_channels, **layer_options)
                for _ in range(num_layers)
            )
        )
        self.num_rotary_layers = num_layers if num_rotary_layers == -1 else num_rotary_layers
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: Tensor, pad_mask: Tensor | None = None, rotary: RotaryPositions | None = None) -> Tensor:
        for i, layer in enumerate(self):
            layer_rotary = rotary if i < self.num_rotary_layers else None
            x = maybe_checkpoint(layer, self.activation_checkpointing, x, pad_mask, layer_rotary)
        return x


def maybe_checkpoint(module: nn.Module, enabled: bool, *args, **kwargs) -> Tensor:
    """``module(*args, **kwargs)``, activation-checkpointed when ``enabled``, training and grad mode is on,
    except while ``run_shared_chain`` recomputes the module (which is itself a checkpoint)."""
    if enabled and module.training and torch.is_grad_enabled() and not recomputing():
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)
