"""Perceiver AR and a small causal language model on it, with exact KV-cache decoding.

A sequence ``x (B, n)`` splits into a prefix ``x[:, :p]`` and ``N = n - p`` latents ``x[:, p:]``. The
latents cross-attend causally (bottom-right aligned) to ``cat(kv_norm(prefix), q_norm(latents))``,
then run a causal self-attention block. Rotary embeddings rotate q and k in the cross-attention and in
the first ``num_self_attention_rotary_layers`` self-attention layers, from integer positions that the
kernels turn into angles on load. With left padding every sample's first real token is position 0.

Decoding (``prefill`` / ``step``). While the latent window grows, a new token is one more latent and
everything it needs is cached: its cross-attention keys and the self-attention keys of every layer.
Once the window holds ``max_latents`` tokens, a new token pushes the oldest latent into the prefix. A
full forward then computes that position's keys from ``kv_norm`` instead of ``q_norm`` and every
latent's cross-attention sees one more prefix key, so every latent's hidden state changes. An exact
cache must therefore (1) recompute the departing position's keys once, with ``kv_norm``, and append
them to the prefix keys, and (2) rerun the latent stack (N queries) over the cached prefix. The prefix,
usually the long part, is never recomputed. (perceiver-io keeps the stale latent states instead, which
is cheaper and only approximately equal to a full forward.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..distributed.plan import ShardPlan
from ..functional import check_backend
from .adapters import RotarySupport, TiedTokenOutputAdapter, TokenInputAdapter
from .attention import RotaryPositions
from .config import CausalSequenceModelConfig, PerceiverARConfig, config_field, resolve
from .layers import CrossAttentionLayer, SelfAttentionBlock, init_parameters, maybe_checkpoint


def sequence_positions(pad_mask: Tensor | None, start: int, stop: int, device: torch.device) -> Tensor:
    """Positions of tokens ``start..stop-1``: ``(1, n)`` without padding, else ``(B, n)`` shifted by
    each sample's number of left pads (clamped at 0, perceiver-io's convention)."""
    index = torch.arange(start, stop, device=device)[None]
    if pad_mask is None:
        return index
    return (index - pad_mask.sum(dim=1, keepdim=True)).clamp(min=0)


@dataclass
class PerceiverARCache:
    """Decoding state of :class:`PerceiverAR` (built by ``prefill``, advanced by ``step``).

    Attributes:
        tokens: ``(B, t)`` every token so far, left padding included.
        pad_mask: bool ``(B, t)`` (True = padding) or None.
        prefix_len: ``p``; tokens ``p..t-1`` are the latents.
        max_latents: the latent window.
        cross_k, cross_v: ``(B, capacity, H, D)``, rows ``< p``: prefix keys/values (from ``kv_norm``),
            rows ``p..t-1``: latent keys/values (from ``q_norm``). Un-rotated: the kernels rotate on load.
        self_k, self_v: per self-attention layer ``(B, max_latents, H, D)``, rows ``< t - p`` valid.
    """

    tokens: Tensor
    pad_mask: Tensor | None
    prefix_len: int
    max_latents: int
    cross_k: Tensor
    cross_v: Tensor
    self_k: list[Tensor] = field(default_factory=list)
    self_v: list[Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def capacity(self) -> int:
        return self.cross_k.shape[1]

    @property
    def num_latents(self) -> int:
        return self.length - self.prefix_len

    def positions(self, start: int, stop: int) -> Tensor:
        return sequence_positions(self.pad_mask, start, stop, self.tokens.device)


class PerceiverAR(nn.Module):
    """Perceiver AR (perceiver-io's arguments): ``forward(x (B, n), prefix_len, pad_mask=None) -> (B, n - p, C)``.

    Args:
        input_adapter: embeds tokens ``(B, n) -> (B, n, C)`` and says how many channels of every head rotate.
        config: a :class:`PerceiverARConfig` (kept as ``self.config``) with the fields below, each of which
            may also be given as a keyword (it overrides ``config``'s):
        num_heads: heads of every attention (head dim ``C / num_heads``).
        num_self_attention_layers: causal self-attention layers over the latents.
        num_self_attention_rotary_layers: how many of them (from the first) use rotary; -1: all.
        self_attention_widening_factor, cross_attention_widening_factor: MLP widths.
        cross_attention_dropout: prefix dropout (training only): every sample keeps exactly
            ``p - int(p * rate)`` random prefix positions, in order, with their positions and padding
            flags. The prefix is gathered before the projections, so the compute really shrinks.
        post_attention_dropout: dropout on the attention probabilities (reference path when > 0).
        residual_dropout: dropout on every residual branch.
        init_scale: std of the normal init of Linear/Embedding weights.
        activation_checkpointing: recompute every layer in backward.
        backend: ``pk.attention`` backend.
        context_group: a ``torch.distributed`` process group, or None (settable): context parallelism. Every
            rank gets the same ``x``; the sequence is split by :meth:`ShardPlan.balanced` with the latents on
            the last rank, each rank projects and attends only its part of the prefix (that rank: with the
            latents, causally), and the cross-attention merges the partials across the group
            (:func:`~perceiver_kernels.distributed.sharded_attention`, rotary at global positions); the latent
            stack stays replicated. Prefix dropout then keeps ``m - int(m * rate)`` of each rank's ``m`` prefix
            positions (stratified by rank). The ranks of a group must draw the same dropout masks (seed them
            alike). Gradients averaged over the data x context ranks (DDP, FSDP2) are the single-process ones.
    """

    def __init__(
        self,
        input_adapter: RotarySupport,
        config: PerceiverARConfig | None = None,
        *,
        backend: str = "auto",
        context_group=None,
        **options,
    ):
        super().__init__()
        config = resolve(PerceiverARConfig, config, options)
        channels, num_heads = input_adapter.num_input_channels, config.num_heads
        if channels % num_heads:
            raise ValueError(f"num_input_channels={channels} must be a multiple of num_heads={num_heads}")
        if input_adapter.rotated_channels_per_head > channels // num_heads:
            raise ValueError(
                f"rotated_channels_per_head={input_adapter.rotated_channels_per_head} exceeds the head dim "
                f"{channels // num_heads}"
            )
        if not 0.0 <= config.cross_attention_dropout < 1.0:
            raise ValueError(f"cross_attention_dropout must be in [0, 1), got {config.cross_attention_dropout}")
        check_backend(backend)
        self.config = config
        self.context_group = context_group
        self.input_adapter = input_adapter
        shared = dict(
            causal_attention=True, dropout=config.post_attention_dropout, residual_dropout=config.residual_dropout,
            qkv_bias=False, mlp_bias=False, backend=backend,
        )  # fmt: skip
        self.cross_attention = CrossAttentionLayer(
            num_heads, channels, channels, widening_factor=config.cross_attention_widening_factor, out_bias=True,
            **shared,
        )  # fmt: skip
        self.self_attention = SelfAttentionBlock(
            config.num_self_attention_layers, num_heads, channels,
            num_rotary_layers=config.num_self_attention_rotary_layers,
            widening_factor=config.self_attention_widening_factor,
            activation_checkpointing=config.activation_checkpointing, out_bias=False, **shared,
        )  # fmt: skip
        init_parameters(self, config.init_scale)

    num_heads = config_field("num_heads")
    cross_attention_dropout = config_field("cross_attention_dropout")
    activation_checkpointing = config_field("activation_checkpointing")

    @property
    def rotary_dim(self) -> int:
        return self.input_adapter.rotated_channels_per_head

    def _check_input(self, x: Tensor, prefix_len: int, pad_mask: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a (B, n) tensor of token ids, got {getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(prefix_len, int) or not 0 <= prefix_len < x.shape[1]:
            raise ValueError(f"prefix_len must be an int in [0, n={x.shape[1]}), got {prefix_len!r}")
        if pad_mask is not None and (pad_mask.dtype != torch.bool or pad_mask.shape != x.shape):
            raise ValueError(f"pad_mask must be a bool tensor shaped like x {tuple(x.shape)}, got "
                             f"{pad_mask.dtype} {tuple(pad_mask.shape)}")  # fmt: skip

    def _kept_count(self, prefix_len: int) -> int:
        return prefix_len - int(prefix_len * self.cross_attention_dropout)

    def _kept_prefix_rows(self, batch: int, prefix_len: int, device: torch.device) -> Tensor:
        """``(B, keep)`` sorted random prefix rows of every sample, ``keep = p - int(p * rate)``."""
        rows = torch.rand(batch, prefix_len, device=device).topk(self._kept_count(prefix_len), dim=1).indices
        return rows.sort(dim=1).values

    def forward(self, x: Tensor, prefix_len: int, pad_mask: Tensor | None = None) -> Tensor:
        self._check_input(x, prefix_len, pad_mask)
        batch, length = x.shape
        positions = sequence_positions(pad_mask, 0, length, x.device)
        emb = self.input_adapter(x, abs_pos=positions)
        x_latent = emb[:, prefix_len:]
        # The keys this rank attends: prefix rows [lo, hi), then the latents (rows prefix_len..) if it holds them.
        lo, hi, holds_latents, shards = 0, prefix_len, True, None
        if self.context_group is not None:
            plan = ShardPlan.for_group(length, self.context_group, tail=length - prefix_len)
            lo, hi, holds_latents = min(plan.start, prefix_len), min(plan.stop, prefix_len), plan.stop == length
        dropout = self.training and self.cross_attention_dropout > 0.0
        if dropout and hi > lo:  # prefix dropout: gather the kept rows before the projections
            kept = lo + self._kept_prefix_rows(batch, hi - lo, x.device)
            x_prefix = emb.gather(1, kept[:, :, None].expand(-1, -1, emb.shape[-1]))
            rows = kept
            if holds_latents:
                rows = torch.cat([kept, torch.arange(prefix_len, length, device=x.device).expand(batch, -1)], dim=1)
            k_positions = positions.expand(batch, -1).gather(1, rows)
            kv_pad_mask = None if pad_mask is None else pad_mask.gather(1, rows)
        else:
            x_prefix, stop = emb[:, lo:hi], length if holds_latents else hi
            k_positions, kv_pad_mask = positions, pad_mask
            if (lo, stop) != (0, length):
                k_positions = positions[:, lo:stop]
                kv_pad_mask = None if pad_mask is None else pad_mask[:, lo:stop]
        if self.context_group is not None:  # attended keys per rank, which every rank can count alike
            sizes = [max(0, min(b, prefix_len) - a) for a, b in plan.bounds()]  # prefix rows of each rank
            sizes = [self._kept_count(n) for n in sizes] if dropout else sizes
            sizes[-1] += length - prefix_len  # the latents
            shards = ShardPlan(tuple(sizes), plan.rank, plan.group)
        q_positions = positions[:, prefix_len:]
        kv = dict(x_kv_prefix=x_prefix) if holds_latents else dict(x_kv=x_prefix)
        x_latent = maybe_checkpoint(
            self.cross_attention, self.activation_checkpointing, x_latent, **kv, pad_mask=kv_pad_mask,
            rotary=RotaryPositions(self.rotary_dim, q_positions, k_positions), shards=shards,
        )  # fmt: skip
        latent_pad_mask = None if pad_mask is None else pad_mask[:, prefix_len:]
        rotary = RotaryPositions(self.rotary_dim, q_positions, q_positions)
        return self.self_attention(x_latent, pad_mask=latent_pad_mask, rotary=rotary)

    # -- decoding -----------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(
        self, x: Tensor, prefix_len: int, max_latents: int, capacity: int, pad_mask: Tensor | None = None
    ) -> tuple[Tensor, PerceiverARCache]:
        """Forward of ``x (B, n)`` that also fills a decoding cache of ``capacity`` positions.

        Returns the latents' hidden states ``(B, n - prefix_len, C)`` (equal to ``forward`` in eval
        mode) and the cache."""
        self._check_decoding()
        self._check_input(x, prefix_len, pad_mask)
        batch, length = x.shape
        if not 0 < length - prefix_len <= max_latents:
            raise ValueError(f"n - prefix_len = {length - prefix_len} latents; max_latents is {max_latents}")
        if capacity < length:
            raise ValueError(f"capacity={capacity} is shorter than the input ({length})")
        if pad_mask is not None and not bool(pad_mask.any()):
            pad_mask = None
        attn = self.cross_attention[0].module.attention
        device, dtype = attn.k_proj.weight.device, self._compute_dtype()

        def buffer(rows: int, head_dim: int) -> Tensor:
            return torch.zeros(batch, rows, self.num_heads, head_dim, dtype=dtype, device=device)

        layers = self.self_attention
        cache = PerceiverARCache(
            tokens=x, pad_mask=pad_mask, prefix_len=prefix_len, max_latents=max_latents,
            cross_k=buffer(capacity, attn.head_dim_qk), cross_v=buffer(capacity, attn.head_dim_v),
            self_k=[buffer(max_latents, layer[0].module.attention.head_dim_qk) for layer in layers],
            self_v=[buffer(max_latents, layer[0].module.attention.head_dim_v) for layer in layers],
        )  # fmt: skip
        emb = self.input_adapter(x, abs_pos=cache.positions(0, length))
        self._cache_prefix_keys(emb[:, :prefix_len], cache, 0)
        return self._latent_stack(emb[:, prefix_len:], cache, start=0), cache

    @torch.no_grad()
    def step(self, token: Tensor, cache: PerceiverARCache) -> Tensor:
        """Append ``token (B, 1)`` to the sequence: returns the new last latent's hidden state ``(B, 1, C)``,
        equal to the last row of a full forward of the longer sequence, and advances ``cache`` in place."""
        self._check_decoding()
        if token.dim() != 2 or token.shape != (cache.tokens.shape[0], 1):
            raise ValueError(f"token must be (B, 1) = ({cache.tokens.shape[0]}, 1), got {tuple(token.shape)}")
        if cache.length >= cache.capacity:
            raise ValueError(f"the cache is full ({cache.capacity} positions); prefill a shorter window")
        if self._compute_dtype() != cache.cross_k.dtype:
            raise ValueError(f"the cache holds {cache.cross_k.dtype} keys, this step would compute "
                             f"{self._compute_dtype()}: run prefill and step under the same autocast")  # fmt: skip
        length = cache.length + 1
        cache.tokens = torch.cat([cache.tokens, token.to(cache.tokens.dtype)], dim=1)
        if cache.pad_mask is not None:
            cache.pad_mask = torch.cat([cache.pad_mask, cache.pad_mask.new_zeros(token.shape)], dim=1)
        if length - cache.prefix_len <= cache.max_latents:  # the window grows: one more latent
            start = length - 1 - cache.prefix_len
        else:  # the oldest latent moves to the prefix; the latents see one more prefix key: rerun them
            p = cache.prefix_len
            self._cache_prefix_keys(self._embed(cache, p, p + 1), cache, p)
            cache.prefix_len, start = p + 1, 0
        emb = self._embed(cache, cache.prefix_len + start, length)
        return self._latent_stack(emb, cache, start)[:, -1:]

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the projections produce here: the autocast dtype under autocast, else the weights'."""
        weight = self.cross_attention[0].module.attention.k_proj.weight
        if torch.is_autocast_enabled(weight.device.type):
            return torch.get_autocast_dtype(weight.device.type)
        return weight.dtype

    def _check_decoding(self) -> None:
        if self.training:
            raise RuntimeError("decoding runs in eval mode (no dropout): call model.eval() first")

    def _embed(self, cache: PerceiverARCache, start: int, stop: int) -> Tensor:
        return self.input_adapter(cache.tokens[:, start:stop], abs_pos=cache.positions(start, stop))

    def _cache_prefix_keys(self, emb: Tensor, cache: PerceiverARCache, row: int) -> None:
        """Prefix keys/values of ``emb (B, m, C)`` (``kv_norm``) into cross-attention rows ``row..row+m-1``."""
        if emb.shape[1] == 0:
            return
        cross = self.cross_attention[0].module
        k, v = cross.attention.project_kv(cross.kv_norm(emb))
        cache.cross_k[:, row : row + emb.shape[1]] = k
        cache.cross_v[:, row : row + emb.shape[1]] = v

    def _latent_stack(self, h: Tensor, cache: PerceiverARCache, start: int) -> Tensor:
        """Latents ``start..start+m-1`` (``h (B, m, C)``, embedded) through cross- and self-attention,
        over the cached keys of everything before them; writes their keys into the cache.

        It spells out what ``CrossAttentionLayer`` / ``SelfAttentionLayer.forward`` compute (in eval mode:
        no dropout), with the keys coming from the cache; the decoding-equals-forward tests guard the two
        against drifting apart."""
        p = cache.prefix_len
        first, stop = p + start, p + start + h.shape[1]  # sequence rows of these latents
        positions = cache.positions(0, stop)
        pad_mask = None if cache.pad_mask is None else cache.pad_mask[:, :stop]
        residual_attention, residual_mlp = self.cross_attention
        cross = residual_attention.module
        q_in = cross.q_norm(h)
        k, v = cross.attention.project_kv(q_in)
        cache.cross_k[:, first:stop], cache.cross_v[:, first:stop] = k, v
        rotary = RotaryPositions(self.rotary_dim, positions[:, first:], positions)
        out = cross.attention.attend(
            cross.attention.project_q(q_in), cache.cross_k[:, :stop], cache.cross_v[:, :stop], pad_mask, rotary
        )
        h = residual_mlp(h + out)
        latent_pad_mask = None if pad_mask is None else pad_mask[:, p:]
        for i, (residual_attention, residual_mlp) in enumerate(self.self_attention):
            attn = residual_attention.module
            x = attn.norm(h)
            k, v = attn.attention.project_kv(x)
            cache.self_k[i][:, start : start + h.shape[1]], cache.self_v[i][:, start : start + h.shape[1]] = k, v
            rotary = None
            if i < self.self_attention.num_rotary_layers:
                rotary = RotaryPositions(self.rotary_dim, positions[:, first:], positions[:, p:])
            keys, values = cache.self_k[i][:, : stop - p], cache.self_v[i][:, : stop - p]
            out = attn.attention.attend(attn.attention.project_q(x), keys, values, latent_pad_mask, rotary)
            h = residual_mlp(h + out)
        return h


class CausalSequenceModel(PerceiverAR):
    """A Perceiver AR language model: token (+ absolute position) embedding, :class:`PerceiverAR`, optional
    output LayerNorm, logits tied to the token embedding. A :class:`PerceiverAR` itself, as in perceiver-io,
    so that its state dict has perceiver-io's keys (``input_adapter.*``, ``cross_attention.*``,
    ``self_attention.*``, ``out_norm.*``, ``output_adapter.*``) and its checkpoints load as they are.

    Rotary embeddings rotate ``C / H`` channels of every head, half of that when absolute position
    embeddings are used too (perceiver-io's choice). ``forward(x (B, n), prefix_len=None, pad_mask=None)
    -> logits (B, n - prefix_len, vocab_size)``; ``prefix_len`` defaults to ``max(n - max_latents, 0)``.
    """

    def __init__(self, config: CausalSequenceModelConfig, backend: str = "auto", context_group=None):
        if not 0 < config.max_latents <= config.max_seq_len:
            raise ValueError(f"max_latents={config.max_latents} must be in [1, max_seq_len={config.max_seq_len}]")
        head_dim = config.num_channels // config.num_heads
        rotated = head_dim // 2 if config.abs_pos_emb else head_dim
        input_adapter = TokenInputAdapter(
            config.vocab_size, config.max_seq_len, config.num_channels, abs_pos_emb=config.abs_pos_emb,
            rotated_channels_per_head=rotated - rotated % 2,
        )  # fmt: skip
        super().__init__(input_adapter, config, backend=backend, context_group=context_group)
        self.out_norm = nn.LayerNorm(config.num_channels) if config.output_norm else None
        self.output_adapter = TiedTokenOutputAdapter(config.vocab_size, emb_bias=config.output_bias)

    def logits(self, hidden: Tensor) -> Tensor:
        """``(B, N, C) -> (B, N, vocab_size)``."""
        if self.out_norm is not None:
            hidden = self.out_norm(hidden)
        return self.output_adapter(hidden, self.input_adapter.txt_embedding)

    def default_prefix_len(self, length: int) -> int:
        return max(length - self.config.max_latents, 0)

    def forward(self, x: Tensor, prefix_len: int | None = None, pad_mask: Tensor | None = None) -> Tensor:
        if prefix_len is None:
            prefix_len = self.default_prefix_len(x.shape[1])
        if x.shape[1] - prefix_len > self.config.max_latents:
            raise ValueError(
                f"n - prefix_len = {x.shape[1] - prefix_len} latents exceed max_latents={self.config.max_latents}"
            )
        return self.logits(super().forward(x, prefix_len, pad_mask=pad_mask))

    @torch.no_grad()
    def generate(
        self,
        x: Tensor,
        max_new_tokens: int,
        num_latents: int = 1,
        pad_mask: Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Continue ``x (B, n)`` (left-padded where ``pad_mask`` says) by ``max_new_tokens`` tokens.

        The prompt's last ``num_latents`` tokens start as latents; the window grows to ``max_latents``,
        then slides (the prefix grows). At ``max_seq_len`` the oldest token is dropped and the cache is
        rebuilt from the remaining window. Greedy unless ``do_sample`` (``temperature``, ``top_k``,
        ``top_p``, ``generator``). ``use_cache=False`` runs a full forward per token instead (same tokens).
        Runs in eval mode and restores the training flag. Returns ``(B, n + max_new_tokens)``.
        """
        length = x.shape[1]
        if not 1 <= num_latents <= min(length, self.config.max_latents):
            raise ValueError(f"num_latents must be in [1, min(n={length}, max_latents={self.config.max_latents})], "
                             f"got {num_latents}")  # fmt: skip
        if length > self.config.max_seq_len:
            raise ValueError(f"the prompt ({length} tokens) exceeds max_seq_len={self.config.max_seq_len}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        was_training = self.training
        self.eval()
        try:
            return self._generate(x, max_new_tokens, length - num_latents, pad_mask, use_cache, (
                do_sample, temperature, top_k, top_p, generator))  # fmt: skip
        finally:
            self.train(was_training)

    def _generate(self, x, max_new_tokens, prefix_len, pad_mask, use_cache, sampling) -> Tensor:
        window, window_pad = x, pad_mask  # the last <= max_seq_len tokens, what the model sees
        generated = [x]
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is None:
                hidden, cache = self.prefill(
                    window, prefix_len, self.config.max_latents, self.config.max_seq_len, window_pad
                )
                hidden = hidden[:, -1:]
            elif use_cache:
                hidden = self.step(window[:, -1:], cache)
            else:
                hidden = PerceiverAR.forward(self, window, prefix_len, pad_mask=window_pad)[:, -1:]
            token = self._next_token(self.logits(hidden)[:, -1], *sampling)
            generated.append(token)
            window = torch.cat([window, token], dim=1)
            if window_pad is not None:
                window_pad = torch.cat([window_pad, window_pad.new_zeros(token.shape)], dim=1)
            if window.shape[1] - prefix_len > self.config.max_latents:
                prefix_len += 1
            if window.shape[1] > self.config.max_seq_len:  # drop the oldest token; positions move: rebuild
                window, prefix_len, cache = window[:, 1:], prefix_len - 1, None
                window_pad = None if window_pad is None else window_pad[:, 1:]
        return torch.cat(generated, dim=1)

    @staticmethod
    def _next_token(logits: Tensor, do_sample, temperature, top_k, top_p, generator) -> Tensor:
        """``logits (B, V) -> (B, 1)`` token ids."""
        if not do_sample:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
