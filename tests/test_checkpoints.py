"""perceiver-io checkpoints load into our models as they are, and ours into perceiver-io: the same state-dict
keys and shapes. The expected keys are facts read from perceiver-io v0.11 (krasserm/perceiver-io,
``perceiver/model/core/{modules,adapter,position}.py``) for the small configurations below; its outputs
were matched by hand (logits within 2e-7 on the reference and Triton backends, both load directions),
since perceiver-io is not a dependency of this package."""

import pytest
import torch
from torch import nn

import perceiver_kernels.models as models

# CausalSequenceModelConfig(vocab_size=30, max_seq_len=16, max_latents=8, num_channels=32, num_heads=4,
# num_self_attention_layers=1, output_norm=True): perceiver-io's CausalSequenceModel is a PerceiverAR, so
# its keys sit at the top level; its RotarySupport adapter keeps a FrequencyPositionEncoding buffer.
CLM_KEYS = {
    "input_adapter.txt_embedding.weight": (30, 32),
    "input_adapter.pos_embedding.weight": (16, 32),
    "input_adapter.frq_pos_encoding.inv_freq": (2,),
    "cross_attention.0.module.q_norm.weight": (32,),
    "cross_attention.0.module.q_norm.bias": (32,),
    "cross_attention.0.module.kv_norm.weight": (32,),
    "cross_attention.0.module.kv_norm.bias": (32,),
    "cross_attention.0.module.attention.q_proj.weight": (32, 32),
    "cross_attention.0.module.attention.k_proj.weight": (32, 32),
    "cross_attention.0.module.attention.v_proj.weight": (32, 32),
    "cross_attention.0.module.attention.o_proj.weight": (32, 32),
    "cross_attention.0.module.attention.o_proj.bias": (32,),
    "cross_attention.1.module.0.weight": (32,),
    "cross_attention.1.module.0.bias": (32,),
    "cross_attention.1.module.1.weight": (128, 32),
    "cross_attention.1.module.3.weight": (32, 128),
    "self_attention.0.0.module.norm.weight": (32,),
    "self_attention.0.0.module.norm.bias": (32,),
    "self_attention.0.0.module.attention.q_proj.weight": (32, 32),
    "self_attention.0.0.module.attention.k_proj.weight": (32, 32),
    "self_attention.0.0.module.attention.v_proj.weight": (32, 32),
    "self_attention.0.0.module.attention.o_proj.weight": (32, 32),
    "self_attention.0.1.module.0.weight": (32,),
    "self_attention.0.1.module.0.bias": (32,),
    "self_attention.0.1.module.1.weight": (128, 32),
    "self_attention.0.1.module.3.weight": (32, 128),
    "out_norm.weight": (32,),
    "out_norm.bias": (32,),
    "output_adapter.bias": (30,),
}

# PerceiverIO(PerceiverEncoder(adapter Linear(6, 12), num_latents=5, num_latent_channels=16,
# num_cross_attention_heads=2, num_self_attention_heads=2, num_self_attention_layers_per_block=1,
# num_self_attention_blocks=1), PerceiverDecoder(ClassificationOutputAdapter(4, 8),
# TrainableQueryProvider(1, 8), num_latent_channels=16, num_cross_attention_heads=1)): a Sequential.
IO_KEYS = {
    "0.latent_provider._query": (5, 16),
    "0.input_adapter.linear.weight": (12, 6),
    "0.input_adapter.linear.bias": (12,),
    "0.cross_attn_1.0.module.q_norm.weight": (16,),
    "0.cross_attn_1.0.module.q_norm.bias": (16,),
    "0.cross_attn_1.0.module.kv_norm.weight": (12,),
    "0.cross_attn_1.0.module.kv_norm.bias": (12,),
    "0.cross_attn_1.0.module.attention.q_proj.weight": (16, 16),
    "0.cross_attn_1.0.module.attention.q_proj.bias": (16,),
    "0.cross_attn_1.0.module.attention.k_proj.weight": (16, 12),
    "0.cross_attn_1.0.module.attention.k_proj.bias": (16,),
    "0.cross_attn_1.0.module.attention.v_proj.weight": (16, 12),
    "0.cross_attn_1.0.module.attention.v_proj.bias": (16,),
    "0.cross_attn_1.0.module.attention.o_proj.weight": (16, 16),
    "0.cross_attn_1.0.module.attention.o_proj.bias": (16,),
    "0.cross_attn_1.1.module.0.weight": (16,),
    "0.cross_attn_1.1.module.0.bias": (16,),
    "0.cross_attn_1.1.module.1.weight": (16, 16),
    "0.cross_attn_1.1.module.1.bias": (16,),
    "0.cross_attn_1.1.module.3.weight": (16, 16),
    "0.cross_attn_1.1.module.3.bias": (16,),
    "0.self_attn_1.0.0.module.norm.weight": (16,),
    "0.self_attn_1.0.0.module.norm.bias": (16,),
    "0.self_attn_1.0.0.module.attention.q_proj.weight": (16, 16),
    "0.self_attn_1.0.0.module.attention.q_proj.bias": (16,),
    "0.self_attn_1.0.0.module.attention.k_proj.weight": (16, 16),
    "0.self_attn_1.0.0.module.attention.k_proj.bias": (16,),
    "0.self_attn_1.0.0.module.attention.v_proj.weight": (16, 16),
    "0.self_attn_1.0.0.module.attention.v_proj.bias": (16,),
    "0.self_attn_1.0.0.module.attention.o_proj.weight": (16, 16),
    "0.self_attn_1.0.0.module.attention.o_proj.bias": (16,),
    "0.self_attn_1.0.1.module.0.weight": (16,),
    "0.self_attn_1.0.1.module.0.bias": (16,),
    "0.self_attn_1.0.1.module.1.weight": (16, 16),
    "0.self_attn_1.0.1.module.1.bias": (16,),
    "0.self_attn_1.0.1.module.3.weight": (16, 16),
    "0.self_attn_1.0.1.module.3.bias": (16,),
    "1.output_query_provider._query": (1, 8),
    "1.output_adapter.linear.weight": (4, 8),
    "1.output_adapter.linear.bias": (4,),
    "1.cross_attn.0.module.q_norm.weight": (8,),
    "1.cross_attn.0.module.q_norm.bias": (8,),
    "1.cross_attn.0.module.kv_norm.weight": (16,),
    "1.cross_attn.0.module.kv_norm.bias": (16,),
    "1.cross_attn.0.module.attention.q_proj.weight": (8, 8),
    "1.cross_attn.0.module.attention.q_proj.bias": (8,),
    "1.cross_attn.0.module.attention.k_proj.weight": (8, 16),
    "1.cross_attn.0.module.attention.k_proj.bias": (8,),
    "1.cross_attn.0.module.attention.v_proj.weight": (8, 16),
    "1.cross_attn.0.module.attention.v_proj.bias": (8,),
    "1.cross_attn.0.module.attention.o_proj.weight": (8, 8),
    "1.cross_attn.0.module.attention.o_proj.bias": (8,),
    "1.cross_attn.1.module.0.weight": (8,),
    "1.cross_attn.1.module.0.bias": (8,),
    "1.cross_attn.1.module.1.weight": (8, 8),
    "1.cross_attn.1.module.1.bias": (8,),
    "1.cross_attn.1.module.3.weight": (8, 8),
    "1.cross_attn.1.module.3.bias": (8,),
}


def small_clm(**overrides) -> models.CausalSequenceModel:
    settings = dict(vocab_size=30, max_seq_len=16, max_latents=8, num_channels=32, num_heads=4,
                    num_self_attention_layers=1, output_norm=True)  # fmt: skip
    settings.update(overrides)
    return models.CausalSequenceModel(models.CausalSequenceModelConfig(**settings), backend="reference")


class Adapter(models.InputAdapter):
    def __init__(self):
        super().__init__(12)
        self.linear = nn.Linear(6, 12)

    def forward(self, x):
        return self.linear(x)


def small_io() -> models.PerceiverIO:
    encoder = models.PerceiverEncoder(
        Adapter(), num_latents=5, num_latent_channels=16, num_cross_attention_heads=2, num_self_attention_heads=2,
        num_self_attention_layers_per_block=1, num_self_attention_blocks=1, backend="reference",
    )  # fmt: skip
    decoder = models.PerceiverDecoder(
        models.ClassificationOutputAdapter(4, 8), models.TrainableQueryProvider(1, 8), num_latent_channels=16,
        num_cross_attention_heads=1, backend="reference",
    )  # fmt: skip
    return models.PerceiverIO(encoder, decoder)


@pytest.mark.parametrize("build, expected", [(small_clm, CLM_KEYS), (small_io, IO_KEYS)], ids=["clm", "io"])
def test_state_dict_has_perceiver_io_keys_and_shapes(build, expected):
    state = build().state_dict()
    assert {name: tuple(tensor.shape) for name, tensor in state.items()} == expected


def test_a_perceiver_io_style_checkpoint_loads_strictly_and_runs_the_same():
    """A state dict with perceiver-io's keys (here: another instance's) loads strictly; the logits follow it."""
    source, target = small_clm().eval(), small_clm().eval()
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randint(0, 30, (2, 14))
    pad_mask = torch.zeros(2, 14, dtype=torch.bool)
    pad_mask[1, :3] = True
    torch.testing.assert_close(target(x, 6, pad_mask), source(x, 6, pad_mask), rtol=0, atol=0)


def test_rotary_frequencies_must_be_the_ones_the_kernels_compute():
    """perceiver-io's inv_freq buffer is kept for checkpoints; a value the kernels would not use is refused,
    a half-precision copy of the right one is accepted."""
    model = small_clm(abs_pos_emb=False)
    state = model.state_dict()
    key = "input_adapter.frq_pos_encoding.inv_freq"
    model.load_state_dict({**state, key: state[key].half()}, strict=True)
    with pytest.raises(ValueError, match="input_adapter.frq_pos_encoding.inv_freq holds other rotary frequencies"):
        model.load_state_dict({**state, key: state[key] * 1.01}, strict=True)
