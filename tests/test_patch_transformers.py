"""pk.patch on Hugging Face transformers' Perceiver (perceiver_kernels/integrations/transformers_perceiver.py):
the same outputs and gradients, the fallbacks, masks converted or refused."""

import inspect

import pytest
import torch
from patch_helpers import BACKENDS, TOLERANCES, assert_same, check_patch_matches, run

from perceiver_kernels.integrations import patch, patch_status, unpatch


def hf_config(hf, **overrides):
    # qk_channels != v_channels: Dqk=16 and Dv=32 in the cross-attention, 8 and 16 in self-attention.
    settings = dict(
        num_latents=8, d_latents=32, d_model=32, num_blocks=1, num_self_attends_per_block=1,
        num_self_attention_heads=2, num_cross_attention_heads=1, qk_channels=16, v_channels=32,
        vocab_size=40, max_position_embeddings=16, image_size=4, num_labels=3,
    )  # fmt: skip
    settings.update(overrides)
    return hf.PerceiverConfig(**settings)


def hf_text_inputs(device):
    attention_mask = torch.ones(2, 16, dtype=torch.long, device=device)
    attention_mask[0, 11:] = 0  # padding at the end of sample 0
    return dict(inputs=torch.randint(0, 40, (2, 16), device=device), attention_mask=attention_mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_masked_lm_matches(hf, backend, device):
    # Encoder cross-attention with a padding mask, latent self-attention, and a decoder cross-attention
    # with 8 heads (Dqk=32, Dv=4).
    model = hf.PerceiverForMaskedLM(hf_config(hf)).to(device).eval()
    report = check_patch_matches(model, hf_text_inputs(device), backend, output=lambda out: out.logits)
    assert [m.name for m in report.patched] == [
        "perceiver.encoder.cross_attention.attention.self",
        "perceiver.encoder.self_attends.0.attention.self",
        "perceiver.decoder.decoding_cross_attention.attention.self",
    ]
    assert report.left == ()  # the PerceiverAttention wrappers are not listed
    assert "cross-attention, 1 head(s), Dqk=16, Dv=32" in report.patched[0].kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_image_classification_matches(hf, backend, device):
    model = hf.PerceiverForImageClassificationLearned(hf_config(hf)).to(device).eval()
    inputs = dict(inputs=torch.randn(2, 3, 4, 4, device=device))
    check_patch_matches(model, inputs, backend, output=lambda out: out.logits)


def test_hf_fallbacks_give_the_original_results(hf, device):
    model = hf.PerceiverForMaskedLM(hf_config(hf)).to(device).eval()  # attention_probs_dropout_prob=0.1
    inputs = hf_text_inputs(device)
    # A sample with every input masked: transformers averages all values, our kernels would give zeros.
    fully_masked = dict(inputs, attention_mask=torch.zeros_like(inputs["attention_mask"]))
    fully_masked["attention_mask"][1] = 1
    expected = model(**inputs, output_attentions=True)
    expected_fully_masked = model(**fully_masked).logits
    patch(model, backend="reference")

    # Attention probabilities requested: the original code runs, and returns them.
    actual = model(**inputs, output_attentions=True)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    actual_probabilities = actual.attentions + actual.cross_attentions
    for got, want in zip(actual_probabilities, expected.attentions + expected.cross_attentions, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The other layers are patched: equal up to summation order.
    torch.testing.assert_close(model(**fully_masked).logits, expected_fully_masked, **TOLERANCES["reference"])
    status = {m.name: m for m in patch_status(model).patched}
    cross = status["perceiver.encoder.cross_attention.attention.self"]
    assert cross.fallback_calls == {"output_attentions=True": 1, "a sample with every key masked": 1}
    assert cross.calls == 0
    assert status["perceiver.encoder.self_attends.0.attention.self"].calls == 1  # no mask, no fallback

    # Training mode with dropout on the probabilities: the original code, the same draws, the same result.
    model.train()
    with_dropout = run(model, inputs, lambda out: out.logits, seed=1)
    assert all(m.fallback_calls["attention dropout while training"] == 1 for m in patch_status(model).patched)
    unpatch(model)
    assert_same(run(model, inputs, lambda out: out.logits, seed=1), with_dropout, exact=True)


def test_hf_masks_converted_or_refused(hf, device):
    model = hf.PerceiverModel(hf_config(hf, d_model=12)).to(device).eval()
    cross = model.encoder.cross_attention.attention.self
    hidden, inputs = torch.randn(2, 8, 32, device=device), torch.randn(2, 10, 12, device=device)
    blocked = torch.finfo(torch.float32).min
    padding = torch.zeros(2, 1, 1, 10, device=device)
    padding[0, ..., 6:] = blocked
    per_query = torch.zeros(2, 1, 8, 10, device=device)
    per_query[:, :, 0, 3] = blocked  # only the first query loses key 3
    bias = torch.randn(2, 1, 1, 10, device=device)  # an additive bias, not a mask
    expected = {
        name: cross(hidden, inputs=inputs, inputs_mask=m)
        for name, m in [("pad", padding), ("q", per_query), ("bias", bias)]
    }
    patch(model, backend="reference")
    for name, mask in [("pad", padding), ("q", per_query), ("bias", bias)]:
        torch.testing.assert_close(cross(hidden, inputs=inputs, inputs_mask=mask), expected[name], rtol=1e-5, atol=1e-5)
    assert cross.forward.calls == 1  # the key-padding mask
    assert cross.forward.fallback_calls == {"a mask that is not a pure key-padding mask": 2}


def test_hf_head_mask_falls_back(hf, device):
    from transformers.models.perceiver.modeling_perceiver import PerceiverSelfAttention

    if "head_mask" not in inspect.signature(PerceiverSelfAttention.forward).parameters:
        pytest.skip(f"transformers {hf.__version__} has no head_mask in PerceiverSelfAttention")
    model = hf.PerceiverModel(hf_config(hf)).to(device).eval()
    layer = model.encoder.self_attends[0].attention.self
    hidden, head_mask = torch.randn(2, 8, 32, device=device), torch.rand(1, 2, 1, 1, device=device)
    expected = layer(hidden, head_mask=head_mask)[0]
    patch(model, backend="reference")
    torch.testing.assert_close(layer(hidden, head_mask=head_mask)[0], expected, rtol=0, atol=0)
    assert layer.forward.fallback_calls == {"head_mask": 1}
