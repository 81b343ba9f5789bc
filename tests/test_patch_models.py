"""pk.patch on perceiver_kernels.models (perceiver_kernels/integrations/models.py): the backend attribute."""

import pytest
import torch
from patch_helpers import TOLERANCES, assert_same, run
from torch import nn

import perceiver_kernels.models as models
from perceiver_kernels.integrations import patch, unpatch


def test_models_backend_is_set_and_restored():
    cfg = models.CausalSequenceModelConfig(
        vocab_size=30, max_seq_len=16, max_latents=8, num_channels=32, num_heads=4, num_self_attention_layers=2
    )
    model = models.CausalSequenceModel(cfg, backend="auto")
    model.self_attention[1][0].module.attention.backend = "reference"  # one differs before patching
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
