"""Model configurations as dataclasses, in perceiver-io's vocabulary (``EncoderConfig``, ``DecoderConfig``,
``PerceiverARConfig``, ``CausalSequenceModelConfig``): one object describes a model, and can be printed,
compared, and saved (``dataclasses.asdict``) and rebuilt (``Config(**saved)``).

What they leave out on purpose: the adapters and query providers (modules, not numbers), the sizes that
perceiver-io passes next to its config (``num_latents``, ``num_latent_channels``), and ``backend``, which says
how to run a model, not what it is. Defaults are this package's (perceiver-io's where it has them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C")


def resolve(config_type: type[C], config: C | None, options: dict[str, Any]) -> C:
    """``config`` (default: ``config_type()``) with ``options`` set: the keyword constructors' path. Unknown
    options raise a TypeError naming them."""
    if config is None:
        config = config_type()
    elif not isinstance(config, config_type):
        raise TypeError(f"config must be a {config_type.__name__}, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))} ({config_type.__name__} "
                        f"has {', '.join(sorted(known))})")  # fmt: skip
    return dataclasses.replace(config, **options) if options else config


def config_field(name: str, settable: bool = False) -> property:
    """A model attribute that reads its configuration's field ``name``; ``settable`` for run-time switches the
    model itself reads at each call (setting it replaces ``model.config``), not for what built its modules."""

    def get(model):
        return getattr(model.config, name)

    def set_(model, value):
        model.config = dataclasses.replace(model.config, **{name: value})

    return property(get, set_ if settable else None, doc=f"``config.{name}``")


# How an encoder runs its self-attention blocks (``EncoderConfig.shared_block_execution``):
# "reuse": plain module reuse under autograd, perceiver-io's (every activation kept until backward; fastest);
# "recompute": the memory mode, every layer recomputed in backward (run_shared_chain for the self-attention
# layers, checkpointing for the cross-attentions): activation checkpointing's memory in less time.
SHARED_BLOCK_EXECUTION = ("reuse", "recompute")


@dataclass(frozen=True)
class EncoderConfig:
    """:class:`~perceiver_kernels.models.PerceiverEncoder`: P cross-attention layers (2..P share weights, with
    the first too when ``first_cross_attention_layer_shared``), L self-attention blocks of
    ``num_self_attention_layers_per_block`` layers (2..L share weights, with the first too when
    ``first_self_attention_block_shared``). qk/v channels default to the query's channels."""

    num_cross_attention_heads: int = 4
    num_cross_attention_qk_channels: int | None = None
    num_cross_attention_v_channels: int | None = None
    num_cross_attention_layers: int = 1
    first_cross_attention_layer_shared: bool = False
    cross_attention_widening_factor: int = 1
    num_self_attention_heads: int = 4
    num_self_attention_qk_channels: int | None = None
    num_self_attention_v_channels: int | None = None
    num_self_attention_layers_per_block: int = 6
    num_self_attention_blocks: int = 1
    first_self_attention_block_shared: bool = True
    self_attention_widening_factor: int = 1
    dropout: float = 0.0  # on the attention probabilities (training; the reference path)
    residual_dropout: float = 0.0
    init_scale: float = 0.02
    activation_checkpointing: bool = False
    shared_block_execution: str = "reuse"  # one of SHARED_BLOCK_EXECUTION (True/False: "recompute"/"reuse")

    def __post_init__(self):
        mode = self.shared_block_execution
        if isinstance(mode, bool):  # the switch's earlier, boolean form
            object.__setattr__(self, "shared_block_execution", "recompute" if mode else "reuse")
        elif mode not in SHARED_BLOCK_EXECUTION:
            raise ValueError(f"shared_block_execution must be one of {', '.join(map(repr, SHARED_BLOCK_EXECUTION))} "
                             f"(or a bool), got {mode!r}")  # fmt: skip


@dataclass(frozen=True)
class DecoderConfig:
    """:class:`~perceiver_kernels.models.PerceiverDecoder`: output queries cross-attend to the latents; without
    ``cross_attention_residual`` the attention output replaces the query instead of adding to it."""

    num_cross_attention_heads: int = 4
    num_cross_attention_qk_channels: int | None = None
    num_cross_attention_v_channels: int | None = None
    cross_attention_widening_factor: int = 1
    cross_attention_residual: bool = True
    dropout: float = 0.0
    residual_dropout: float = 0.0
    init_scale: float = 0.02
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class PerceiverARConfig:
    """:class:`~perceiver_kernels.models.PerceiverAR` (see its docstring for each field)."""

    num_heads: int = 8
    num_self_attention_layers: int = 6
    num_self_attention_rotary_layers: int = 1
    self_attention_widening_factor: int = 4
    cross_attention_widening_factor: int = 4
    cross_attention_dropout: float = 0.5
    post_attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    init_scale: float = 0.02
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class CausalSequenceModelConfig(PerceiverARConfig):
    """:class:`~perceiver_kernels.models.CausalSequenceModel`: a :class:`PerceiverARConfig` plus the token
    model's sizes (defaults: perceiver-io's small text model)."""

    num_self_attention_layers: int = 8
    vocab_size: int = 262
    max_seq_len: int = 4096
    max_latents: int = 512
    num_channels: int = 512
    output_norm: bool = False
    output_bias: bool = True
    abs_pos_emb: bool = True
