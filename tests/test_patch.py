"""patch()/unpatch(): third-party Perceiver models give the same outputs and gradients with their
attention on perceiver_kernels, fall back where they must, and come back exactly as they were.

Every model is a tiny, randomly initialised one built from its config (no downloads), on the test
device (a GPU when there is one). "reference" runs our PyTorch reference, "triton" the Triton kernels
(in the CPU interpreter without a GPU).
"""

import copy
import inspect
import re
import types

import pytest
import torch
from torch import Tensor, nn

import perceiver_kernels.models as models
import perceiver_kernels.patching as patch_module
from perceiver_kernels import backend_unavailable_reason
from perceiver_kernels.patching import PatchReport, patch, patch_status, unpatch

# float32 throughout. The reference backend differs from the models' own einsum/matmul code only in
# summation order; the Triton kernels accumulate in tiles.
TOLERANCES = {"reference": dict(rtol=1e-5, atol=1e-5), "triton": dict(rtol=1e-4, atol=1e-4)}
BACKENDS = list(TOLERANCES)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def run(model: nn.Module, inputs: dict, output=lambda out: out, seed: int | None = None):
    """Output, and the gradients of every parameter and float input, of one forward and backward."""
    model.zero_grad(set_to_none=True)
    inputs = {
        name: value.detach().clone().requires_grad_()
        if isinstance(value, Tensor) and value.is_floating_point()
        else value
        for name, value in inputs.items()
    }
    if seed is not None:  # models that draw random numbers (dropout) draw the same ones in both runs
        torch.manual_seed(seed)
    out = output(model(**inputs))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
    (out * cotangent).sum().backward()
    grads = {f"parameter {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input {n}": v.grad for n, v in inputs.items() if isinstance(v, Tensor) and v.grad is not None})
    return out.detach(), grads


def assert_same(expected, actual, exact: bool = False, **tolerance):
    """Outputs and gradients within ``tolerance``; ``exact``: bitwise outputs, and bitwise gradients on
    CPU (some CUDA backward kernels accumulate with atomics, in no fixed order)."""
    (out_e, grads_e), (out_a, grads_a) = expected, actual
    grad_tolerance = tolerance
    if exact:
        tolerance = dict(rtol=0, atol=0)
        grad_tolerance = tolerance if out_e.device.type == "cpu" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_a, out_e, **tolerance)
    assert grads_a.keys() == grads_e.keys()
    assert grads_e, "no gradients to compare"
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_a[name], grad, **grad_tolerance, msg=lambda m, name=name: f"{name}: {m}")


def check_patch_matches(model, inputs, backend, output=lambda out: out, seed=None) -> PatchReport:
    """Unpatched vs patched (outputs and gradients), every patched module used without fallback, and
    unpatch gives back bitwise the original results."""
    before = run(model, inputs, output, seed)
    report = patch(model, backend=backend)
    assert report.patched
    assert_same(before, run(model, inputs, output, seed), **TOLERANCES[backend])
    for entry in patch_status(model).patched:
        assert entry.calls == 1 and not entry.fallback_calls, entry
    unpatch(model)
    assert_same(before, run(model, inputs, output, seed), exact=True)
    return report


def assert_unpatched(model: nn.Module) -> None:
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert module.forward.__func__ is type(module).forward


@pytest.fixture
def attention_calls(monkeypatch):
    """The keyword arguments of every perceiver_kernels.attention call made by patched modules."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    real = patch_module.attention
    monkeypatch.setattr(patch_module, "attention", spy)
    return calls


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def hf():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install .[integrations])")


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


# ------------------------------------------------------------------------------------------------
# lucidrains' perceiver-pytorch
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def perceiver_pytorch():
    return pytest.importorskip(
        "perceiver_pytorch", reason="perceiver-pytorch is not installed (pip install .[integrations])"
    )


def small_perceiver(perceiver_pytorch, device, **overrides):
    settings = dict(
        num_freq_bands=2, depth=2, max_freq=4.0, input_channels=3, input_axis=2, num_latents=8, latent_dim=32,
        cross_heads=1, latent_heads=2, cross_dim_head=16, latent_dim_head=16, num_classes=5,
    )  # fmt: skip
    settings.update(overrides)
    return perceiver_pytorch.Perceiver(**settings).to(device).eval()


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


# ------------------------------------------------------------------------------------------------
# lucidrains' perceiver-ar-pytorch
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def perceiver_ar():
    return pytest.importorskip(
        "perceiver_ar_pytorch", reason="perceiver-ar-pytorch is not installed (pip install .[integrations])"
    )


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


# ------------------------------------------------------------------------------------------------
# perceiver_kernels.models
# ------------------------------------------------------------------------------------------------


def test_models_backend_is_set_and_restored():
    cfg = models.CausalSequenceModelConfig(
        vocab_size=30, max_seq_len=16, max_latents=8, num_channels=32, num_heads=4, num_self_attention_layers=2
    )
    model = models.CausalSequenceModel(cfg, backend="auto")
    model.perceiver_ar.self_attention[1][0].module.attention.backend = "reference"  # one differs before patching
    report = patch(model, backend="triton")
    attentions = [m for m in model.modules() if isinstance(m, models.MultiHeadAttention)]
    assert len(report.patched) == len(attentions) == 3 and not report.left
    assert all(m.backend == "triton" for m in attentions)
    patch(model, backend="reference")  # idempotent: unpatch restores the values from before the first patch
    assert len(unpatch(model).patched) == 3
    assert [m.backend for m in attentions] == ["auto", "auto", "reference"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_models_patched_matches_unpatched(backend, device):
    """A PerceiverIO and a CausalSequenceModel built with the reference backend, patched to ``backend``:
    the same outputs and gradients."""
    encoder = models.PerceiverEncoder(
        Adapter(6, 12), num_latents=5, num_latent_channels=16, num_cross_attention_heads=2,
        num_self_attention_heads=2, num_self_attention_layers_per_block=1, num_self_attention_blocks=2,
        backend="reference",
    )  # fmt: skip
    decoder = models.PerceiverDecoder(
        models.ClassificationOutputAdapter(4, 8), models.TrainableQueryProvider(1, 8), num_latent_channels=16,
        num_cross_attention_heads=1, backend="reference",
    )  # fmt: skip
    io = models.PerceiverIO(encoder, decoder).to(device)
    x = torch.randn(2, 9, 6, device=device)
    pad = torch.zeros(2, 9, dtype=torch.bool, device=device)
    pad[1, 5:] = True
    cfg = models.CausalSequenceModelConfig(
        vocab_size=30, max_seq_len=16, max_latents=6, num_channels=32, num_heads=4, num_self_attention_layers=1
    )
    ar = models.CausalSequenceModel(cfg, backend="reference").to(device).eval()
    tokens = torch.randint(0, 30, (2, 12), device=device)
    for model, inputs in ((io, dict(x=x, pad_mask=pad)), (ar, dict(x=tokens, prefix_len=6))):
        expected = run(model, inputs)
        patch(model, backend=backend)
        assert_same(expected, run(model, inputs), **TOLERANCES[backend])
        unpatch(model)
        assert_same(expected, run(model, inputs), exact=True)


class Adapter(models.InputAdapter):
    def __init__(self, in_features: int, channels: int):
        super().__init__(channels)
        self.linear = nn.Linear(in_features, channels)

    def forward(self, x):
        return self.linear(x)


# ------------------------------------------------------------------------------------------------
# patch() / unpatch() mechanics
# ------------------------------------------------------------------------------------------------


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
