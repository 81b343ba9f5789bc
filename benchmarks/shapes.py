"""Benchmark shapes: the one place they are defined, with the FLOP and byte models.

The ``perceiver`` suite comes from real Perceiver configurations (../shared/PERCEIVER.md, section 5);
the ``quick`` suite is tiny and covers the same features, to prove the pipeline on a CPU (Triton
interpreter) in seconds.

Masks are deterministic functions of the shape (fixed seed), so the FLOP count, which counts only the
(query, key) pairs that take part, is exact for the very inputs that are timed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

MODES = ("fwd", "fwd+bwd")
BACKWARD_FLOP_FACTOR = 2.5  # the backward does 5 matmuls to the forward's 2
MASK_SEED = 1234


@dataclass(frozen=True)
class Shape:
    """One attention problem: q ``(B, Nq, H, Dqk)``, k ``(B, Nk, H, Dqk)``, v ``(B, Nk, H, Dv)``."""

    name: str
    batch: int
    heads: int
    nq: int
    nk: int
    dqk: int
    dv: int
    causal: bool = False  # bottom-right aligned
    pad_fraction: float = 0.0  # this fraction of each sample's keys is padded, at random positions
    per_sample_lengths: bool = False  # a KV cache filled to a different length per sample
    forward_only: bool = False
    note: str = ""

    def __post_init__(self):
        if not 0.0 <= self.pad_fraction < 1.0:
            raise ValueError(f"{self.name}: pad_fraction must be in [0, 1), got {self.pad_fraction}")

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES[:1] if self.forward_only else MODES

    def describe(self) -> str:
        dims = f"D{self.dqk}" if self.dqk == self.dv else f"Dqk{self.dqk}/Dv{self.dv}"
        parts = [f"B{self.batch} H{self.heads} {self.nq}x{self.nk} {dims}"]
        if self.causal:
            parts.append("causal")
        if self.pad_fraction:
            parts.append(f"{self.pad_fraction:.0%} keys padded")
        if self.per_sample_lengths:
            parts.append("per-sample kv_lengths")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)

    # -- inputs that define the FLOP count ---------------------------------------------------------

    def kv_lengths(self) -> torch.Tensor | None:
        """int64 ``(B,)``: spread evenly from ``Nk / 2`` (last sample) to ``Nk`` (first), or None."""
        if not self.per_sample_lengths:
            return None
        step = (self.nk // 2) // max(self.batch - 1, 1)
        return torch.tensor([self.nk - b * step for b in range(self.batch)], dtype=torch.int64)

    def key_padding_mask(self) -> torch.Tensor | None:
        """bool ``(B, Nk)``, True = padded: exactly ``round(pad_fraction * Nk)`` random keys per sample."""
        if not self.pad_fraction:
            return None
        g = torch.Generator().manual_seed(MASK_SEED)
        num_padded = round(self.pad_fraction * self.nk)
        ranks = torch.rand(self.batch, self.nk, generator=g).argsort(dim=1).argsort(dim=1)
        return ranks < num_padded

    def kept_keys(self) -> torch.Tensor:
        """bool ``(B, Nk)``: keys inside ``kv_lengths`` and not padded."""
        kept = torch.ones(self.batch, self.nk, dtype=torch.bool)
        lengths = self.kv_lengths()
        if lengths is not None:
            kept &= torch.arange(self.nk)[None, :] < lengths[:, None]
        pad = self.key_padding_mask()
        if pad is not None:
            kept &= ~pad
        return kept

    # -- FLOP and byte models ----------------------------------------------------------------------

    def visible_pairs(self) -> int:
        """(query, key) pairs that take part, summed over the batch (one head).

        Counted per key: with the bottom-right causal mask, key ``j`` of a sample of length ``L`` is
        seen by the queries ``i >= j - (L - Nq)``, i.e. by ``clamp(Nq - max(0, j - (L - Nq)), 0, Nq)``.
        """
        kept = self.kept_keys()
        if not self.causal:
            return int(kept.sum()) * self.nq
        lengths = self.kv_lengths()
        if lengths is None:
            lengths = torch.full((self.batch,), self.nk, dtype=torch.int64)
        j = torch.arange(self.nk)[None, :]
        offset = (lengths - self.nq)[:, None]
        seen_by = (self.nq - (j - offset).clamp(min=0)).clamp(0, self.nq)
        return int((seen_by * kept).sum())

    def flops(self, mode: str) -> float:
        """Forward ``2 * H * visible_pairs * (Dqk + Dv)`` (two matmuls); fwd+bwd 3.5x that."""
        _check_mode(mode)
        forward = 2.0 * self.heads * self.visible_pairs() * (self.dqk + self.dv)
        return forward if mode == "fwd" else forward * (1.0 + BACKWARD_FLOP_FACTOR)

    def bytes(self, mode: str, itemsize: int) -> float:
        """Compulsory memory traffic: every tensor the pass must touch, read or written once.

        Forward reads q and the kept k/v rows, writes out and the float32 lse. The backward reads q,
        the kept k/v rows, out, dout and lse, and writes dq, dk and dv (all rows). Masks and lengths
        are read once. Nothing a kernel chooses to re-read (K/V per query block) is counted.
        """
        _check_mode(mode)
        bh = self.batch * self.heads
        kept_rows = int(self.kept_keys().sum()) * self.heads
        q, out = bh * self.nq * self.dqk, bh * self.nq * self.dv
        kv_read = kept_rows * (self.dqk + self.dv)
        lse = 4 * bh * self.nq
        masks = (self.batch * self.nk if self.pad_fraction else 0) + (8 * self.batch if self.per_sample_lengths else 0)
        forward = itemsize * (q + kv_read + out) + lse + masks
        if mode == "fwd":
            return float(forward)
        kv_all = bh * self.nk * (self.dqk + self.dv)
        backward = itemsize * (q + kv_read + 2 * out + q + kv_all) + lse + masks
        return float(forward + backward)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


PERCEIVER_SUITE = (
    Shape("io-encoder", 4, 8, 512, 8192, 64, 64, note="Perceiver IO encoder cross-attention"),
    Shape("io-large-input", 1, 8, 256, 131072, 64, 64, note="few queries, huge input: needs split-KV"),
    Shape("io-batch", 16, 8, 512, 16384, 64, 64),
    Shape("io-padded", 4, 8, 512, 8192, 64, 64, pad_fraction=0.3),
    Shape("mlm-qk-v", 32, 8, 256, 2048, 32, 160, note="language MLM: qk 32, v 160 per head"),
    Shape("io-imagenet", 4, 1, 512, 50176, 261, 261, note="ImageNet encoder cross-attention"),
    Shape("flow-decoder", 1, 1, 182528, 2048, 512, 512, note="optical-flow decoder: many queries over the latents"),
    Shape("ar-cross", 4, 16, 1024, 8192, 64, 64, causal=True, note="Perceiver AR latents over the sequence"),
    Shape("ar-self", 4, 16, 1024, 1024, 64, 64, causal=True, note="Perceiver AR latent self-attention"),
    Shape("ar-d128", 4, 8, 2048, 16384, 128, 128, causal=True),
    Shape("decode", 8, 8, 1, 32768, 64, 64, causal=True, per_sample_lengths=True, forward_only=True),
)

QUICK_SUITE = (
    Shape("quick-cross", 2, 2, 32, 256, 32, 48, note="cross-attention, Dqk != Dv"),
    Shape("quick-causal-padded", 2, 2, 64, 256, 32, 32, causal=True, pad_fraction=0.25),
    Shape("quick-decode", 4, 2, 1, 512, 32, 32, causal=True, per_sample_lengths=True, forward_only=True),
)

SUITES = {"perceiver": PERCEIVER_SUITE, "quick": QUICK_SUITE}
SHAPES = {s.name: s for suite in SUITES.values() for s in suite}
