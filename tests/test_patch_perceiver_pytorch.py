"""pk.patch on lucidrains' perceiver-pytorch (perceiver_kernels/integrations/perceiver_pytorch.py)."""

import pytest
import torch
from patch_helpers import BACKENDS, assert_same, check_patch_matches, run, small_perceiver

from perceiver_kernels.integrations import patch, patch_status, unpatch


@pytest.mark.parametrize("backend", BACKENDS)
def test_perceiver_matches(perceiver_pytorch, backend, device):
    model = small_perceiver(perceiver_pytorch, device, attn_residual=True, attn_residual_rank=4)
    mask = torch.rand(2, 4, 4, device=device) > 0.3  # True = keep, one per pixel (flattened by the model)
    mask[1] = False  # nothing to attend to: perceiver-pytorch averages all values uniformly
    report = check_patch_matches(model, dict(data=torch.randn(2, 4, 4, 3, device=device), mask=mask), backend)
    assert len(report.patched) == 4
    assert {(m.name, m.class_name) for m in report.left} == {
        ("attn_residuals.0", "EnformerAttentionResidual"),
        ("attn_residuals.1", "EnformerAttentionResidual"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_perceiver_io_matches(perceiver_pytorch, backend, device):
    model = perceiver_pytorch.PerceiverIO(
        depth=1, dim=12, queries_dim=20, logits_dim=7, num_latents=8, latent_dim=32, cross_heads=1,
        latent_heads=2, cross_dim_head=16, latent_dim_head=16, decoder_ff=True,
    ).to(device).eval()  # fmt: skip
    mask = torch.ones(2, 10, dtype=torch.bool, device=device)
    mask[0, 7:] = False
    inputs = dict(data=torch.randn(2, 10, 12, device=device), mask=mask, queries=torch.randn(2, 6, 20, device=device))
    report = check_patch_matches(model, inputs, backend)
    assert [m.name for m in report.patched] == [
        "cross_attend_block.cross_attn.fn",
        "layers.0.self_attns.0.0.fn",
        "decoder_cross_attn.fn",  # perceiver_io.Attention, a different class
    ]


def test_perceiver_pytorch_queries_join_the_keys(perceiver_pytorch, device):
    from perceiver_pytorch.perceiver_pytorch import Attention

    module = Attention(16, heads=2, dim_head=8, queries_contribute_kv=True).to(device)
    x, context, mask = torch.randn(2, 5, 16), torch.randn(2, 9, 16), torch.rand(2, 9) > 0.4
    check_patch_matches(module, dict(x=x.to(device), context=context.to(device), mask=mask.to(device)), "reference")


def test_perceiver_pytorch_fallbacks(perceiver_pytorch, device):
    model = small_perceiver(perceiver_pytorch, device, attn_dropout=0.2, inverted_cross_attn=(True, False)).train()
    inputs = dict(data=torch.randn(2, 4, 4, 3, device=device), mask=torch.rand(2, 4, 4, device=device) > 0.3)
    expected = run(model, inputs, seed=3)
    patch(model, backend="reference")
    assert_same(expected, run(model, inputs, seed=3), exact=True)
    fallbacks = {m.name: m.fallback_calls for m in patch_status(model).patched}
    assert fallbacks["layers.0.cross_attn.fn"] == {"inverted_attention=True": 1}  # checked before dropout
    assert fallbacks["layers.1.cross_attn.fn"] == {"attention dropout while training": 1}

    model.eval()  # dropout inactive: only the first block's inverted attention still falls back
    out = model(**inputs)
    assert patch_status(model).patched[0].fallback_calls == {"inverted_attention=True": 2}
    assert all(m.calls == 1 for m in patch_status(model).patched[1:])
    unpatch(model)
    torch.testing.assert_close(out, model(**inputs), rtol=1e-5, atol=1e-5)
