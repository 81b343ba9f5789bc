"""``patch(model)``: run the attention of existing Perceiver models on ``perceiver_kernels.attention``.

``patch`` walks the module tree and, for every attention module it knows, replaces the attention core
(scores, softmax, weighted sum) with :func:`perceiver_kernels.attention`, in place and per instance: the
patched module gets an instance attribute ``forward`` that shadows its class's ``forward``, so the class,
and every other instance of it in the process, keep running their original code. The projections,
norms and output layers of the module are the module's own parameters, used exactly as before.
``unpatch`` deletes that attribute again (the module is then exactly as it was).

Supported (see docs/INTEGRATIONS.md for what each one falls back on and why):

* Hugging Face ``transformers`` Perceiver: ``PerceiverSelfAttention`` (cross- and self-attention of
  ``PerceiverModel`` and every task head);
* lucidrains' ``perceiver-pytorch``: ``Attention`` of ``Perceiver`` and ``PerceiverIO``;
* lucidrains' ``perceiver-ar-pytorch``: ``CausalPrefixAttention`` and ``CausalAttention`` of
  ``PerceiverAR`` (with its rotary embeddings and prefix dropout), plus a marker on its
  ``RotaryEmbedding`` so the rotation can run inside the kernel;
* ``perceiver_kernels.models.MultiHeadAttention``: its ``backend`` attribute is set.

A patched module calls its original forward, unchanged, whenever a call asks for something the
kernels cannot reproduce exactly (attention probabilities, dropout on the probabilities, a mask that is
not a key-padding mask, ...); every call is counted either way (see :func:`patch_status`).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import SUPPORTED_DTYPES, attention, backend_unavailable_reason, check_backend
from .rotary import inverse_frequencies

__all__ = ["LeftModule", "PatchReport", "PatchedModule", "patch", "patch_status", "unpatch"]


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchedModule:
    """One module whose attention runs (or ran, in an ``unpatch`` report) on perceiver_kernels."""

    name: str  # qualified name in the model ("" is the model itself)
    integration: str  # e.g. "transformers Perceiver"
    kind: str  # e.g. "PerceiverSelfAttention (cross-attention)"
    fallbacks: str = ""  # when the module's original code still runs, in words
    calls: int = 0  # calls served by perceiver_kernels since it was patched
    fallback_calls: Mapping[str, int] = field(default_factory=dict)  # calls handed to the original, per reason


@dataclass(frozen=True)
class LeftModule:
    """One attention-like module left unchanged, and why."""

    name: str
    class_name: str
    reason: str


@dataclass(frozen=True)
class PatchReport:
    """What :func:`patch`, :func:`unpatch` or :func:`patch_status` did or found.

    ``patched``: the modules patched (``"patch"``, ``"status"``) or restored (``"unpatch"``).
    ``left``: modules whose class name contains "Attention" that were not patched, with the reason;
    modules that only wrap a listed module (e.g. transformers' ``PerceiverAttention`` around its
    ``PerceiverSelfAttention``) are not listed again.
    """

    action: str  # "patch", "unpatch" or "status"
    backend: str | None
    patched: tuple[PatchedModule, ...] = ()
    left: tuple[LeftModule, ...] = ()

    def __str__(self) -> str:
        verb = "restored" if self.action == "unpatch" else "patched"
        head = f"perceiver_kernels {self.action}"
        if self.backend is not None:
            head += f" (backend={self.backend!r})"
        head += f": {len(self.patched)} module(s) {verb}, {len(self.left)} left unchanged"
        names = [_display_name(m.name) for m in (*self.patched, *self.left)]
        width = max(map(len, names), default=0)
        lines = [head]
        for m in self.patched:
            line = f"  {verb:<9}{_display_name(m.name):<{width}}  {m.integration}: {m.kind}"
            if m.calls or m.fallback_calls:
                fell_back = sum(m.fallback_calls.values())
                reasons = ", ".join(f"{reason} x{count}" for reason, count in m.fallback_calls.items())
                line += f"  [{m.calls} call(s) on perceiver_kernels, {fell_back} on the original code"
                line += f" ({reasons})]" if reasons else "]"
            lines.append(line)
        for m in self.left:
            lines.append(f"  {'left':<9}{_display_name(m.name):<{width}}  {m.class_name}: {m.reason}")
        # One legend line per integration rather than per module: a deep model repeats the same kinds.
        legend = dict.fromkeys((m.integration, m.fallbacks) for m in self.patched if m.fallbacks)
        if legend:
            lines.append("  the original code still runs for calls with:")
            lines.extend(f"    {integration}: {fallbacks}" for integration, fallbacks in legend)
        return "\n".join(lines)


def _display_name(name: str) -> str:
    return name or "(model)"


# --------------------------------------------------------------------------------------------------
# The per-instance forward
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fallback:
    """Returned by an integration's forward to hand the call to the module's original forward."""

    reason: str


@dataclass(frozen=True)
class _Integration:
    name: str  # report label
    forward: Callable[[_PatchedForward, dict[str, Any]], Any]  # our forward: (patch, bound arguments) -> output
    describe: Callable[[nn.Module], str]  # kind of one instance, for the report
    fallbacks: str  # when the original still runs, for the report
    required: tuple[str, ...]  # attributes our forward reads: a module without them is left alone


class _PatchedForward:
    """The instance attribute ``forward`` of a patched module.

    A callable object rather than a bound method or closure so that a patched model still deep-copies
    (the copy is patched and calls its own parameters) and pickles. It holds the module (a reference
    cycle the garbage collector handles) and only the *name* of its integration.
    """

    def __init__(self, module: nn.Module, integration: str, backend: str):
        self.module = module
        self.integration = integration
        self.backend = backend
        self.calls = 0
        self.fallback_calls: Counter[str] = Counter()
        self.cache: dict[Any, Any] = {}  # per-integration memo (perceiver-ar's table checks)

    def __call__(self, *args, **kwargs):
        module = self.module
        original = type(module).forward  # patch() made sure the class's forward is the one we replace
        try:
            bound = _signature(original).bind(module, *args, **kwargs)
        except TypeError:
            # Arguments the original would reject: let it raise its own error.
            self.fallback_calls["arguments the original forward rejects"] += 1
            return original(module, *args, **kwargs)
        arguments = dict(bound.arguments)  # by parameter name, only those passed
        del arguments[next(iter(bound.signature.parameters))]  # self
        result = _INTEGRATIONS[self.integration].forward(self, arguments)
        if isinstance(result, _Fallback):
            self.fallback_calls[result.reason] += 1
            return original(module, *args, **kwargs)
        self.calls += 1
        return result


@cache
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


def _unexpected_argument(arguments: dict[str, Any], known: set[str]) -> _Fallback | None:
    """A fallback for any argument our forward does not reproduce (e.g. one a newer version added)."""
    for name, value in arguments.items():
        if name in known or value is None or value is False:
            continue
        if isinstance(value, (dict, tuple)) and not value:  # empty **kwargs / *args
            continue
        return _Fallback(f"argument {name!r}")
    return None


def _dtype_problem(*tensors: Tensor) -> _Fallback | None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= set(SUPPORTED_DTYPES):
        return _Fallback(f"q/k/v dtypes {sorted(map(str, dtypes))}")
    return None


def _training_dropout(module: nn.Module) -> _Fallback | None:
    dropout = getattr(module, "dropout", None)
    if module.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        # Our kernels have no dropout on the probabilities; running without it would be silently wrong.
        return _Fallback("attention dropout while training")
    return None


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers: PerceiverSelfAttention
# --------------------------------------------------------------------------------------------------

_HF_ARGUMENTS = {"hidden_states", "attention_mask", "inputs", "inputs_mask", "output_attentions", "head_mask"}


def _hf_forward(patch: _PatchedForward, arguments: dict[str, Any]):
    """transformers' ``PerceiverSelfAttention.forward`` with the attention on perceiver_kernels.

    Layout: hidden states ``(B, Nq, q_dim)``; inputs ``(B, Nk, kv_dim)`` for cross-attention (keys and
    values from the inputs, the mask from ``inputs_mask``), else keys and values from the hidden states
    (the mask from ``attention_mask``). Heads split channels head-major, ``Dqk = qk_channels / H`` and
    ``Dv = v_channels / H`` may differ; scores are divided by ``sqrt(Dqk)``. Returns ``((B, Nq, H*Dv),)``.
    """
    module = patch.module
    if arguments.get("output_attentions"):
        return _Fallback("output_attentions=True")
    if arguments.get("head_mask") is not None:
        return _Fallback("head_mask")
    if problem := _unexpected_argument(arguments, _HF_ARGUMENTS) or _training_dropout(module):
        return problem
    hidden_states, inputs = arguments["hidden_states"], arguments.get("inputs")
    cross = inputs is not None
    source = inputs if cross else hidden_states
    mask = arguments.get("inputs_mask") if cross else arguments.get("attention_mask")
    if hidden_states.dim() != 3 or source.dim() != 3 or source.shape[0] != hidden_states.shape[0]:
        return _Fallback("inputs that are not (batch, seq, channels) with one batch size")
    padding = _hf_key_padding(mask, hidden_states.shape[0], hidden_states.shape[1], source.shape[1])
    if isinstance(padding, _Fallback):
        return padding

    hidden_states = module.layernorm1(hidden_states)
    source = module.layernorm2(inputs) if cross else hidden_states
    heads = module.num_heads
    # (B, N, H * D) -> (B, N, H, D): a view, last dim contiguous, as the kernels want.
    q = module.query(hidden_states).unflatten(-1, (heads, module.qk_channels_per_head))
    k = module.key(source).unflatten(-1, (heads, module.qk_channels_per_head))
    v = module.value(source).unflatten(-1, (heads, module.v_channels_per_head))
    if problem := _dtype_problem(q, k, v):
        return problem
    # transformers divides the scores by sqrt(Dqk); pass that very number rather than Dqk ** -0.5.
    out = attention(q, k, v, key_padding_mask=padding, scale=1.0 / math.sqrt(q.shape[-1]), backend=patch.backend)
    return (out.flatten(2),)


def _hf_key_padding(mask: Tensor | None, batch: int, num_queries: int, num_keys: int) -> Tensor | None | _Fallback:
    """transformers' additive mask -> our bool ``key_padding_mask (B, Nk)`` (True = padding).

    ``PerceiverModel`` hands its cross-attention a float ``(B, 1, Nq, Nk)`` mask from
    ``create_bidirectional_mask``: 0 where a key is visible and ``finfo(dtype).min`` where it is padding,
    added to the scores. That is a key-padding mask when every entry is 0 or "blocked" (``finfo.min`` or
    ``-inf``: either makes the key's weight exactly 0 next to any visible key) and all queries share the
    pattern. Anything else (a bias, per-query masks) falls back. So does a sample with every key blocked:
    transformers then averages all values uniformly (``finfo.min`` cancels in the softmax; ``-inf`` gives
    NaN) where our kernels return zeros. Checking the values costs one device synchronisation per
    masked call (in Perceiver only the encoder's cross-attention gets a mask).
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or not mask.is_floating_point() or mask.dim() != 4:
        return _Fallback("a mask that is not a 4-D additive float mask")
    mask_batch, mask_heads, mask_queries, mask_keys = mask.shape
    if mask_batch not in (1, batch) or mask_heads != 1 or mask_queries not in (1, num_queries) or mask_keys != num_keys:
        return _Fallback(f"a mask of shape {tuple(mask.shape)}, not (B, 1, Nq or 1, Nk)")
    blocked = mask <= torch.finfo(mask.dtype).min
    per_key = blocked[:, 0, 0, :]  # (B or 1, Nk)
    checks = torch.stack(
        (
            ((mask == 0) | blocked).all(),  # only "visible" and "blocked" values
            (blocked == per_key[:, None, None, :]).all(),  # the same keys blocked for every query
            (~per_key).any(dim=-1).all(),  # every sample keeps a visible key
            per_key.any(),  # anything blocked at all
        )
    )
    only_padding, same_for_all_queries, every_sample_sees_a_key, any_blocked = checks.tolist()  # one sync
    if not (only_padding and same_for_all_queries):
        return _Fallback("a mask that is not a pure key-padding mask")
    if not every_sample_sees_a_key:
        return _Fallback("a sample with every key masked")
    return per_key.expand(batch, num_keys).contiguous() if any_blocked else None


def _hf_describe(module: nn.Module) -> str:
    # Cross-attention modules normalise their inputs with a LayerNorm; self-attention ones have Identity.
    role = "self-attention" if isinstance(module.layernorm2, nn.Identity) else "cross-attention"
    heads = module.num_heads
    return (
        f"{type(module).__name__} ({role}, {heads} head(s), "
        f"Dqk={module.qk_channels_per_head}, Dv={module.v_channels_per_head})"
    )


# --------------------------------------------------------------------------------------------------
# lucidrains' perceiver-pytorch: Attention (perceiver_pytorch.py and perceiver_io.py)
# --------------------------------------------------------------------------------------------------


def _perceiver_pytorch_forward(patch: _PatchedForward, arguments: dict[str, Any]):
    """perceiver-pytorch's ``Attention.forward(x, context=None, mask=None, inverted_attention=False)``.

    ``x (B, Nq, query_dim)`` attends to ``context (B, Nk, context_dim)`` (default ``x``); ``mask`` is
    bool with True = *keep*, shaped ``(B, ...)`` over the context's positions (flattened, as they do).
    With ``queries_contribute_kv`` the queries join the keys (and the mask) in front of the context.
    Heads split channels head-major; scores are multiplied by ``module.scale``. Returns ``(B, Nq, query_dim)``.
    """
    module = patch.module
    x, context, mask = arguments["x"], arguments.get("context"), arguments.get("mask")
    if arguments.get("inverted_attention"):
        return _Fallback("inverted_attention=True")
    if dropped := _training_dropout(module):
        return dropped
    has_context = context is not None
    joined = getattr(module, "queries_contribute_kv", False) and has_context
    kv = torch.cat((x, context), dim=1) if joined else (context if has_context else x)
    batch, num_keys = kv.shape[0], kv.shape[1]
    if x.shape[0] != batch:
        return _Fallback("queries and context with different batch sizes")
    keep = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() < 2 or (joined and mask.dim() != 2):
            return _Fallback("a mask that is not a bool (B, ...) tensor")
        keep = mask.flatten(1)
        if joined:
            keep = torch.cat((keep.new_ones(batch, x.shape[1]), keep), dim=1)
        if tuple(keep.shape) != (batch, num_keys):
            return _Fallback(f"a mask of shape {tuple(mask.shape)} for {num_keys} keys")

    heads = module.heads
    q = module.to_q(x).unflatten(-1, (heads, -1))
    k, v = (t.unflatten(-1, (heads, -1)) for t in module.to_kv(kv).chunk(2, dim=-1))
    if problem := _dtype_problem(q, k, v):
        return problem
    padding = None if keep is None else ~keep
    out = attention(q, k, v, key_padding_mask=padding, scale=float(module.scale), backend=patch.backend)
    if keep is not None:
        # perceiver-pytorch fills masked scores with -finfo.max, not -inf: a sample with every key masked
        # gets the plain average of its values (the softmax of equal scores), where our kernels give zeros.
        # Reproduced with a select rather than a data-dependent branch (no device synchronisation).
        nothing_kept = ~keep.any(dim=1)
        out = torch.where(nothing_kept[:, None, None, None], v.mean(dim=1, keepdim=True), out)
    return module.to_out(out.flatten(2))


def _perceiver_pytorch_describe(module: nn.Module) -> str:
    extra = ", queries join the keys" if getattr(module, "queries_contribute_kv", False) else ""
    return f"{type(module).__name__} ({module.heads} head(s){extra})"


# --------------------------------------------------------------------------------------------------
# lucidrains' perceiver-ar-pytorch: CausalPrefixAttention, CausalAttention, RotaryEmbedding
# --------------------------------------------------------------------------------------------------
#
# perceiver-ar passes every attention module the same table ``(T, R)`` of rotary *angles* for the whole
# sequence (prefix + latents): row ``p`` is ``p * inv_freq`` written twice (``cat(freqs, freqs)``), so
# channel pairs are ``(i, i + R/2)`` (NeoX layout) and pair ``i`` turns by ``p * 10000**(-2i/R)``. The
# first ``R = max(32, dim_head // 2)`` channels of each head are rotated. Queries, and keys, take the
# *last* rows of the table (the latents sit at the end). q is scaled before it is rotated.
#
# Our kernels rotate in-register from positions (``rotary_interleaved=False``) and compute the angles
# with the same float32 formula, which gives bitwise the same angles -- for the standard table. Since a
# table is just a tensor, our RotaryEmbedding forward checks the table it returns (once per length) and
# marks it; attention modules rotate in the kernel only for a marked table, and otherwise rotate q and k
# in PyTorch from the table they were given (a half-precision table under ``.half()`` or autocast, or
# any table passed by hand), reproducing perceiver-ar's arithmetic.

_AR_ROTARY_BASE = 10000.0
_AR_STANDARD_TABLE = "_perceiver_kernels_standard_rotary_table"  # attribute set on a verified table


def _ar_rotary_embedding_forward(patch: _PatchedForward, arguments: dict[str, Any]) -> Tensor:
    """perceiver-ar's ``RotaryEmbedding.forward(max_seq_len, *, device)``, unchanged, plus the mark."""
    module = patch.module
    table = type(module).forward(module, **arguments)
    if _is_standard_table(patch, table):
        setattr(table, _AR_STANDARD_TABLE, True)
    return table


def _is_standard_table(patch: _PatchedForward, table: Tensor) -> bool:
    """Whether ``table`` is bitwise the float32 table our kernels would compute for rows ``0..T-1``.

    The table is a deterministic function of its length and the module's ``inv_freq`` buffer, so the
    comparison (one device synchronisation) runs once per length and state of that buffer.
    """
    if not isinstance(table, Tensor) or table.dtype != torch.float32 or table.dim() != 2 or table.shape[-1] % 2:
        return False
    inv_freq = getattr(patch.module, "inv_freq", None)
    if not isinstance(inv_freq, Tensor):
        return False
    key = (tuple(table.shape), table.device, inv_freq.data_ptr(), inv_freq._version, inv_freq.dtype)
    if key not in patch.cache:
        positions = torch.arange(table.shape[0], device=table.device, dtype=torch.float32)
        # The same expression as perceiver_kernels.rotary.rotary_tables, so equal here means equal angles.
        angles = positions[:, None] * inverse_frequencies(table.shape[-1], _AR_ROTARY_BASE, table.device)
        patch.cache[key] = torch.equal(table, torch.cat((angles, angles), dim=-1))
    return patch.cache[key]


def _ar_table_problem(table: Any, head_dim: int, rows_needed: int) -> _Fallback | None:
    """Tables perceiver-ar itself could not use (it would raise) or that we do not model."""
    if table is None:
        return None
    if not isinstance(table, Tensor) or table.dim() != 2:
        return _Fallback("a rotary table that is not a (seq, dim) tensor")
    width = table.shape[-1]
    if width == 0 or width % 2 or width > head_dim:
        return _Fallback(f"a rotary table of width {width} for head dim {head_dim}")
    if table.shape[0] < rows_needed:
        return _Fallback("a rotary table shorter than the sequence")
    return None


def _ar_rotary(
    table: Tensor | None, q: Tensor, k: Tensor, q_rows: Tensor, k_rows: Tensor, scale: float
) -> tuple[Tensor, Tensor, float, dict[str, Any]]:
    """q, k, the score scale and the rotary arguments of ``attention`` for table rows ``q_rows (1, Nq)``
    and ``k_rows (B or 1, Nk)`` (the rows are the positions)."""
    if table is None:
        return q, k, scale, {}
    if getattr(table, _AR_STANDARD_TABLE, False) and q.dtype == table.dtype:
        rotary = dict(
            rotary_dim=table.shape[-1], q_positions=q_rows, k_positions=k_rows,
            rotary_base=_AR_ROTARY_BASE, rotary_interleaved=False,
        )  # fmt: skip
        return q, k, scale, rotary
    # Any other table: rotate as perceiver-ar does (q scaled first), in PyTorch, then no scaling in the kernel.
    q_rotated = _rotate_neox(q * scale, table[q_rows]).to(q.dtype)
    k_rotated = _rotate_neox(k, table[k_rows]).to(k.dtype)
    return q_rotated, k_rotated, 1.0, {}


def _rotate_neox(x: Tensor, angles: Tensor) -> Tensor:
    """``x (B, N, H, D)`` with its first ``R`` channels turned by ``angles (B or 1, N, R)``, half-split pairs:
    ``x * cos + (-x2, x1) * sin`` where ``x1, x2`` are the two halves of those channels."""
    width = angles.shape[-1]
    angles = angles[:, :, None, :]  # the same angles for every head
    rotated, rest = x[..., :width], x[..., width:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()
    return torch.cat((rotated, rest), dim=-1)


def _ar_self_forward(patch: _PatchedForward, arguments: dict[str, Any]):
    """perceiver-ar's ``CausalAttention.forward(x, rotary_pos_emb=None)``: causal self-attention of the
    latents ``x (B, N, dim)`` (pre-norm inside), rotary from the last ``N`` table rows. Returns ``(B, N, dim)``."""
    module = patch.module
    x, table = arguments["x"], arguments.get("rotary_pos_emb")
    heads = module.heads
    head_dim = module.to_qkv.out_features // (3 * heads)
    if problem := _training_dropout(module) or _ar_table_problem(table, head_dim, x.shape[1]):
        return problem

    x = module.norm(x)
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in module.to_qkv(x).chunk(3, dim=-1))
    if problem := _dtype_problem(q, k, v):
        return problem
    rows = None
    if table is not None:
        rows = torch.arange(table.shape[0] - x.shape[1], table.shape[0], device=x.device)[None, :]
    q, k, scale, rotary = _ar_rotary(table, q, k, rows, rows, float(module.scale))
    # Their mask triu(j - i + 1) on a square score matrix is the ordinary causal mask.
    out = attention(q, k, v, causal=True, scale=scale, backend=patch.backend, **rotary)
    return module.to_out(out.flatten(2))


def _ar_prefix_forward(patch: _PatchedForward, arguments: dict[str, Any]):
    """perceiver-ar's ``CausalPrefixAttention.forward(x, context, context_mask=None, rotary_pos_emb=None)``.

    The latents ``x (B, N, dim)`` attend to ``cat(prefix, x)`` (keys ``(B, P + N)``) under a bottom-right
    causal mask; ``context_mask (B, P)`` is bool with True = *keep*. While training with
    ``cross_attn_dropout > 0`` each sample keeps a random ``P - int(P * p)`` prefix positions, drawn with
    the same random calls as perceiver-ar (a seeded run keeps the same positions); kept keys keep their
    rotary rows. Returns ``(B, N, dim)``.
    """
    module = patch.module
    x, context = arguments["x"], arguments["context"]
    context_mask, table = arguments.get("context_mask"), arguments.get("rotary_pos_emb")
    heads = module.heads
    head_dim = module.to_q.out_features // heads
    batch, num_latents, prefix_len = x.shape[0], x.shape[1], context.shape[-2]
    prefix_dropout = module.training and module.cross_attn_dropout > 0
    kept_len = prefix_len - int(prefix_len * module.cross_attn_dropout) if prefix_dropout else prefix_len
    if dropped := _training_dropout(module):
        return dropped
    if prefix_dropout and table is None:
        return _Fallback("prefix dropout without a rotary table")  # perceiver-ar raises here
    if context.dim() != 3 or context.shape[0] != batch:
        return _Fallback("a prefix that is not (B, P, dim)")
    # Every reason to fall back is decided before the prefix-dropout draws: falling back after them would
    # make the original draw again, and a seeded run would keep other prefix positions than unpatched.
    if problem := _dtype_problem(x, context):
        return problem
    if context_mask is not None and (
        not isinstance(context_mask, Tensor)
        or context_mask.dtype != torch.bool
        or tuple(context_mask.shape) != (batch, prefix_len)
    ):
        return _Fallback("a context_mask that is not bool (B, P)")
    # Rows of the table the keys take (see below): the last kept_len + N of the (gathered) table.
    if problem := _ar_table_problem(table, head_dim, num_latents if prefix_dropout else prefix_len + num_latents):
        return problem
    if prefix_dropout and table.shape[0] - prefix_len < num_latents:
        return _Fallback("a rotary table shorter than the sequence")

    kept = None
    if prefix_dropout:
        # The same draws as perceiver-ar: uniform scores over the prefix, the top kept_len survive. Sorted
        # into prefix order like their boolean-mask gather (the result does not depend on the order: every
        # latent sees every kept prefix key, and each key keeps its position; reads stay in order).
        scores = torch.zeros((batch, prefix_len), device=x.device).uniform_()
        kept = scores.topk(kept_len, dim=-1).indices.sort(dim=-1).values  # (B, kept_len)
        context = context.gather(1, kept[:, :, None].expand(-1, -1, context.shape[-1]))
        if context_mask is not None:
            context_mask = context_mask.gather(1, kept)

    x = module.norm(x)
    context = module.context_norm(context)
    q = module.to_q(x).unflatten(-1, (heads, -1))
    k_latents, v_latents = module.to_kv(x).chunk(2, dim=-1)
    k_prefix, v_prefix = module.to_kv(context).chunk(2, dim=-1)
    k = torch.cat((k_prefix, k_latents), dim=1).unflatten(-1, (heads, -1))
    v = torch.cat((v_prefix, v_latents), dim=1).unflatten(-1, (heads, -1))
    if problem := _dtype_problem(q, k, v):
        return problem
    num_keys = k.shape[1]
    padding = None
    if context_mask is not None:
        padding = F.pad(~context_mask, (0, num_latents), value=False)  # the latents' own keys are never padding

    q_rows = k_rows = None
    if table is not None:
        rows = table.shape[0]
        q_rows = torch.arange(rows - num_latents, rows, device=x.device)[None, :]
        if kept is None:
            k_rows = torch.arange(rows - num_keys, rows, device=x.device)[None, :]
        else:
            # Kept prefix keys keep their own rows, the rest of the table follows; keys take the last rows.
            rest = torch.arange(prefix_len, rows, device=x.device).expand(batch, -1)
            k_rows = torch.cat((kept, rest), dim=1)[:, -num_keys:].contiguous()
    q, k, scale, rotary = _ar_rotary(table, q, k, q_rows, k_rows, float(module.scale))
    out = attention(q, k, v, causal=True, key_padding_mask=padding, scale=scale, backend=patch.backend, **rotary)
    return module.to_out(out.flatten(2))


def _ar_describe(module: nn.Module) -> str:
    if hasattr(module, "to_qkv"):
        return f"{type(module).__name__} (causal self-attention, {module.heads} head(s))"
    dropout = f", prefix dropout {module.cross_attn_dropout}" if module.cross_attn_dropout else ""
    return f"{type(module).__name__} (causal prefix cross-attention, {module.heads} head(s){dropout})"


def _ar_rotary_describe(module: nn.Module) -> str:
    return f"{type(module).__name__} (marks its float32 table so attention rotates in the kernel; values unchanged)"


# --------------------------------------------------------------------------------------------------
# The integrations and the classes they handle
# --------------------------------------------------------------------------------------------------

_TRAINING_DROPOUT = "attention dropout while training (p > 0)"
_INTEGRATIONS: dict[str, _Integration] = {
    "transformers": _Integration(
        name="transformers Perceiver",
        forward=_hf_forward,
        describe=_hf_describe,
        fallbacks=(
            f"output_attentions=True; head_mask; {_TRAINING_DROPOUT}; masks that are not pure key padding, "
            "or that leave a sample no key"
        ),
        required=(
            "layernorm1",
            "layernorm2",
            "query",
            "key",
            "value",
            "num_heads",
            "qk_channels_per_head",
            "v_channels_per_head",
            "dropout",
        ),
    ),
    "perceiver-pytorch": _Integration(
        name="perceiver-pytorch",
        forward=_perceiver_pytorch_forward,
        describe=_perceiver_pytorch_describe,
        fallbacks=f"inverted_attention=True; {_TRAINING_DROPOUT}; masks that are not bool (B, ...) over the keys",
        required=("to_q", "to_kv", "to_out", "heads", "scale"),
    ),
    "perceiver-ar-pytorch": _Integration(
        name="perceiver-ar-pytorch",
        forward=_ar_prefix_forward,
        describe=_ar_describe,
        fallbacks=f"{_TRAINING_DROPOUT}; context masks or rotary tables of shapes perceiver-ar cannot use",
        required=("norm", "context_norm", "to_q", "to_kv", "to_out", "heads", "scale", "dropout", "cross_attn_dropout"),
    ),
    "perceiver-ar-pytorch-self": _Integration(
        name="perceiver-ar-pytorch",
        forward=_ar_self_forward,
        describe=_ar_describe,
        fallbacks=f"{_TRAINING_DROPOUT}; rotary tables of shapes perceiver-ar cannot use",
        required=("norm", "to_qkv", "to_out", "heads", "scale", "dropout"),
    ),
    "perceiver-ar-pytorch-rotary": _Integration(
        name="perceiver-ar-pytorch",
        forward=_ar_rotary_embedding_forward,
        describe=_ar_rotary_describe,
        fallbacks="",
        required=("inv_freq",),
    ),
}

# (module that defines the class, class name, integration). Looked up in sys.modules only: a model can
# only hold instances of a class whose module is imported, and patch() must not import transformers.
_SUPPORTED_CLASSES = (
    ("transformers.models.perceiver.modeling_perceiver", "PerceiverSelfAttention", "transformers"),
    ("perceiver_pytorch.perceiver_pytorch", "Attention", "perceiver-pytorch"),
    ("perceiver_pytorch.perceiver_io", "Attention", "perceiver-pytorch"),
    ("perceiver_ar_pytorch.perceiver_ar_pytorch", "CausalPrefixAttention", "perceiver-ar-pytorch"),
    ("perceiver_ar_pytorch.perceiver_ar_pytorch", "CausalAttention", "perceiver-ar-pytorch-self"),
    ("perceiver_ar_pytorch.perceiver_ar_pytorch", "RotaryEmbedding", "perceiver-ar-pytorch-rotary"),
)

_SAVED_BACKEND = "_perceiver_kernels_backend_before_patch"  # (was an instance attribute, value)


def _supported_classes() -> list[tuple[type, str]]:
    found = []
    for module_name, class_name, integration in _SUPPORTED_CLASSES:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type):
            found.append((cls, integration))
    return found


def _our_attention_class() -> type:
    from .models import MultiHeadAttention  # imported on use: `import perceiver_kernels` stays light

    return MultiHeadAttention


def _why_not(module: nn.Module, cls: type, integration: _Integration) -> str | None:
    if type(module).forward is not cls.forward:
        return f"{type(module).__qualname__} overrides {cls.__qualname__}.forward; patching would bypass its code"
    current = module.__dict__.get("forward")
    if current is not None and not isinstance(current, _PatchedForward):
        return "its forward is already replaced on the instance (another wrapper or hook); left to that wrapper"
    missing = [name for name in integration.required if not hasattr(module, name)]
    if missing:
        return f"lacks {', '.join(missing)}, which this integration reads (an unsupported version?)"
    return None


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_backend(backend: Any) -> None:
    if check_backend(backend) != "auto" and (reason := backend_unavailable_reason(backend)) is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")


# --------------------------------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------------------------------


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Run the attention of every supported module inside ``model`` on :func:`perceiver_kernels.attention`.

    In place and per instance (other instances of the same classes are unaffected); idempotent (patching
    again only updates the backend). Only the attention core changes: projections, norms, output layers
    and their parameters are the module's own. See the module docstring for what is supported.

    Args:
        model: any ``nn.Module``; supported attention modules anywhere in its tree are patched.
        backend: passed to every ``attention`` call: one of ``perceiver_kernels.BACKENDS``.

    Returns:
        A :class:`PatchReport` of the patched modules and of the attention-like modules left unchanged.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``backend`` is not a known backend, or cannot run on this machine.
    """
    _check_model(model)
    _check_backend(backend)
    return _walk(model, backend, apply=True)


def patch_status(model: nn.Module) -> PatchReport:
    """What is patched in ``model`` now, with the calls served and fallen back since patching."""
    _check_model(model)
    return _walk(model, None, apply=False)


def unpatch(model: nn.Module) -> PatchReport:
    """Undo :func:`patch` everywhere in ``model``: the patched modules get their class's forward back (the
    instance attribute is deleted, nothing of ours stays) and ``MultiHeadAttention.backend`` its old value.
    Modules that are not patched are untouched; unpatching an unpatched model is a no-op."""
    _check_model(model)
    restored = []
    for name, module in model.named_modules():
        current = module.__dict__.get("forward")
        if isinstance(current, _PatchedForward):
            del module.forward  # back to type(module).forward
            restored.append(_patched_entry(name, module, current))
        if _SAVED_BACKEND in module.__dict__:
            patched_backend = module.backend
            was_instance_attribute, value = module.__dict__.pop(_SAVED_BACKEND)
            if was_instance_attribute:
                module.backend = value
            else:
                del module.backend  # the class attribute shows through again
            kind = f"{type(module).__name__} (backend {patched_backend!r} -> {module.backend!r})"
            restored.append(PatchedModule(name, "perceiver_kernels.models", kind))
    return PatchReport("unpatch", None, tuple(restored), ())


def _walk(model: nn.Module, backend: str | None, apply: bool) -> PatchReport:
    classes = _supported_classes()
    ours = _our_attention_class()
    patched: list[PatchedModule] = []
    left: list[LeftModule] = []
    listed: set[int] = set()  # ids of modules in either list
    for name, module in model.named_modules():  # shared (weight-tied) modules come once
        if ours is not None and isinstance(module, ours):
            patched_entry = _patch_backend(name, module, backend) if apply else _backend_entry(name, module)
            if patched_entry is not None:
                patched.append(patched_entry)
                listed.add(id(module))
            continue
        match = next(((cls, key) for cls, key in classes if isinstance(module, cls)), None)
        if match is None:
            continue
        cls, key = match
        integration = _INTEGRATIONS[key]
        reason = _why_not(module, cls, integration)
        if reason is not None:
            left.append(LeftModule(name, type(module).__qualname__, reason))
            listed.add(id(module))
            continue
        listed.add(id(module))
        current = module.__dict__.get("forward")
        if apply:
            if isinstance(current, _PatchedForward):
                current.backend = backend  # patched before: keep its counters, take the new backend
            else:
                current = module.forward = _PatchedForward(module, key, backend)
        if isinstance(current, _PatchedForward):
            patched.append(_patched_entry(name, module, current))
        else:  # patch_status on a module that patch() would handle
            left.append(LeftModule(name, type(module).__qualname__, "supported, not patched"))

    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__ or id(module) in listed:
            continue
        if any(id(inner) in listed for inner in module.modules()):
            continue  # a wrapper (projections, residual) around an attention module already listed
        left.append(LeftModule(name, type(module).__qualname__, "not an attention implementation patch() supports"))
    return PatchReport("patch" if apply else "status", backend, tuple(patched), tuple(left))


def _patched_entry(name: str, module: nn.Module, current: _PatchedForward) -> PatchedModule:
    integration = _INTEGRATIONS[current.integration]
    return PatchedModule(
        name=name,
        integration=integration.name,
        kind=integration.describe(module),
        fallbacks=integration.fallbacks,
        calls=current.calls,
        fallback_calls=dict(current.fallback_calls),
    )


def _patch_backend(name: str, module: nn.Module, backend: str) -> PatchedModule:
    """perceiver_kernels.models.MultiHeadAttention already calls our attention: only its backend changes."""
    if _SAVED_BACKEND not in module.__dict__:  # the first patch remembers the original, later ones keep it
        module.__dict__[_SAVED_BACKEND] = ("backend" in module.__dict__, module.backend)
    original = module.__dict__[_SAVED_BACKEND][1]
    module.backend = backend
    return PatchedModule(
        name, "perceiver_kernels.models", f"{type(module).__name__} (backend {original!r} -> {backend!r})"
    )


def _backend_entry(name: str, module: nn.Module) -> PatchedModule | None:
    if _SAVED_BACKEND not in module.__dict__:
        return None
    original = module.__dict__[_SAVED_BACKEND][1]
    kind = f"{type(module).__name__} (backend {original!r} -> {module.backend!r})"
    return PatchedModule(name, "perceiver_kernels.models", kind)
