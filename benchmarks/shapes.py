"""Benchmark shapes: the one place they are defined. Taken from real Perceiver configurations
(see ../shared/PERCEIVER.md section 5 and the benchmark issue)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    nq: int
    nk: int
    dqk: int
    dv: int
    causal: bool = False
    pad_fraction: float = 0.0  # per-sample random key padding
    per_sample_lengths: bool = False  # kv_lengths drawn per sample (decode)
    forward_only: bool = False

    def visible_pairs(self) -> int:
        """(query, key) pairs that take part, with the bottom-right causal mask."""
        if not self.causal:
            return self.nq * self.nk
        offset = self.nk - self.nq
        return sum(max(0, min(self.nk, i + offset + 1)) for i in range(self.nq))

    def flops(self, mode: str) -> float:
        """FLOPs of the attention: 2 matmuls forward, 2.5x that more for the backward."""
        forward = 2.0 * self.batch * self.heads * self.visible_pairs() * (self.dqk + self.dv)
        return forward if mode == "fwd" else forward * 3.5


PERCEIVER_SUITE = [
    Shape("io-encoder", 4, 8, 512, 8192, 64, 64),
    Shape("io-large-input", 1, 8, 256, 131072, 64, 64),
    Shape("io-batch", 16, 8, 512, 16384, 64, 64),
    Shape("io-padded", 4, 8, 512, 8192, 64, 64, pad_fraction=0.3),
    Shape("mlm-qk-v", 32, 8, 256, 2048, 32, 160),
    Shape("io-imagenet", 4, 1, 512, 50176, 261, 261),
    Shape("flow-decoder", 1, 1, 182528, 2048, 512, 512),
    Shape("ar-cross", 4, 16, 1024, 8192, 64, 64, causal=True),
    Shape("ar-self", 4, 16, 1024, 1024, 64, 64, causal=True),
    Shape("ar-d128", 4, 8, 2048, 16384, 128, 128, causal=True),
    Shape("decode", 8, 8, 1, 32768, 64, 64, causal=True, per_sample_lengths=True, forward_only=True),
]

SHAPES = {s.name: s for s in PERCEIVER_SUITE}
