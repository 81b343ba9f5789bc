"""Model-level benchmark entries: a whole model's training step, next to the attention shapes.

An entry is selected like a shape (``--shapes shared-blocks,model-ar-train``), belongs to a suite
(``MODEL_SUITES``: the real configurations in ``perceiver``, tiny ones in ``quick`` that only prove the
pipeline on CPU) and measures several *variants* of one model with the same weights and inputs, at
one or more batch sizes. Every variant's first step is checked against the entry's ``anchor``
variant (its output and every parameter's gradient) before it is timed, as the attention suite checks
every forward output against the reference.

* ``shared-blocks``: the Perceiver IO ImageNet encoder, forward + backward, at several chain lengths L
  (self-attention blocks) and batches, in its three ways of running the shared blocks: plain module
  reuse (``shared_block_execution="reuse"``, the default; the anchor), ``activation_checkpointing=True``,
  and the memory mode (``shared_block_execution="recompute"``: ``run_shared_chain``; ours, compared with
  activation checkpointing, its rival). ``medium-shared-blocks`` is a CPU-sized encoder.
* ``model-ar-train``: forward + backward of the cross-entropy loss of the 30M Perceiver AR language
  model (``CausalSequenceModel``), its attention computed by our Triton kernels, by our ``reference``
  backend (the anchor) and by PyTorch SDPA (rotary and masks as separate PyTorch ops). No optimizer
  step: it is the same for every variant.

Both run with the model in the suite's dtype (``model.to(dtype)``: bfloat16 weights, activations and
gradients on a GPU, not autocast: under autocast the reference backend's float32 score matmuls would
themselves run in bfloat16). Timing and memory are ``timing.py``'s: ``do_bench`` on a GPU (gradients
set to None between repetitions); memory beyond what was allocated before the step (weights and inputs):
what the forward keeps for backward, and the peak over the step (activations, gradients and workspace),
from the allocator on a GPU and from ``timing.LiveBytes`` on CPU.

Each row is one (size, variant): ``size`` is a dict of row fields (``batch``; ``blocks`` for
``shared-blocks``).
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import perceiver_kernels as pk
from perceiver_kernels.models import (
    CausalSequenceModel,
    CausalSequenceModelConfig,
    InputAdapter,
    MultiHeadAttention,
    PerceiverEncoder,
)
from perceiver_kernels.reference import visible_keys

from .timing import CPU_BUDGET_S, CPU_MAX_REPS, Timing, quantiles, sample_quantiles, step_memory, synchronize

MODE = "fwd+bwd"  # the only pass a model entry has
CPU_MIN_REPS = 5  # interleaved CPU timing: variants that differ by a few percent need more than 3 calls
WEIGHT_SEED, INPUT_SEED, CHECK_SEED = 0, 1, 2


@dataclass(frozen=True)
class Variant:
    name: str
    ours: bool
    description: str
    rival: str | None = None  # the variant its speedup and memory ratio are taken against (default: the fastest other)


@dataclass
class Step:
    """One timing repetition of a variant, and what it processes."""

    # forward + backward, calling ``after_forward()`` (if given) between them; returns (output, loss), detached
    run: Callable[..., tuple[Tensor, Tensor | None]]
    params: list[Tensor]  # whose ``.grad`` ``run`` fills; set to None between repetitions
    units: int  # throughput units per step (samples, latent tokens)


@dataclass
class Check:
    """A variant's first step: what is compared with the anchor's."""

    output: Tensor
    grads: list[Tensor | None]
    loss: float | None


def first_step(step: Step, device: torch.device) -> tuple[Check, float]:
    """The step's first call, seeded so that dropout draws the same rows in every variant: what is
    compared with the anchor, and its duration in seconds (compilation included)."""
    for p in step.params:
        p.grad = None
    torch.manual_seed(CHECK_SEED)
    start = time.perf_counter()
    output, loss = step.run()
    synchronize(device)
    seconds = time.perf_counter() - start
    return Check(output, [p.grad for p in step.params], None if loss is None else float(loss)), seconds


def measure_step(step: Step, device: torch.device, timed: bool = True) -> tuple[Timing, Check]:
    """``timing.measure`` for a model step: the first call (``first_step``), then memory (what the forward
    keeps for backward, the step's peak: ``timing.step_memory``, on CPU too) and, when ``timed``, the
    quantiles, with the gradients set to None before every repetition (not timed: the Timing's quantiles
    are None, for :func:`interleaved_quantiles`)."""
    check, first_call_s = first_step(step, device)
    for p in step.params:
        p.grad = None
    try:
        kept, peak = step_memory(step.run, device)
    except RuntimeError:
        if device.type == "cuda":
            raise
        # The CPU tracker is a dispatch mode, under which PyTorch cannot create some tensor subclasses
        # (SDPA's CausalBias): the step ran above; its memory is not measured.
        kept = peak = None
    median = p20 = p80 = None
    if timed:
        median, p20, p80 = quantiles(step.run, step.params, device)
    return Timing(median, p20, p80, first_call_s, peak, kept), check


def interleaved_quantiles(steps: list[Step], min_reps: int = CPU_MIN_REPS) -> list[tuple[float, float, float]]:
    """CPU: median, p20 and p80 milliseconds of each step, timed in turns (one call of each, then again),
    so that a slow spell of a shared machine falls on every variant alike rather than on whichever ran
    then; at least ``min_reps`` calls each, more while ``CPU_BUDGET_S`` per step lasts (at most
    ``CPU_MAX_REPS``)."""
    samples: list[list[float]] = [[] for _ in steps]
    deadline = time.perf_counter() + CPU_BUDGET_S * len(steps)
    while len(samples[0]) < min_reps or (len(samples[0]) < CPU_MAX_REPS and time.perf_counter() < deadline):
        for step, times in zip(steps, samples, strict=True):
            for p in step.params:
                p.grad = None
            start = time.perf_counter()
            step.run()
            times.append((time.perf_counter() - start) * 1e3)
    return [sample_quantiles(times) for times in samples]


def relative_l2(grads: list[Tensor | None], anchor: list[Tensor | None]) -> float:
    """``||g - g_anchor|| / ||g_anchor||`` over every parameter's gradient together (a missing gradient
    counts as zeros); inf on NaN/inf. One number for the whole model: bfloat16 rounding of a single tiny
    gradient (a LayerNorm bias) must not hide behind, nor masquerade as, a real difference."""
    diff2 = ref2 = 0.0
    for g, a in zip(grads, anchor, strict=True):
        if g is None and a is None:
            continue
        g = torch.zeros_like(a) if g is None else g
        a = torch.zeros_like(g) if a is None else a
        diff2 += (g.float() - a.float()).square().sum().item()
        ref2 += a.float().square().sum().item()
    value = (diff2 / max(ref2, 1e-30)) ** 0.5
    return value if value == value else float("inf")


class ModelEntry:
    """What the suite needs of a model entry (``SharedBlocks``, ``ARTrain``)."""

    kind: ClassVar[str]
    variants: ClassVar[tuple[Variant, ...]]
    anchor: ClassVar[str]
    throughput_unit: ClassVar[str]
    modes: ClassVar[tuple[str, ...]] = (MODE,)
    cpu_min_reps: int = CPU_MIN_REPS  # timed calls per variant on CPU, at least
    name: str
    batches: tuple[int, ...]
    note: str

    def describe(self) -> str:
        raise NotImplementedError

    def sizes(self) -> list[dict]:
        """One dict of row fields per measured size, in order."""
        return [{"batch": b} for b in self.batches]

    def model_key(self, size: dict) -> object:
        """Sizes with the same key run on the same built model."""
        return None

    def build(self, device: torch.device, dtype: torch.dtype, size: dict) -> nn.Module:
        """The model for ``size``, with the same weights on every device (initialised on CPU from a fixed seed)."""
        raise NotImplementedError

    def step(self, model: nn.Module, variant: Variant, size: dict, device: torch.device) -> Step:
        raise NotImplementedError

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def ordered_variants(self) -> list[Variant]:
        """The anchor first: every other variant is checked against it."""
        return [self.variant(self.anchor)] + [v for v in self.variants if v.name != self.anchor]

    def backend_of(self, variant: Variant) -> str | None:
        """The ``pk.attention`` backend a variant runs on (None: none of ours)."""
        raise NotImplementedError

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "kind": "model",
            "model": self.kind,
            "description": self.describe(),
            "modes": list(self.modes),
            "variants": {v.name: v.description for v in self.variants},
            "rivals": {v.name: v.rival for v in self.variants if v.rival},
            "ours": [v.name for v in self.variants if v.ours],
            "anchor": self.anchor,
            "throughput_unit": self.throughput_unit,
        }


# -- shared-blocks: the Perceiver IO ImageNet encoder -------------------------------------------------


class PrecomputedInput(InputAdapter):
    """The identity: the benchmark feeds the encoder an already adapted ``(B, M, C)`` input."""

    def forward(self, x: Tensor) -> Tensor:
        return x


@dataclass(frozen=True)
class SharedBlocks(ModelEntry):
    """``PerceiverEncoder`` forward + backward (gradient of the latents: a fixed random tensor) with one
    self-attention block module applied ``L`` times, run by plain module reuse (the anchor, the default),
    activation checkpointing, or the memory mode (``run_shared_chain``; ours). ``L`` in ``blocks``."""

    kind: ClassVar[str] = "shared-blocks"
    variants: ClassVar[tuple[Variant, ...]] = (
        Variant("reuse", False, 'shared_block_execution="reuse" (the default): the block module applied again'),
        Variant("checkpointing", False, "activation_checkpointing=True: torch.utils.checkpoint around each layer"),
        Variant(
            "recompute",
            True,
            'shared_block_execution="recompute": run_shared_chain, layers recomputed in backward',
            rival="checkpointing",
        ),
    )
    anchor: ClassVar[str] = "reuse"
    throughput_unit: ClassVar[str] = "samples/s"

    name: str
    batches: tuple[int, ...]
    blocks: tuple[int, ...]
    num_latents: int
    num_latent_channels: int
    num_heads: int
    layers_per_block: int
    input_len: int
    input_channels: int
    cross_heads: int = 1
    widening_factor: int = 1
    real_input_len: int | None = None  # the real model's input length, when input_len is shorter
    backend: str = "triton"
    note: str = ""
    cpu_min_reps: int = CPU_MIN_REPS

    def describe(self) -> str:
        real = f" (real model: {self.real_input_len})" if self.real_input_len else ""
        return (
            f"PerceiverEncoder {self.num_latents} latents x {self.num_latent_channels} ch, L = "
            f"{', '.join(map(str, self.blocks))} blocks of {self.layers_per_block} self-attention layers "
            f"({self.num_heads} heads, MLP widening {self.widening_factor}), one block module applied L times; "
            f"1 cross-attention ({self.cross_heads} head(s), qk/v {self.input_channels}) over a {self.input_len} x "
            f"{self.input_channels} input{real}; fwd+bwd; batch {', '.join(map(str, self.batches))}; "
            f"{self.backend} attention"
        )

    def sizes(self) -> list[dict]:
        return [{"blocks": blocks, "batch": batch} for blocks in self.blocks for batch in self.batches]

    def model_key(self, size: dict) -> object:
        return size["blocks"]

    def build(self, device: torch.device, dtype: torch.dtype, size: dict) -> nn.Module:
        torch.manual_seed(WEIGHT_SEED)  # the same weights at every L: one block module, whatever L is
        model = PerceiverEncoder(
            PrecomputedInput(self.input_channels), self.num_latents, self.num_latent_channels,
            num_cross_attention_heads=self.cross_heads, num_cross_attention_qk_channels=self.input_channels,
            num_cross_attention_v_channels=self.input_channels, num_self_attention_heads=self.num_heads,
            num_self_attention_layers_per_block=self.layers_per_block, num_self_attention_blocks=size["blocks"],
            self_attention_widening_factor=self.widening_factor, cross_attention_widening_factor=self.widening_factor,
            backend=self.backend,
        )  # fmt: skip
        return model.to(device=device, dtype=dtype).train()

    def step(self, model: nn.Module, variant: Variant, size: dict, device: torch.device) -> Step:
        dtype, batch = next(model.parameters()).dtype, size["batch"]
        g = torch.Generator(device=device).manual_seed(INPUT_SEED + batch)
        x = torch.randn(batch, self.input_len, self.input_channels, device=device, dtype=dtype, generator=g)
        grad = torch.randn(batch, self.num_latents, self.num_latent_channels, device=device, dtype=dtype, generator=g)
        params = [p for p in model.parameters() if p.requires_grad]

        def run(after_forward: Callable[[], None] | None = None) -> tuple[Tensor, None]:
            model.shared_block_execution = "recompute" if variant.name == "recompute" else "reuse"
            model.activation_checkpointing = variant.name == "checkpointing"
            latents = model(x)
            if after_forward is not None:
                after_forward()
            latents.backward(grad)
            return latents.detach(), None

        return Step(run, params, units=batch)

    def backend_of(self, variant: Variant) -> str | None:
        return self.backend


# -- model-ar-train: the 30M Perceiver AR language model ----------------------------------------------


def sdpa_attend(
    self: MultiHeadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pad_mask: Tensor | None = None,
    rotary=None,
    shards=None,
) -> Tensor:
    """``MultiHeadAttention.attend`` as an SDPA user writes it: rotary as a separate op
    (``pk.apply_rotary``, plain PyTorch), then ``scaled_dot_product_attention`` with the bottom-right
    causal mask (``causal_lower_right``, which reaches FlashAttention) or, with padding, the boolean mask
    of ``reference.visible_keys``. ``q (B|1, N, H, Dqk)``, ``k, v (B, L, H, D)`` -> ``(B, N, C_out)``.

    A query row that sees no key at all (a latent that is itself left padding) gets NaN from SDPA where
    our backends give zeros; the benchmark's inputs have no padding. ``shards`` (keys split across ranks) is
    not an SDPA user's path: it raises."""
    if shards is not None:
        raise ValueError("the sdpa variant of the model benchmark runs one process (no context_group)")
    if rotary is not None and rotary.dim:
        q = pk.apply_rotary(q, rotary.q, rotary.dim, backend="reference")
        k = pk.apply_rotary(k, rotary.k, rotary.dim, backend="reference")
    batch, num_queries, num_keys = k.shape[0], q.shape[1], k.shape[1]
    if pad_mask is not None:
        mask = visible_keys(
            batch, num_queries, num_keys, causal=self.causal_attention, key_padding_mask=pad_mask, kv_lengths=None,
            device=q.device,
        )  # fmt: skip
    elif self.causal_attention:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(num_queries, num_keys)
    else:
        mask = None
    q, k, v = (t.transpose(1, 2) for t in (q.expand(batch, -1, -1, -1), k, v))
    dropout_p = self.dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.dp_scale)
    return self.o_proj(out.transpose(1, 2).flatten(-2))


@contextlib.contextmanager
def attention_variant(model: nn.Module, name: str) -> Iterator[None]:
    """Run every ``MultiHeadAttention`` of ``model`` with ``name``: a ``pk.attention`` backend
    (``"triton"``, ``"reference"``, ...) or ``"sdpa"`` (:func:`sdpa_attend`); restored afterwards."""
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    saved = [(m.backend, m.__dict__.get("attend")) for m in modules]
    try:
        for m in modules:
            if name == "sdpa":
                m.attend = types.MethodType(sdpa_attend, m)
            else:
                m.backend = name
        yield
    finally:
        for m, (backend, attend) in zip(modules, saved, strict=True):
            m.backend = backend
            if attend is None:
                m.__dict__.pop("attend", None)
            else:
                m.attend = attend


def ar_loss(model: CausalSequenceModel, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``tokens (B, n + 1)``: the logits of ``tokens[:, :-1]`` (its latents, the last ``N``) and the
    cross-entropy of each latent's next token, computed in float32."""
    logits = model(tokens[:, :-1])
    labels = tokens[:, -logits.shape[1] :]
    return logits, F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


@dataclass(frozen=True)
class ARTrain(ModelEntry):
    """``CausalSequenceModel`` training-mode forward + backward of the cross-entropy of its latents'
    next tokens (random tokens, prefix dropout on), its attention by our Triton kernels, our reference
    backend (the anchor) or PyTorch SDPA. No optimizer step."""

    kind: ClassVar[str] = "ar-train"
    variants: ClassVar[tuple[Variant, ...]] = (
        Variant("triton", True, "CausalSequenceModel(backend='triton'): fused rotary, masks"),
        Variant("reference", False, "backend='reference': plain PyTorch, float32 scores materialised"),
        Variant("sdpa", False, "torch SDPA (default dispatch), rotary by pk.apply_rotary(backend='reference')"),
    )
    anchor: ClassVar[str] = "reference"
    throughput_unit: ClassVar[str] = "latent tok/s"

    name: str
    batches: tuple[int, ...]
    config: CausalSequenceModelConfig = field(default_factory=CausalSequenceModelConfig)
    note: str = ""

    @property
    def seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def num_latents(self) -> int:
        return min(self.config.max_latents, self.seq_len)

    def describe(self) -> str:
        c = self.config
        return (
            f"CausalSequenceModel vocab {c.vocab_size}, {self.seq_len} tokens = {self.seq_len - self.num_latents} "
            f"prefix + {self.num_latents} latents, {c.num_channels} ch, {c.num_heads} heads, "
            f"{c.num_self_attention_layers} self-attention layers, prefix dropout {c.cross_attention_dropout:g}; "
            f"train-mode fwd+bwd of the loss, no optimizer step; batch {', '.join(map(str, self.batches))}; "
            f"throughput = latent (predicted) tokens/s"
        )

    def backend_of(self, variant: Variant) -> str | None:
        return None if variant.name == "sdpa" else variant.name

    def build(self, device: torch.device, dtype: torch.dtype, size: dict) -> nn.Module:
        torch.manual_seed(WEIGHT_SEED)
        model = CausalSequenceModel(self.config, backend="reference")
        return model.to(device=device, dtype=dtype).train()

    def step(self, model: nn.Module, variant: Variant, size: dict, device: torch.device) -> Step:
        batch = size["batch"]
        g = torch.Generator(device=device).manual_seed(INPUT_SEED + batch)
        tokens = torch.randint(0, self.config.vocab_size, (batch, self.seq_len + 1), device=device, generator=g)
        params = [p for p in model.parameters() if p.requires_grad]

        def run(after_forward: Callable[[], None] | None = None) -> tuple[Tensor, Tensor]:
            with attention_variant(model, variant.name):
                logits, loss = ar_loss(model, tokens)
                if after_forward is not None:
                    after_forward()
                loss.backward()
            return logits.detach(), loss.detach()

        return Step(run, params, units=batch * self.num_latents)


# -- the suites -----------------------------------------------------------------------------------------

AR_30M = CausalSequenceModelConfig(
    vocab_size=262, max_seq_len=4096, max_latents=512, num_channels=512, num_heads=8, num_self_attention_layers=8,
    cross_attention_dropout=0.5,
)  # fmt: skip

PERCEIVER_MODELS = (
    SharedBlocks(
        "shared-blocks",
        batches=(1, 4, 16),
        num_latents=512,
        num_latent_channels=1024,
        num_heads=8,
        blocks=(2, 4, 8),
        layers_per_block=6,
        input_len=4096,
        input_channels=261,
        real_input_len=50176,
        note="Perceiver IO ImageNet encoder (L = 8); a shorter input: what differs is how the blocks run",
    ),
    ARTrain("model-ar-train", batches=(24,), config=AR_30M, note="perceiver-io's 30M Perceiver AR text model"),
)

QUICK_MODELS = (
    SharedBlocks(
        "quick-shared-blocks",
        batches=(1, 2),
        num_latents=16,
        num_latent_channels=64,
        num_heads=4,
        blocks=(2,),
        layers_per_block=2,
        input_len=64,
        input_channels=29,
        backend="reference",
        note="tiny, reference attention: proves the pipeline",
    ),
    ARTrain(
        "quick-model-ar-train",
        batches=(2,),
        config=CausalSequenceModelConfig(
            vocab_size=64,
            max_seq_len=64,
            max_latents=16,
            num_channels=32,
            num_heads=2,
            num_self_attention_layers=2,
            cross_attention_dropout=0.5,
        ),
        note="tiny: proves the pipeline (Triton in the CPU interpreter)",
    ),
)

# The shared-block modes on an encoder that a CPU runs in minutes (the GPU's is shared-blocks, above).
BLOCKS_MODELS = (
    SharedBlocks(
        "medium-shared-blocks",
        batches=(1, 4, 16),
        blocks=(2, 4, 8),
        num_latents=128,
        num_latent_channels=256,
        num_heads=8,
        layers_per_block=4,
        input_len=512,
        input_channels=64,
        cross_heads=8,
        backend="reference",
        note="CPU-sized: 128 x 256 latents, 4 layers per block, a 512 x 64 input; reference attention",
        cpu_min_reps=11,  # the two recomputing variants are a few percent apart: more calls than the default
    ),
)

MODEL_SUITES: dict[str, tuple[ModelEntry, ...]] = {
    "perceiver": PERCEIVER_MODELS,
    "quick": QUICK_MODELS,
    "blocks": BLOCKS_MODELS,
}
MODELS = {m.name: m for suite in MODEL_SUITES.values() for m in suite}
