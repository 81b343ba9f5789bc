"""Adapters between task data and the generic Perceiver modules (perceiver-io's names and roles)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..rotary import inverse_frequencies

ROTARY_BASE = 10000.0  # perceiver-io's, fixed


class InputAdapter(nn.Module):
    """Turns task input into the encoder's ``(B, M, num_input_channels)`` key/value input."""

    def __init__(self, num_input_channels: int):
        super().__init__()
        if not isinstance(num_input_channels, int) or num_input_channels <= 0:
            raise ValueError(f"num_input_channels must be a positive int, got {num_input_channels!r}")
        self._num_input_channels = num_input_channels

    @property
    def num_input_channels(self) -> int:
        return self._num_input_channels

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


class FrequencyPositionEncoding(nn.Module):
    """perceiver-io's ``inv_freq`` buffer (``(dim / 2,)`` float32, ``1 / 10000 ** (2i / dim)``), kept so that
    perceiver-io checkpoints load strictly and ours load into perceiver-io. The kernels compute the same
    frequencies themselves (``rotary.inverse_frequencies``), so a loaded buffer must hold exactly these
    values: anything else is refused rather than silently ignored."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(dim, ROTARY_BASE, None))  # the default device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        loaded = state_dict.get(prefix + "inv_freq")
        if isinstance(loaded, Tensor) and loaded.shape == self.inv_freq.shape:
            if not loaded.is_floating_point():
                raise ValueError(f"{prefix}inv_freq must be a floating-point tensor, got {loaded.dtype}")
            expected = inverse_frequencies(2 * loaded.numel(), ROTARY_BASE, "cpu")
            # A checkpoint saved in half precision holds rounded values; compare at its precision.
            if not torch.allclose(loaded.float().cpu(), expected, rtol=2 * torch.finfo(loaded.dtype).eps, atol=0):
                raise ValueError(
                    f"{prefix}inv_freq holds other rotary frequencies than 1 / {ROTARY_BASE:g} ** (2i / dim), the only "
                    "ones the kernels compute"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RotarySupport(InputAdapter):
    """An input adapter for Perceiver AR: it also tells how many channels of every head rotate.

    perceiver-io's mixin returns a frequency encoding alongside the input; here the model passes integer
    positions to the kernels, which build the angles themselves, so only the channel count is needed.
    ``frq_pos_encoding`` holds perceiver-io's buffer of the same frequencies (for checkpoints).
    """

    def __init__(self, rotated_channels_per_head: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if rotated_channels_per_head < 0 or rotated_channels_per_head % 2:
            raise ValueError(f"rotated_channels_per_head must be even and >= 0, got {rotated_channels_per_head}")
        self.rotated_channels_per_head = rotated_channels_per_head
        self.frq_pos_encoding = FrequencyPositionEncoding(rotated_channels_per_head)


class TokenInputAdapter(RotarySupport):
    """Token embedding, plus a learned absolute position embedding when ``abs_pos_emb``.

    ``forward(x (B, n) int, abs_pos (B|1, n) int | None) -> (B, n, num_input_channels)``; ``abs_pos``
    defaults to ``0..n-1`` (left-padded batches pass per-sample positions)."""

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        num_input_channels: int,
        abs_pos_emb: bool = True,
        rotated_channels_per_head: int = 0,
    ):
        super().__init__(rotated_channels_per_head, num_input_channels)
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.txt_embedding = nn.Embedding(vocab_size, num_input_channels)
        self.pos_embedding = nn.Embedding(max_seq_len, num_input_channels) if abs_pos_emb else None

    def forward(self, x: Tensor, abs_pos: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"x must be an int (B, n) tensor of token ids, got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_seq_len={self.max_seq_len}")
        emb = self.txt_embedding(x)
        if self.pos_embedding is not None:
            if abs_pos is None:
                abs_pos = torch.arange(x.shape[1], device=x.device)[None]
            emb = emb + self.pos_embedding(abs_pos)
        return emb


class QueryProvider(nn.Module):
    """Provides the decoder's output query ``(1 or B, O, num_query_channels)``."""

    @property
    def num_query_channels(self) -> int:
        raise NotImplementedError


class TrainableQueryProvider(QueryProvider):
    """A learned ``(1, num_queries, num_query_channels)`` array (latents or output queries), ~ N(0, init_scale).

    It is returned with batch 1: the kernels broadcast a batch-1 query over the batch without a copy."""

    def __init__(self, num_queries: int, num_query_channels: int, init_scale: float = 0.02):
        super().__init__()
        self._query = nn.Parameter(torch.empty(num_queries, num_query_channels))
        with torch.no_grad():
            self._query.normal_(0.0, init_scale)

    @property
    def num_query_channels(self) -> int:
        return self._query.shape[-1]

    def forward(self, x: Tensor | None = None) -> Tensor:
        return self._query[None]


class OutputAdapter(nn.Module):
    """Turns the decoder's cross-attention output ``(B, O, F)`` into task output."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


class ClassificationOutputAdapter(OutputAdapter):
    """``Linear(num_output_query_channels, num_classes)``; one output query gives ``(B, num_classes)``."""

    def __init__(self, num_classes: int, num_output_query_channels: int):
        super().__init__()
        self.linear = nn.Linear(num_output_query_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(dim=1)


class TiedTokenOutputAdapter(OutputAdapter):
    """Logits from the token embedding's transpose (weight tying), plus an optional bias:
    ``forward(x (B, N, C), txt_embedding) -> (B, N, vocab_size)``."""

    def __init__(self, vocab_size: int, emb_bias: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if emb_bias else None

    def forward(self, x: Tensor, txt_embedding: nn.Embedding) -> Tensor:
        return nn.functional.linear(x, txt_embedding.weight, self.bias)
