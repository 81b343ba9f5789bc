"""Perceiver / Perceiver IO: encoder with weight-shared cross-attention layers and self-attention blocks,
and a cross-attention decoder."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from ..distributed.plan import ShardPlan
from ..functional import check_backend
from .adapters import InputAdapter, OutputAdapter, QueryProvider, TrainableQueryProvider
from .config import DecoderConfig, EncoderConfig, config_field, resolve
from .layers import CrossAttentionLayer, SelfAttentionBlock, init_parameters, maybe_checkpoint
from .shared import run_shared_chain


class PerceiverEncoder(nn.Module):
    """Perceiver IO encoder: latents ``(N, D)`` cross-attend to the adapted input, then self-attend.

    Weight sharing is module reuse (perceiver-io's semantics): cross-attention layers 2..P are one
    module, which is the first one too when ``first_cross_attention_layer_shared``; self-attention
    blocks 2..L are one module, the first one too when ``first_self_attention_block_shared``. The
    forward runs CA1, SA1, then for ``i in 1..L-1`` a cross-attention if ``i < P``, then a
    self-attention block. Only the cross-attention sees ``pad_mask``.

    ``shared_block_execution`` (settable) says how the blocks run in training: ``"reuse"`` (the default)
    is plain module reuse under autograd, as perceiver-io runs it; ``"recompute"`` is the memory mode: the
    self-attention layers go through :func:`run_shared_chain` and the cross-attention layers through
    activation checkpointing, so that between forward and backward only each layer's input is kept, the
    memory of ``activation_checkpointing`` in less time (README, "Models", has the measured trade-off).

    Args: ``input_adapter``, ``num_latents`` (N), ``num_latent_channels`` (D), ``config``
    (:class:`EncoderConfig`, perceiver-io's vocabulary; P = ``num_cross_attention_layers``, L =
    ``num_self_attention_blocks``, ``0 < P <= L``), ``backend``; any field of the config may also be given as a
    keyword (it overrides ``config``'s). The model keeps its configuration as ``self.config``.

    ``context_group`` (a ``torch.distributed`` process group, or None; settable): context parallelism. Every
    rank of the group gets the same ``x``; the adapted input is split along its ``M`` axis
    (:meth:`ShardPlan.balanced`), each rank projects and attends only its part, and the cross-attentions
    merge the partials across the group (:func:`~perceiver_kernels.distributed.sharded_attention`); the latent
    stack stays replicated. The ranks of a group must draw the same dropout masks (seed them alike).
    Gradients follow ``sharded_attention``'s convention: averaging them over the data x context ranks
    (DDP, FSDP2) gives the single-process gradients exactly.

    ``forward(x, pad_mask=None)``: ``x`` whatever the adapter takes, adapted to ``(B, M, C)``;
    ``pad_mask`` bool ``(B, M)``, True = padding. Returns the latents ``(B, N, D)``.
    """

    def __init__(
        self,
        input_adapter: InputAdapter,
        num_latents: int,
        num_latent_channels: int,
        config: EncoderConfig | None = None,
        *,
        backend: str = "auto",
        context_group=None,
        **options,
    ):
        super().__init__()
        config = resolve(EncoderConfig, config, options)
        cross_layers, blocks = config.num_cross_attention_layers, config.num_self_attention_blocks
        if not isinstance(cross_layers, int) or cross_layers <= 0:
            raise ValueError(f"num_cross_attention_layers must be a positive int, got {cross_layers!r}")
        if not isinstance(blocks, int) or blocks <= 0:
            raise ValueError(f"num_self_attention_blocks must be a positive int, got {blocks!r}")
        if cross_layers > blocks:
            raise ValueError(
                f"num_cross_attention_layers ({cross_layers}) must be <= num_self_attention_blocks ({blocks}): "
                "each cross-attention is followed by a self-attention block"
            )
        check_backend(backend)
        self.config = config
        self.context_group = context_group
        self.input_adapter = input_adapter
        shared = dict(dropout=config.dropout, residual_dropout=config.residual_dropout, backend=backend)

        def cross_attn() -> CrossAttentionLayer:
            return CrossAttentionLayer(
                config.num_cross_attention_heads, num_latent_channels, input_adapter.num_input_channels,
                config.num_cross_attention_qk_channels, config.num_cross_attention_v_channels,
                widening_factor=config.cross_attention_widening_factor, **shared,
            )  # fmt: skip

        def self_attn() -> SelfAttentionBlock:
            return SelfAttentionBlock(
                config.num_self_attention_layers_per_block, config.num_self_attention_heads, num_latent_channels,
                config.num_self_attention_qk_channels, config.num_self_attention_v_channels,
                widening_factor=config.self_attention_widening_factor,
                activation_checkpointing=config.activation_checkpointing, **shared,
            )  # fmt: skip

        self.latent_provider = TrainableQueryProvider(num_latents, num_latent_channels, config.init_scale)
        self.cross_attn_1 = cross_attn()
        self.self_attn_1 = self_attn()
        if self.extra_cross_attention_layer:
            self.cross_attn_n = cross_attn()
        if self.extra_self_attention_block:
            self.self_attn_n = self_attn()
        init_parameters(self, config.init_scale)

    num_cross_attention_layers = config_field("num_cross_attention_layers")
    num_self_attention_blocks = config_field("num_self_attention_blocks")
    first_cross_attention_layer_shared = config_field("first_cross_attention_layer_shared")
    first_self_attention_block_shared = config_field("first_self_attention_block_shared")
    shared_block_execution = config_field("shared_block_execution", settable=True)

    @property
    def activation_checkpointing(self) -> bool:
        """``config.activation_checkpointing`` (settable: the self-attention blocks follow)."""
        return self.config.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.config = dataclasses.replace(self.config, activation_checkpointing=value)
        for block in (self.self_attn_1, getattr(self, "self_attn_n", None)):
            if block is not None:
                block.activation_checkpointing = value

    @property
    def extra_cross_attention_layer(self) -> bool:
        return self.num_cross_attention_layers > 1 and not self.first_cross_attention_layer_shared

    @property
    def extra_self_attention_block(self) -> bool:
        return self.num_self_attention_blocks > 1 and not self.first_self_attention_block_shared

    def forward(self, x, pad_mask: Tensor | None = None, return_adapted_input: bool = False):
        x_adapted = self.input_adapter(x)
        cross_attn_n = self.cross_attn_n if self.extra_cross_attention_layer else self.cross_attn_1
        self_attn_n = self.self_attn_n if self.extra_self_attention_block else self.self_attn_1
        x_kv, kv_pad_mask, shards = x_adapted, pad_mask, None
        if self.context_group is not None:  # this rank's part of the input; the attention merges the rest
            shards = ShardPlan.for_group(x_adapted.shape[1], self.context_group)
            x_kv, kv_pad_mask = shards.shard(x_adapted), shards.shard(pad_mask)

        recompute = self.activation_checkpointing or self.shared_block_execution == "recompute"

        def cross_attend(layer: CrossAttentionLayer, latents: Tensor) -> Tensor:
            return maybe_checkpoint(layer, recompute, latents, x_kv, pad_mask=kv_pad_mask, shards=shards)

        latents = cross_attend(self.cross_attn_1, self.latent_provider())  # the (1, N, D) latents broadcast
        chain = [self.self_attn_1]
        for i in range(1, self.num_self_attention_blocks):
            if i < self.num_cross_attention_layers:
                latents = cross_attend(cross_attn_n, self._self_attend(chain, latents))
                chain = []
            chain.append(self_attn_n)
        latents = self._self_attend(chain, latents)
        return (latents, x_adapted) if return_adapted_input else latents

    def _self_attend(self, chain: list[SelfAttentionBlock], latents: Tensor) -> Tensor:
        """Consecutive self-attention blocks, their layers recomputed in backward in the memory mode."""
        if self.shared_block_execution == "recompute":
            return run_shared_chain([layer for block in chain for layer in block], latents)
        for block in chain:
            latents = block(latents)
        return latents


class PerceiverDecoder(nn.Module):
    """Perceiver IO decoder: output queries ``(1|B, O, F)`` cross-attend to the latents ``(B, N, D)``;
    ``forward(x, **kwargs) -> output_adapter(output (B, O, F), **kwargs)``."""

    def __init__(
        self,
        output_adapter: OutputAdapter,
        output_query_provider: QueryProvider,
        num_latent_channels: int,
        config: DecoderConfig | None = None,
        *,
        backend: str = "auto",
        **options,
    ):
        super().__init__()
        config = resolve(DecoderConfig, config, options)
        check_backend(backend)
        self.config = config
        self.output_query_provider = output_query_provider
        self.output_adapter = output_adapter
        self.cross_attn = CrossAttentionLayer(
            config.num_cross_attention_heads, output_query_provider.num_query_channels, num_latent_channels,
            config.num_cross_attention_qk_channels, config.num_cross_attention_v_channels,
            widening_factor=config.cross_attention_widening_factor, dropout=config.dropout,
            residual_dropout=config.residual_dropout, attention_residual=config.cross_attention_residual,
            backend=backend,
        )  # fmt: skip
        init_parameters(self.cross_attn, config.init_scale)
        init_parameters(self.output_adapter, config.init_scale)

    activation_checkpointing = config_field("activation_checkpointing")

    def forward(self, x: Tensor, **kwargs):
        output_query = self.output_query_provider(x)
        output = maybe_checkpoint(self.cross_attn, self.activation_checkpointing, output_query, x)
        return self.output_adapter(output, **kwargs)


class PerceiverIO(nn.Sequential):
    """``decoder(encoder(x, pad_mask))``. A ``Sequential`` of the two, as in perceiver-io, so that the
    state dicts share their keys (``0.*`` the encoder, ``1.*`` the decoder). ``context_group`` is the
    encoder's (the decoder attends to the replicated latents)."""

    def __init__(self, encoder: PerceiverEncoder, decoder: PerceiverDecoder):
        super().__init__(encoder, decoder)

    @property
    def context_group(self):
        return self.encoder.context_group

    @context_group.setter
    def context_group(self, group) -> None:
        self.encoder.context_group = group

    @property
    def encoder(self) -> PerceiverEncoder:
        return self[0]

    @encoder.setter
    def encoder(self, module: PerceiverEncoder) -> None:
        self[0] = module

    @property
    def decoder(self) -> PerceiverDecoder:
        return self[1]

    @decoder.setter
    def decoder(self, module: PerceiverDecoder) -> None:
        self[1] = module

    def forward(self, x, pad_mask: Tensor | None = None, **kwargs):
        return self.decoder(self.encoder(x, pad_mask=pad_mask), **kwargs)
