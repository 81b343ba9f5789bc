"""Hugging Face ``transformers`` Perceiver: ``PerceiverSelfAttention``, the cross- and self-attention of
``PerceiverModel`` and every task head."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..functional import attention
from .base import TRAINING_DROPOUT, Fallback, Integration, dtype_problem, training_dropout, unexpected_argument

if TYPE_CHECKING:
    from .core import PatchedForward

_HF_ARGUMENTS = {"hidden_states", "attention_mask", "inputs", "inputs_mask", "output_attentions", "head_mask"}


def _hf_forward(patch: PatchedForward, arguments: dict[str, Any]):
    """transformers' ``PerceiverSelfAttention.forward`` with the attention on perceiver_kernels.

    Layout: hidden states ``(B, Nq, q_dim)``; inputs ``(B, Nk, kv_dim)`` for cross-attention (keys and
    values from the inputs, the mask from ``inputs_mask``), else keys and values from the hidden states
    (the mask from ``attention_mask``). Heads split channels head-major, ``Dqk = qk_channels / H`` and
    ``Dv = v_channels / H`` may differ; scores are divided by ``sqrt(Dqk)``. Returns ``((B, Nq, H*Dv),)``.
    """
    module = patch.module
    if arguments.get("output_attentions"):
        return Fallback("output_attentions=True")
    if arguments.get("head_mask") is not None:
        return Fallback("head_mask")
    if problem := unexpected_argument(arguments, _HF_ARGUMENTS) or training_dropout(module):
        return problem
    hidden_states, inputs = arguments["hidden_states"], arguments.get("inputs")
    cross = inputs is not None
    source = inputs if cross else hidden_states
    mask = arguments.get("inputs_mask") if cross else arguments.get("attention_mask")
    if hidden_states.dim() != 3 or source.dim() != 3 or source.shape[0] != hidden_states.shape[0]:
        return Fallback("inputs that are not (batch, seq, channels) with one batch size")
    padding = _hf_key_padding(mask, hidden_states.shape[0], hidden_states.shape[1], source.shape[1])
    if isinstance(padding, Fallback):
        return padding

    hidden_states = module.layernorm1(hidden_states)
    source = module.layernorm2(inputs) if cross else hidden_states
    heads = module.num_heads
    # (B, N, H * D) -> (B, N, H, D): a view, last dim contiguous, as the kernels want.
    q = module.query(hidden_states).unflatten(-1, (heads, module.qk_channels_per_head))
    k = module.key(source).unflatten(-1, (heads, module.qk_channels_per_head))
    v = module.value(source).unflatten(-1, (heads, module.v_channels_per_head))
    if problem := dtype_problem(q, k, v):
        return problem
    # transformers divides the scores by sqrt(Dqk); pass that very number rather than Dqk ** -0.5.
    out = attention(q, k, v, key_padding_mask=padding, scale=1.0 / math.sqrt(q.shape[-1]), backend=patch.backend)
    return (out.flatten(2),)


def _hf_key_padding(mask: Tensor | None, batch: int, num_queries: int, num_keys: int) -> Tensor | None | Fallback:
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
        return Fallback("a mask that is not a 4-D additive float mask")
    mask_batch, mask_heads, mask_queries, mask_keys = mask.shape
    if mask_batch not in (1, batch) or mask_heads != 1 or mask_queries not in (1, num_queries) or mask_keys != num_keys:
        return Fallback(f"a mask of shape {tuple(mask.shape)}, not (B, 1, Nq or 1, Nk)")
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
        return Fallback("a mask that is not a pure key-padding mask")
    if not every_sample_sees_a_key:
        return Fallback("a sample with every key masked")
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


INTEGRATIONS = (
    Integration(
        key="transformers",
        name="transformers Perceiver",
        classes=(("transformers.models.perceiver.modeling_perceiver", "PerceiverSelfAttention"),),
        forward=_hf_forward,
        describe=_hf_describe,
        fallbacks=(
            f"output_attentions=True; head_mask; {TRAINING_DROPOUT}; masks that are not pure key padding, "
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
        ),  # fmt: skip
    ),
)
