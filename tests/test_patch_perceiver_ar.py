"""pk.patch on lucidrains' perceiver-ar-pytorch (perceiver_kernels/integrations/perceiver_ar_pytorch.py):
rotary in the kernel for the standard table, prefix dropout as a gather, other tables in PyTorch."""

import pytest
import torch
from patch_helpers import BACKENDS, TOLERANCES, assert_same, check_patch_matches, run

import perceiver_kernels.integrations.perceiver_ar_pytorch as ar_integration
from perceiver_kernels.integrations import patch, patch_status


@pytest.fixture
def attention_calls(monkeypatch):
    """The keyword arguments of every perceiver_kernels.attention call made by patched modules."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    real = ar_integration.attention
    monkeypatch.setattr(ar_integration, "attention", spy)
    return calls


def small_perceiver_ar(perceiver_ar, device, **overrides):
    # dim_head 64: perceiver-ar rotates the first max(32, 64 // 2) = 32 channels of each head.
    settings = dict(num_tokens=50, dim=32, depth=1, max_seq_len=24, cross_attn_seq_len=16, dim_head=64, heads=2)
    settings.update(overrides)
    return perceiver_ar.PerceiverAR(**settings).to(device).eval()


def perceiver_ar_inputs(device):
    prefix_mask = torch.ones(2, 16, dtype=torch.bool, device=device)
    prefix_mask[1, :5] = False  # left padding of the prefix, True = keep
    return dict(x=torch.randint(0, 50, (2, 24), device=device), prefix_mask=prefix_mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perceiver_ar_matches_with_rotary_in_the_kernel(perceiver_ar, backend, device, attention_calls):
    model = small_perceiver_ar(perceiver_ar, device)
    report = check_patch_matches(model, perceiver_ar_inputs(device), backend)
    assert [m.name for m in report.patched] == ["rotary_pos_emb", "perceive_layers.0.0", "layers.0.0"]
    # The table was recognised: both modules rotated in the kernel, NeoX layout, at their absolute positions.
    prefix_call, self_call = attention_calls
    for call in attention_calls:
        assert call["causal"] and call["rotary_dim"] == 32 and call["rotary_interleaved"] is False
    assert prefix_call["q_positions"].tolist() == [list(range(16, 24))]
    assert prefix_call["k_positions"].tolist() == [list(range(24))]
    assert self_call["k_positions"].tolist() == [list(range(16, 24))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perceiver_ar_prefix_dropout_matches(perceiver_ar, backend, device, attention_calls):
    # Training with prefix dropout: the same random prefix positions are kept, with their own rotary rows.
    model = small_perceiver_ar(perceiver_ar, device, cross_attn_dropout=0.5, perceive_depth=2).train()
    check_patch_matches(model, perceiver_ar_inputs(device), backend, seed=5)
    k_positions = attention_calls[0]["k_positions"]
    assert k_positions.shape == (2, 8 + 8)  # 8 of 16 prefix positions kept, then the 8 latents
    assert k_positions[:, 8:].tolist() == [list(range(16, 24))] * 2
    assert k_positions[0, :8].tolist() != list(range(8))  # a real draw, not the first positions


def test_perceiver_ar_other_tables_rotate_in_pytorch(perceiver_ar, device, attention_calls):
    # A table not made by the model's RotaryEmbedding (here: arbitrary angles, longer than the sequence)
    # is applied in PyTorch exactly as perceiver-ar applies it.
    from perceiver_ar_pytorch.perceiver_ar_pytorch import CausalAttention, CausalPrefixAttention

    table = torch.randn(30, 32, device=device) * 3
    prefix = CausalPrefixAttention(dim=32, dim_head=64, heads=2).to(device)
    x, context, mask = torch.randn(2, 6, 32), torch.randn(2, 12, 32), torch.rand(2, 12) > 0.3
    inputs = dict(x=x.to(device), context=context.to(device), context_mask=mask.to(device), rotary_pos_emb=table)
    check_patch_matches(prefix, inputs, "reference")
    self_attention = CausalAttention(dim=32, dim_head=32, heads=2).to(device)
    check_patch_matches(self_attention, dict(x=torch.randn(2, 7, 32, device=device), rotary_pos_emb=table), "reference")
    assert all("rotary_dim" not in call for call in attention_calls)


def test_perceiver_ar_attention_dropout_falls_back(perceiver_ar, device):
    model = small_perceiver_ar(
        perceiver_ar, device, dropout=0.1
    ).train()  # dropout on the prefix attention's probabilities
    inputs = perceiver_ar_inputs(device)
    expected = run(model, inputs, seed=7)
    patch(model, backend="reference")
    assert_same(expected, run(model, inputs, seed=7), **TOLERANCES["reference"])  # the self-attention is patched
    status = {m.name: m for m in patch_status(model).patched}
    assert status["perceive_layers.0.0"].fallback_calls == {"attention dropout while training": 1}
    assert status["layers.0.0"].calls == 1  # CausalAttention is built without dropout
