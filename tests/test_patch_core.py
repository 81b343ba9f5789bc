"""The pk.patch mechanism (perceiver_kernels/integrations/core.py): per instance, idempotent, undone
exactly, weight-tied modules once, deep copies, the report, bad arguments."""

import copy
import re
import types

import pytest
import torch
from patch_helpers import assert_unpatched, small_perceiver
from torch import nn

from perceiver_kernels import backend_unavailable_reason
from perceiver_kernels.integrations import PatchReport, patch, patch_status, unpatch


def test_patch_is_per_instance_idempotent_and_undone(perceiver_pytorch, device):
    from perceiver_pytorch.perceiver_pytorch import Attention

    class_forward = Attention.forward
    model, other = small_perceiver(perceiver_pytorch, device), small_perceiver(perceiver_pytorch, device)
    inputs = dict(data=torch.randn(2, 4, 4, 3, device=device))
    before = model(**inputs)
    first = patch(model, backend="reference")
    forwards = [m.forward for m in model.modules() if "forward" in vars(m)]
    second = patch(model, backend="triton")
    assert [m.forward for m in model.modules() if "forward" in vars(m)] == forwards  # the same objects
    assert all(f.backend == "triton" for f in forwards)
    assert [m.name for m in second.patched] == [m.name for m in first.patched]
    assert Attention.forward is class_forward
    assert_unpatched(other)  # another instance of the same classes
    torch.testing.assert_close(model(**inputs), before, rtol=1e-4, atol=1e-4)
    assert len(unpatch(model).patched) == 4
    assert_unpatched(model)
    assert torch.equal(model(**inputs), before)
    assert unpatch(model).patched == ()  # nothing left to undo


def test_weight_tied_modules_are_patched_once(perceiver_pytorch):
    model = small_perceiver(perceiver_pytorch, "cpu", depth=3, weight_tie_layers=True)
    # Layers 1 and 2 share one block (layer 0 is never tied in perceiver-pytorch).
    assert [m.name for m in patch(model).patched] == [
        "layers.0.cross_attn.fn",
        "layers.0.self_attns.0.0.fn",
        "layers.1.cross_attn.fn",
        "layers.1.self_attns.0.0.fn",
    ]


def test_deepcopy_of_a_patched_model_is_patched_on_its_own_parameters(perceiver_pytorch):
    model = small_perceiver(perceiver_pytorch, "cpu")
    inputs = dict(data=torch.randn(2, 4, 4, 3))
    patch(model, backend="reference")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    attention_module = twin.layers[0].cross_attn.fn
    assert attention_module.forward.module is attention_module
    out = twin(**inputs)
    unpatch(twin)
    torch.testing.assert_close(out, twin(**inputs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, model(**inputs))


def test_report_lists_what_was_left_and_why(perceiver_pytorch):
    from perceiver_pytorch.perceiver_pytorch import Attention

    class Custom(Attention):
        def forward(self, x, context=None, mask=None, inverted_attention=False):
            return super().forward(x, context, mask, inverted_attention) * 2

    hooked = Attention(8, heads=1, dim_head=8)
    hooked.forward = lambda *args, **kwargs: Attention.forward(hooked, *args, **kwargs)  # someone else's wrapper
    model = nn.ModuleDict(
        dict(
            plain=Attention(8, heads=2, dim_head=4),
            custom=Custom(8),
            hooked=hooked,
            torch_mha=nn.MultiheadAttention(8, 2),
        )
    )
    report = patch(model)
    assert [(m.name, m.integration, m.kind) for m in report.patched] == [
        ("plain", "perceiver-pytorch", "Attention (2 head(s))")
    ]
    reasons = {m.name: (m.class_name, m.reason) for m in report.left}
    assert reasons.keys() == {"custom", "hooked", "torch_mha"}
    assert "overrides Attention.forward" in reasons["custom"][1]
    assert "already replaced on the instance" in reasons["hooked"][1]
    assert reasons["torch_mha"] == ("MultiheadAttention", "not an attention implementation patch() supports")
    assert isinstance(hooked.__dict__["forward"], types.FunctionType)  # left alone

    text = str(report)
    assert text.startswith("perceiver_kernels patch (backend='auto'): 1 module(s) patched, 3 left unchanged")
    assert "patched  plain" in text and "left     torch_mha" in text and "inverted_attention=True" in text
    model.plain(torch.randn(1, 3, 8), inverted_attention=True)
    assert "[0 call(s) on perceiver_kernels, 1 on the original code (inverted_attention=True x1)]" in str(
        patch_status(model)
    )
    assert "restored plain" in str(unpatch(model))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        patch("model")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unpatch(None)
    with pytest.raises(
        ValueError, match=r"backend must be one of \('auto', 'triton', 'cuda', 'reference'\), got 'fast'"
    ):
        patch(nn.Linear(2, 2), backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        patch(nn.Linear(2, 2), backend=None)
    if (reason := backend_unavailable_reason("cuda")) is not None:  # no extension here: patch says why
        with pytest.raises(ValueError, match=f"backend='cuda' cannot run here: {re.escape(reason)}"):
            patch(nn.Linear(2, 2), backend="cuda")


def test_a_model_without_attention_is_left_as_is():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    report = patch(model)
    assert report == PatchReport("patch", "auto", (), ())
    assert_unpatched(model)
