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
    rotary_dim: int = 0  # rotary on the first rotary_dim channels of q and k
    left_pad: float = 0.0  # per-sample left padding of up to this fraction of the keys (positions shift too)
    prefix_dropout: float = 0.0  # Perceiver AR: drop this fraction of the Nk - Nq prefix keys (a kv_index gather)
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
        if self.rotary_dim:
            parts.append(f"rotary {self.rotary_dim}")
        if self.left_pad:
            parts.append("left padding")
        if self.prefix_dropout:
            parts.append(f"prefix dropout {self.prefix_dropout:g}")
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

    def left_padding(self) -> torch.Tensor | None:
        """int64 ``(B,)``: left-padded keys per sample, spread evenly from 0 to ``left_pad * Nk``."""
        if not self.left_pad:
            return None
        most = int(self.left_pad * self.nk)
        return torch.tensor([b * most // max(self.batch - 1, 1) for b in range(self.batch)], dtype=torch.int64)

    def key_padding_mask(self) -> torch.Tensor | None:
        """bool ``(B, Nk)``, True = padded: exactly ``round(pad_fraction * Nk)`` random keys per sample,
        and the left padding."""
        if not self.pad_fraction and not self.left_pad:
            return None
        pad = torch.zeros(self.batch, self.nk, dtype=torch.bool)
        if self.pad_fraction:
            g = torch.Generator().manual_seed(MASK_SEED)
            ranks = torch.rand(self.batch, self.nk, generator=g).argsort(dim=1).argsort(dim=1)
            pad |= ranks < round(self.pad_fraction * self.nk)
        if self.left_pad:
            pad |= torch.arange(self.nk)[None, :] < self.left_padding()[:, None]
        return pad

    def positions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary ``(q_positions, k_positions)`` for left padding (``clamp(arange - n_pad, 0)``, the
        queries being the last ``Nq``), or None for the op's defaults."""
        if not (self.rotary_dim and self.left_pad):
            return None
        k_positions = (torch.arange(self.nk)[None, :] - self.left_padding()[:, None]).clamp(min=0)
        return k_positions[:, self.nk - self.nq :], k_positions

    def kv_index(self) -> torch.Tensor | None:
        """int64 ``(B, Nk')``: prefix dropout keeps ``P - int(p * P)`` random prefix rows (``P = Nk - Nq``,
        sorted), then every latent row."""
        if not self.prefix_dropout:
            return None
        g = torch.Generator().manual_seed(MASK_SEED)
        prefix = self.nk - self.nq
        keep = prefix - int(self.prefix_dropout * prefix)
        latents = torch.arange(prefix, self.nk)
        rows = [torch.randperm(prefix, generator=g)[:keep].sort().values for _ in range(self.batch)]
        return torch.stack([torch.cat((r, latents)) for r in rows])

    @property
    def nk_attended(self) -> int:
        """Length of the key axis attention runs over: ``Nk'`` with a gather, else ``Nk``."""
        index = self.kv_index()
        return self.nk if index is None else index.shape[1]

    def kept_keys(self) -> torch.Tensor:
        """bool ``(B, Nk')`` on the attended key axis: inside ``kv_lengths`` and not padded."""
        nk = self.nk_attended
        kept = torch.ones(self.batch, nk, dtype=torch.bool)
        lengths = self.kv_lengths()
        if lengths is not None:
            kept &= torch.arange(nk)[None, :] < lengths[:, None]
        pad = self.key_padding_mask()
        if pad is not None:
            index = self.kv_index()
            kept &= ~(pad if index is None else pad.gather(1, index))
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
        nk = self.nk_attended
        lengths = self.kv_lengths()
        if lengths is None:
            lengths = torch.full((self.batch,), nk, dtype=torch.int64)
        j = torch.arange(nk)[None, :]
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
        masks = (self.batch * self.nk if self.key_padding_mask() is not None else 0) + (
            8 * self.batch if self.per_sample_lengths else 0
        )
        masks += 8 * self.batch * self.nk_attended if self.prefix_dropout else 0
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
    # Perceiver AR features; the other providers rotate and gather with separate PyTorch ops.
    Shape("ar-cross-rotary", 4, 16, 1024, 8192, 64, 64, causal=True, rotary_dim=32, left_pad=0.25),
    Shape(
        "ar-cross-prefix-dropout",
        4,
        16,
        1024,
        8192,
        64,
        64,
        causal=True,
        prefix_dropout=0.5,
        note="half of the 7168 prefix rows gathered: compare with ar-cross",
    ),  # fmt: skip
    Shape(
        "decode-rotary", 8, 8, 1, 32768, 64, 64, causal=True, per_sample_lengths=True, forward_only=True, rotary_dim=32
    ),  # fmt: skip
)

QUICK_SUITE = (
    Shape("quick-cross", 2, 2, 32, 256, 32, 48, note="cross-attention, Dqk != Dv"),
    Shape("quick-causal-padded", 2, 2, 64, 256, 32, 32, causal=True, pad_fraction=0.25),
    Shape("quick-ar", 2, 2, 32, 256, 32, 32, causal=True, rotary_dim=16, left_pad=0.25, prefix_dropout=0.5),
    Shape(
        "quick-decode", 4, 2, 1, 512, 32, 32, causal=True, per_sample_lengths=True, forward_only=True, rotary_dim=16
    ),  # fmt: skip
)

SUITES = {"perceiver": PERCEIVER_SUITE, "quick": QUICK_SUITE}
SHAPES = {s.name: s for suite in SUITES.values() for s in suite}
