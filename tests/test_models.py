"""The model layer: perceiver-io's structure and semantics, parameter counts, backends, decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import perceiver_kernels.models.perceiver as perceiver_module
from perceiver_kernels.models import (
    CausalSequenceModel,
    CausalSequenceModelConfig,
    ClassificationOutputAdapter,
    DecoderConfig,
    EncoderConfig,
    InputAdapter,
    MultiHeadAttention,
    PerceiverARConfig,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverIO,
    TrainableQueryProvider,
    run_shared_chain,
)
from perceiver_kernels.testing import compare


class LinearInputAdapter(InputAdapter):
    """``(B, M, F) -> (B, M, C)``: the smallest adapter with parameters."""

    def __init__(self, in_features: int, num_input_channels: int):
        super().__init__(num_input_channels)
        self.linear = nn.Linear(in_features, num_input_channels)

    def forward(self, x):
        return self.linear(x)


def make_encoder(backend="reference", in_features=6, channels=12, **overrides):
    kwargs = dict(
        num_latents=5, num_latent_channels=16, num_cross_attention_heads=2, num_cross_attention_qk_channels=8,
        num_cross_attention_v_channels=12, num_self_attention_heads=2, num_self_attention_layers_per_block=2,
        cross_attention_widening_factor=2, self_attention_widening_factor=3, backend=backend,
    )  # fmt: skip
    kwargs.update(overrides)
    return PerceiverEncoder(LinearInputAdapter(in_features, channels), **kwargs)


def make_classifier(backend="reference", **overrides):
    encoder = make_encoder(backend, **overrides)
    decoder = PerceiverDecoder(
        ClassificationOutputAdapter(num_classes=7, num_output_query_channels=10),
        TrainableQueryProvider(num_queries=1, num_query_channels=10),
        num_latent_channels=16, num_cross_attention_heads=1, backend=backend,
    )  # fmt: skip
    return PerceiverIO(encoder, decoder)


def tiny_ar_config(**overrides) -> CausalSequenceModelConfig:
    fields = dict(
        vocab_size=40, max_seq_len=20, max_latents=6, num_channels=32, num_heads=4, num_self_attention_layers=2,
        num_self_attention_rotary_layers=1, cross_attention_dropout=0.5,
    )  # fmt: skip
    fields.update(overrides)
    return CausalSequenceModelConfig(**fields)


# -- configurations ------------------------------------------------------------------------------------


def test_a_config_describes_the_model():
    """Keywords and a config build the same model; the config is kept, printed, compared, saved and rebuilt;
    keywords override a config's fields; an unknown one is a TypeError naming it."""
    config = EncoderConfig(
        num_cross_attention_heads=2, num_self_attention_heads=2, num_self_attention_layers_per_block=2,
        num_self_attention_blocks=3, first_self_attention_block_shared=False,
    )  # fmt: skip
    torch.manual_seed(0)
    from_config = PerceiverEncoder(LinearInputAdapter(6, 12), 5, 16, config, backend="reference")
    torch.manual_seed(0)
    from_keywords = PerceiverEncoder(
        LinearInputAdapter(6, 12), 5, 16, backend="reference", **dataclasses.asdict(config)
    )
    assert from_keywords.config == from_config.config == config
    state = from_config.state_dict()
    assert all(torch.equal(value, from_keywords.state_dict()[key]) for key, value in state.items())
    assert EncoderConfig(**dataclasses.asdict(config)) == config  # saved as a dict, rebuilt
    assert "num_self_attention_blocks=3" in repr(from_config.config)

    overridden = PerceiverEncoder(LinearInputAdapter(6, 12), 5, 16, config, num_self_attention_blocks=2)
    assert overridden.config == dataclasses.replace(config, num_self_attention_blocks=2)
    assert overridden.num_self_attention_blocks == 2 and config.num_self_attention_blocks == 3
    with pytest.raises(TypeError, match="unexpected keyword argument.*'num_heads'"):
        PerceiverEncoder(LinearInputAdapter(6, 12), 5, 16, num_heads=2)
    with pytest.raises(TypeError, match="config must be a EncoderConfig, got DecoderConfig"):
        PerceiverEncoder(LinearInputAdapter(6, 12), 5, 16, DecoderConfig())


def test_run_time_switches_update_the_config():
    """``shared_block_execution`` and ``activation_checkpointing`` can be switched on a built encoder (the
    config and the blocks follow); what built its modules (sizes) cannot."""
    encoder = make_encoder(num_self_attention_blocks=2, first_self_attention_block_shared=False)
    assert encoder.shared_block_execution == "reuse" and not encoder.activation_checkpointing  # the defaults
    encoder.shared_block_execution = "recompute"
    assert encoder.config.shared_block_execution == "recompute"
    encoder.activation_checkpointing = True
    assert encoder.config.activation_checkpointing
    assert encoder.self_attn_1.activation_checkpointing and encoder.self_attn_n.activation_checkpointing
    with pytest.raises(AttributeError):
        encoder.num_self_attention_blocks = 3


def test_shared_block_execution_values():
    """The mode is a name; booleans (the switch's earlier form) map to the two modes; anything else is refused
    with the field's name."""
    assert EncoderConfig(shared_block_execution=True).shared_block_execution == "recompute"
    assert EncoderConfig(shared_block_execution=False) == EncoderConfig()
    for bad in ("checkpoint", 1, None):
        with pytest.raises(ValueError, match="shared_block_execution must be one of 'reuse', 'recompute'"):
            EncoderConfig(shared_block_execution=bad)
    with pytest.raises(ValueError, match="shared_block_execution"):
        make_encoder().shared_block_execution = "fast"


def test_ar_models_take_their_config():
    config = tiny_ar_config()
    model = CausalSequenceModel(config, backend="reference")
    assert model.config is config and isinstance(config, PerceiverARConfig)
    assert model.num_heads == 4 and len(model.self_attention) == config.num_self_attention_layers
    decoder = PerceiverDecoder(
        ClassificationOutputAdapter(num_classes=7, num_output_query_channels=10),
        TrainableQueryProvider(num_queries=1, num_query_channels=10), 16, DecoderConfig(num_cross_attention_heads=2),
    )  # fmt: skip
    assert decoder.config.num_cross_attention_heads == 2


# -- parameter counts: formulas written out by hand -------------------------------------------------


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mha_count(q_in, kv_in, qk, v, out, qkv_bias=True, out_bias=True):
    return q_in * qk + kv_in * qk + kv_in * v + v * out + (2 * qk + v) * qkv_bias + out * out_bias


def mlp_count(c, widening, bias=True):
    return 2 * c + 2 * widening * c * c + (widening * c + c) * bias


def test_parameter_count_multi_head_attention():
    assert count(MultiHeadAttention(4, 24, 40)) == mha_count(24, 40, 24, 24, 24)
    m = MultiHeadAttention(2, 24, 40, num_qk_channels=8, num_v_channels=12, num_output_channels=30, qkv_bias=False)
    assert count(m) == mha_count(24, 40, 8, 12, 30, qkv_bias=False)


@pytest.mark.parametrize(
    "cross_layers, first_ca_shared, blocks, first_sa_shared",
    [(1, False, 1, True), (2, False, 3, True), (2, True, 3, False), (3, False, 4, False)],
)
def test_parameter_count_encoder(cross_layers, first_ca_shared, blocks, first_sa_shared):
    enc = make_encoder(
        num_cross_attention_layers=cross_layers, first_cross_attention_layer_shared=first_ca_shared,
        num_self_attention_blocks=blocks, first_self_attention_block_shared=first_sa_shared,
    )  # fmt: skip
    adapter = 6 * 12 + 12
    latents = 5 * 16
    cross_layer = 2 * 16 + 2 * 12 + mha_count(16, 12, 8, 12, 16) + mlp_count(16, 2)
    self_block = 2 * (2 * 16 + mha_count(16, 16, 16, 16, 16) + mlp_count(16, 3))
    distinct_cross = 2 if cross_layers > 1 and not first_ca_shared else 1
    distinct_self = 2 if blocks > 1 and not first_sa_shared else 1
    assert count(enc) == adapter + latents + distinct_cross * cross_layer + distinct_self * self_block


def test_parameter_count_mnist_like_encoder():
    # MNIST-like (PERCEIVER.md): inputs 784 x 131, latents 32 x 128, 1 cross head, P=2, 3 blocks x 3 layers.
    class Identity(InputAdapter):
        def forward(self, x):
            return x

    enc = PerceiverEncoder(
        Identity(131), num_latents=32, num_latent_channels=128, num_cross_attention_heads=1,
        num_cross_attention_layers=2, num_self_attention_heads=8, num_self_attention_layers_per_block=3,
        num_self_attention_blocks=3,
    )  # fmt: skip
    attention = 128 * 128 + 131 * 128 * 2 + 128 * 128 + 3 * 128 + 128  # q, k, v, o weights; q, k, v, o biases
    cross = 2 * 128 + 2 * 131 + attention + (2 * 128 + 2 * 128 * 128 + 256)
    self_layer = 2 * 128 + (4 * 128 * 128 + 4 * 128) + (2 * 128 + 2 * 128 * 128 + 256)
    assert count(enc) == 32 * 128 + 2 * cross + 3 * self_layer


@pytest.mark.parametrize("output_norm, abs_pos_emb", [(False, True), (True, False)])
def test_parameter_count_causal_sequence_model(output_norm, abs_pos_emb):
    cfg = tiny_ar_config(output_norm=output_norm, abs_pos_emb=abs_pos_emb, cross_attention_widening_factor=2)
    c, v, layers = cfg.num_channels, cfg.vocab_size, cfg.num_self_attention_layers
    embeddings = v * c + (cfg.max_seq_len * c if abs_pos_emb else 0)
    cross = 4 * c + mha_count(c, c, c, c, c, qkv_bias=False, out_bias=True) + mlp_count(c, 2, bias=False)
    self_layer = 2 * c + mha_count(c, c, c, c, c, qkv_bias=False, out_bias=False) + mlp_count(c, 4, bias=False)
    expected = embeddings + cross + layers * self_layer + v + (2 * c if output_norm else 0)
    assert count(CausalSequenceModel(cfg)) == expected


# -- structure and semantics ----------------------------------------------------------------------------


@pytest.mark.parametrize("cross_layers, blocks", [(1, 1), (1, 3), (2, 3), (3, 3)])
@pytest.mark.parametrize("first_shared", [False, True])
def test_encoder_order_and_sharing(cross_layers, blocks, first_shared):
    """CA1, SA1, then for i in 1..L-1: a cross-attention if i < P, then a self-attention block."""
    enc = make_encoder(
        num_cross_attention_layers=cross_layers, num_self_attention_blocks=blocks,
        first_cross_attention_layer_shared=first_shared, first_self_attention_block_shared=first_shared,
        shared_block_execution="reuse",
    )  # fmt: skip
    calls = []
    names = {"cross_attn_1": "CA1", "cross_attn_n": "CAn", "self_attn_1": "SA1", "self_attn_n": "SAn"}
    for attr, label in names.items():
        if hasattr(enc, attr):
            getattr(enc, attr).register_forward_hook(lambda *_, label=label: calls.append(label))
    enc(torch.randn(2, 9, 6))
    ca_n = "CA1" if first_shared or cross_layers == 1 else "CAn"
    sa_n = "SA1" if first_shared or blocks == 1 else "SAn"
    expected = ["CA1", "SA1"]
    for i in range(1, blocks):
        expected += ([ca_n] if i < cross_layers else []) + [sa_n]
    assert calls == expected


def test_encoder_validation():
    with pytest.raises(ValueError, match="num_cross_attention_layers"):
        make_encoder(num_cross_attention_layers=3, num_self_attention_blocks=2)
    with pytest.raises(ValueError, match="num_cross_attention_layers"):
        make_encoder(num_cross_attention_layers=0)
    with pytest.raises(ValueError, match="num_qk_channels"):
        make_encoder(num_cross_attention_qk_channels=7)
    with pytest.raises(ValueError, match="backend"):
        make_encoder(backend="fast")


def test_multi_head_attention_matches_perceiver_io_formula():
    """Separate projections, scale Dqk**-0.5, key padding with True = pad, per-head qk/v dims that differ."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(2, 6, 10, num_qk_channels=8, num_v_channels=12, num_output_channels=5, backend="reference")
    x_q, x_kv = torch.randn(3, 4, 6), torch.randn(3, 7, 10)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    q = mha.q_proj(x_q).view(3, 4, 2, 4).transpose(1, 2) * 4**-0.5
    k = mha.k_proj(x_kv).view(3, 7, 2, 4).transpose(1, 2)
    v = mha.v_proj(x_kv).view(3, 7, 2, 6).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)).masked_fill(pad[:, None, None], -torch.finfo(torch.float32).max)
    expected = mha.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 4, 12))
    torch.testing.assert_close(mha(x_q, x_kv, pad_mask=pad), expected)


@pytest.mark.parametrize("blocks, first_shared", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_encoder_modes_give_the_gradients_of_plain_reuse(blocks, first_shared, dropout, monkeypatch):
    """The memory mode ("recompute": every self-attention layer through the executor, every cross-attention
    checkpointed) and activation checkpointing give the outputs and gradients of plain module reuse, the
    default (dropout masks replayed), with two cross-attention layers."""
    chains = []

    def spy(steps, x):
        chains.append(len(steps))
        return run_shared_chain(steps, x)

    monkeypatch.setattr(perceiver_module, "run_shared_chain", spy)
    results = []
    for mode, checkpointing in (("reuse", False), ("recompute", False), ("reuse", True)):
        torch.manual_seed(1)
        model = make_classifier(
            num_self_attention_blocks=blocks, first_self_attention_block_shared=first_shared,
            num_cross_attention_layers=min(2, blocks), shared_block_execution=mode,
            activation_checkpointing=checkpointing, residual_dropout=dropout,
        )  # fmt: skip
        x = torch.randn(3, 9, 6, requires_grad=True)
        pad = torch.zeros(3, 9, dtype=torch.bool)
        pad[0, 6:] = True
        torch.manual_seed(2)
        out = model(x, pad_mask=pad)
        out.pow(2).sum().backward()
        results.append((out, x.grad, {n: p.grad for n, p in model.named_parameters()}))
    # The memory mode runs each chain of blocks between cross-attentions as its layers (2 per block).
    assert chains == ([2] if blocks == 1 else [2, 4])
    (out0, gx0, g0), *others = results
    for out1, gx1, g1 in others:
        torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
        assert g0.keys() == g1.keys()
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_memory_mode_skips_inner_checkpointing():
    """Layers recomputed by the executor are not checkpointed again (that would be a third forward)."""
    model = make_classifier(num_self_attention_blocks=3, activation_checkpointing=True)
    model.encoder.shared_block_execution = "recompute"
    calls = []
    model.encoder.self_attn_1[0].register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 9, 6)).sum().backward()
    assert len(calls) == 2 * 3  # each repetition: the forward, and one recomputation in backward


@pytest.mark.parametrize("mode, checkpointing", [("reuse", False), ("reuse", True), ("recompute", False)])
def test_encoder_step_compiles_in_every_mode(mode, checkpointing):
    """``torch.compile`` of a training step in each way of running the blocks (the memory mode's steps become
    checkpoint regions under the compiler) gives the eager gradients."""
    torch.manual_seed(4)
    model = make_classifier(
        num_self_attention_blocks=2, shared_block_execution=mode, activation_checkpointing=checkpointing
    )
    x = torch.randn(2, 9, 6)

    model(x).pow(2).sum().backward()
    eager = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x).pow(2).sum().backward()
    for p, expected in zip(model.parameters(), eager, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        model = make_classifier(num_self_attention_blocks=2, activation_checkpointing=checkpointing)
        model(torch.randn(2, 9, 6)).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_perceiver_io_triton_matches_reference(device):
    """Triton (the CPU interpreter without a GPU) vs reference: outputs and every gradient, with key padding."""
    torch.manual_seed(4)
    ref = make_classifier("reference", num_self_attention_blocks=2, num_cross_attention_layers=2).to(device)
    tri = make_classifier("triton", num_self_attention_blocks=2, num_cross_attention_layers=2).to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 6, device=device)
    pad = torch.zeros(2, 9, dtype=torch.bool, device=device)
    pad[1, 4:] = True
    outs = []
    for model in (ref, tri):
        out = model(x, pad_mask=pad)
        out.sum().backward()
        outs.append(out)
    assert compare(outs[1], outs[0]).ok

    # One relative error over all gradients: some are exactly zero in exact arithmetic (a key bias
    # shifts every score of a row equally), so a per-tensor relative error would judge rounding noise.
    def all_grads(model):
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert compare(all_grads(tri), all_grads(ref)).ok


def test_attention_dropout_trains_through_the_reference_path():
    model = make_classifier(dropout=0.5)
    x = torch.randn(2, 9, 6)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(5)
    a = model(x)
    torch.manual_seed(5)
    b = model(x)
    torch.testing.assert_close(a, b)  # reproducible from the seed
    assert not torch.allclose(a, model.eval()(x))  # and really dropping


# -- Perceiver AR -------------------------------------------------------------------------------------


def left_padded_prompt(vocab: int, batch: int, length: int, pads: list[int]):
    x = torch.randint(0, vocab, (batch, length))
    pad_mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(pads):
        pad_mask[b, :n] = True
    return x, pad_mask


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kv_cache_decoding_equals_full_forward(backend, device):
    """Every decoded step's logits equal a full forward of the same sequence (float32, 1e-5), while the
    latent window grows and after it is full (the prefix grows), with left padding and rotary."""
    cfg = tiny_ar_config(num_self_attention_rotary_layers=-1 if backend == "reference" else 1)
    model = CausalSequenceModel(cfg, backend=backend).to(device).eval()
    steps = 9 if backend == "reference" else 5
    x, pad_mask = left_padded_prompt(cfg.vocab_size, 3, 7, pads=[0, 2, 5])
    x, pad_mask = x.to(device), pad_mask.to(device)
    prefix_len = 5
    hidden, cache = model.prefill(x, prefix_len, cfg.max_latents, cfg.max_seq_len, pad_mask)
    torch.testing.assert_close(model.logits(hidden), model(x, prefix_len, pad_mask), rtol=1e-5, atol=1e-5)
    seq = x
    slid = False
    for _ in range(steps):
        token = torch.randint(0, cfg.vocab_size, (3, 1), device=device)
        hidden = model.step(token, cache)
        seq = torch.cat([seq, token], dim=1)
        pad_mask = torch.cat([pad_mask, torch.zeros_like(token, dtype=torch.bool)], dim=1)
        if seq.shape[1] - prefix_len > cfg.max_latents:
            prefix_len, slid = prefix_len + 1, True
        assert cache.prefix_len == prefix_len
        full = model(seq, prefix_len, pad_mask)[:, -1:]
        torch.testing.assert_close(model.logits(hidden), full, rtol=1e-5, atol=1e-5)
    assert slid


def test_generate_cache_matches_no_cache_past_max_seq_len():
    cfg = tiny_ar_config(max_seq_len=12, max_latents=4)
    model = CausalSequenceModel(cfg, backend="reference")
    x, pad_mask = left_padded_prompt(cfg.vocab_size, 2, 6, pads=[0, 3])
    cached = model.generate(x, 10, num_latents=2, pad_mask=pad_mask)
    plain = model.generate(x, 10, num_latents=2, pad_mask=pad_mask, use_cache=False)
    assert cached.shape == (2, 16) and torch.equal(cached, plain)
    assert model.training  # generate restores the mode
    g1 = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    sampled = model.generate(x, 8, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, generator=g1)
    again = model.generate(x, 8, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, generator=g2, use_cache=False)
    assert torch.equal(sampled, again)


def test_prefix_dropout_drops_exactly_and_keeps_positions(monkeypatch):
    cfg = tiny_ar_config(cross_attention_dropout=0.5, max_latents=4)
    model = CausalSequenceModel(cfg, backend="reference").train()
    rows = model._kept_prefix_rows(3, 9, torch.device("cpu"))
    assert rows.shape == (3, 9 - 4) and (rows.diff(dim=1) > 0).all() and rows.max() < 9
    kept = torch.tensor([[0, 2, 5, 7, 8]] * 2)
    monkeypatch.setattr(model, "_kept_prefix_rows", lambda *args: kept)
    x = torch.randint(0, cfg.vocab_size, (2, 13))
    out = model(x, prefix_len=9)
    changed = x.clone()
    changed[:, [1, 3, 4, 6]] = (changed[:, [1, 3, 4, 6]] + 1) % cfg.vocab_size  # dropped prefix tokens
    torch.testing.assert_close(model(changed, prefix_len=9), out)
    changed[:, 2] = (changed[:, 2] + 1) % cfg.vocab_size  # a kept one
    assert not torch.allclose(model(changed, prefix_len=9), out)
    # Keeping every row is the plain forward.
    monkeypatch.setattr(model, "_kept_prefix_rows", lambda *args: torch.arange(9).expand(2, -1))
    torch.testing.assert_close(model(x, prefix_len=9), model.eval()(x, prefix_len=9))


def test_ar_validation():
    model = CausalSequenceModel(tiny_ar_config(), backend="reference")
    x = torch.randint(0, 40, (2, 10))
    with pytest.raises(ValueError, match="prefix_len"):
        model(x, prefix_len=10)
    with pytest.raises(ValueError, match="max_latents"):
        model(x, prefix_len=1)
    with pytest.raises(ValueError, match="pad_mask"):
        model(x, pad_mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="eval"):
        model.train().prefill(x, 6, 6, 20)
    with pytest.raises(ValueError, match="num_latents"):
        model.generate(x, 2, num_latents=7)
    for bad, name in ((dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=name):
            model.generate(x, 2, do_sample=True, **bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, -1)


def test_kv_cache_decoding_under_autocast():
    """The cache holds what the projections produce (bfloat16 under autocast); a step under another
    autocast state than the prefill is refused with a clear error."""
    cfg = tiny_ar_config()
    model = CausalSequenceModel(cfg, backend="reference").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, cache = model.prefill(x, 4, cfg.max_latents, cfg.max_seq_len)
        for _ in range(4):  # through the slide
            token = torch.randint(0, cfg.vocab_size, (2, 1))
            hidden = model.step(token, cache)
            x = torch.cat([x, token], dim=1)
        full = model(x, cache.prefix_len)[:, -1:]
        assert cache.cross_k.dtype == torch.bfloat16
        torch.testing.assert_close(model.logits(hidden).float(), full.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="autocast"):
        model.step(token, cache)
