"""Multi-process checks of the sharded ops, on any machine: ``spawn`` starts a gloo process group of
``world_size`` CPU processes (``torch.multiprocessing`` spawn, ``file://`` rendezvous), and the ``check_*``
functions run in every rank and raise on a mismatch (spawned processes can only import workers from an
importable module, hence here and not in ``tests/``).

``check_sharded_attention`` is the contract: every rank builds the same global problem from one seed, keeps
its shard, and compares ``sharded_attention``'s output and gradients with ``pk.attention`` on the whole
problem (float64 reference), each rank with its own upstream gradient and the reference with their sum (the
gradient convention of :mod:`perceiver_kernels.distributed.sharded`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn: Callable, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in a gloo group; re-raises the
    first failure (with the rank's traceback)."""
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        mp.start_processes(_entry, args=(fn, world_size, init, args), nprocs=world_size, join=True,
                           start_method="spawn")  # fmt: skip


def _entry(rank: int, fn: Callable, world_size: int, init: str, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # A bounded timeout: a rank that skips a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _split(lengths: list[int], rank: int) -> slice:
    start = sum(lengths[:rank])
    return slice(start, start + lengths[rank])


def check_sharded_attention(rank: int, world_size: int, cases: list[dict]) -> None:
    """Each case: ``lengths`` (keys per rank), ``backend``, ``dtype`` (name), and optionally ``batch``,
    ``q_batch``, ``nq``, ``heads``, ``dqk``, ``dv``, ``causal``, ``padding`` (a list of global key indices padded
    in sample 0), ``rotary_dim``, ``positions`` ("default" or "explicit"), ``kv_index`` (keep every other row),
    ``plan`` (pass ``keys_before``/``keys_after`` from the lengths: no exchange), ``return_lse``, ``seed``."""
    for case in cases:
        _check_sharded_attention(rank, world_size, case)


def _check_sharded_attention(rank: int, world_size: int, case: dict) -> None:
    from ..functional import attention
    from ..testing import compare
    from .sharded import sharded_attention

    lengths = case["lengths"]
    assert len(lengths) == world_size, (lengths, world_size)
    dtype = getattr(torch, case["dtype"])
    batch, heads = case.get("batch", 2), case.get("heads", 2)
    q_batch, nq = case.get("q_batch", batch), case.get("nq", 4)
    dqk, dv, nk = case.get("dqk", 16), case.get("dv", 16), sum(lengths)
    generator = torch.Generator().manual_seed(case.get("seed", 0))

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = rand(q_batch, nq, heads, dqk), rand(batch, nk, heads, dqk), rand(batch, nk, heads, dv)
    grads_out = rand(world_size, batch, nq, heads, dv)
    grads_lse = rand(world_size, batch, heads, nq)
    options, local = {"causal": case.get("causal", False)}, {}
    mine = _split(lengths, rank)
    if "padding" in case:
        mask = torch.zeros(batch, nk, dtype=torch.bool)
        mask[0, case["padding"]] = True
        options["key_padding_mask"], local["key_padding_mask"] = mask, mask[:, mine]
    if case.get("rotary_dim"):
        options["rotary_dim"] = local["rotary_dim"] = case["rotary_dim"]
        if case.get("positions") == "explicit":  # left padding of sample 1 by 3: its positions start at -3
            k_pos = torch.arange(nk).repeat(batch, 1)
            k_pos[1] -= 3
            q_pos = k_pos[:, -nq:] + 1
            options.update(q_positions=q_pos, k_positions=k_pos)
            local.update(q_positions=q_pos, k_positions=k_pos[:, mine])
    if "kv_lengths" in case:  # a right-padded sequence: each rank gets its share of every sample's valid keys
        valid = torch.tensor(case["kv_lengths"])
        options["kv_lengths"], local["kv_lengths"] = valid, (valid - mine.start).clamp(0, lengths[rank])
    if case.get("kv_index"):
        kept = [torch.arange(0, n, 2).expand(batch, -1) for n in lengths]
        local["kv_index"] = kept[rank].contiguous()
        offsets = [sum(lengths[:r]) for r in range(world_size)]
        options["kv_index"] = torch.cat([idx + off for idx, off in zip(kept, offsets, strict=True)], dim=1)

    # The reference: one process, the whole problem, float64, the summed upstream gradients.
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention(*ref_inputs, backend="reference", return_lse=True, **options)
    upstream = [(ref_out, grads_out.sum(0))]
    if case.get("return_lse"):
        upstream.append((ref_lse, grads_lse.sum(0).masked_fill(ref_lse == float("-inf"), 0)))
    torch.autograd.backward([t for t, _ in upstream], [g for _, g in upstream])
    ref_dq, ref_dk, ref_dv = (t.grad for t in ref_inputs)

    if case.get("plan"):
        local.update(keys_before=sum(lengths[:rank]), keys_after=sum(lengths[rank + 1 :]))
    inputs = [t.to(dtype).requires_grad_() for t in (q, k[:, mine], v[:, mine])]
    out, lse = sharded_attention(*inputs, causal=options["causal"], backend=case["backend"], return_lse=True, **local)
    terms = [(out, grads_out[rank].to(dtype))]
    if case.get("return_lse"):
        terms.append((lse, grads_lse[rank].to(lse.dtype).masked_fill(lse == float("-inf"), 0)))
    torch.autograd.backward([t for t, _ in terms], [g for _, g in terms])
    dq = inputs[0].grad.double()
    dist.all_reduce(dq)  # the partials sum to the full dq

    for name, actual, expected in (
        ("out", out, ref_out), ("lse", lse, ref_lse), ("dq (summed)", dq.to(dtype), ref_dq),
        ("dk", inputs[1].grad, ref_dk[:, mine]), ("dv", inputs[2].grad, ref_dv[:, mine]),
    ):  # fmt: skip
        result = compare(actual, expected, dtype=dtype)
        if not result.ok:
            raise AssertionError(f"rank {rank}/{world_size}, {case}: {name} off by {result}")


def check_errors_on_every_rank(rank: int, world_size: int) -> None:
    """Calls that cannot work raise the same error on every rank before any rank enters the merge's collectives
    (one rank raising alone would leave the others waiting forever): a causal layout that needs a shifted
    diagonal, head dims, dtypes or options that differ across ranks, and (under value checks) queries that
    differ across ranks."""
    from ..problem import set_value_checks
    from .sharded import sharded_attention

    def expect(message: str, q_shape=(1, 4, 1, 8), k_len=5, dv=8, dtype=torch.float32, q_seed=0, **options):
        q = torch.randn(q_shape, generator=torch.Generator().manual_seed(q_seed)).to(dtype)
        k, v = torch.randn(1, k_len, 1, q_shape[-1], dtype=dtype), torch.randn(1, k_len, 1, dv, dtype=dtype)
        try:
            sharded_attention(q, k, v, backend="reference", **options)
        except ValueError as error:
            if message not in str(error):
                raise AssertionError(f"rank {rank}: expected {message!r}, got {error}") from error
        else:
            raise AssertionError(f"rank {rank}: no error, expected {message!r}")
        dist.barrier()  # every rank got here: none is stuck in a collective

    last = rank == world_size - 1
    expect("the same Dv", dv=8 + 8 * last)
    expect("the same q dtype", dtype=torch.float64 if last else torch.float32)
    expect("the same Nq", q_shape=(1, 4 + last, 1, 8))
    expect("the same causal", causal=not last, k_len=5)
    expect("the same scale", scale=0.5 if last else None)
    previous = set_value_checks(True)
    try:
        expect("q differs across ranks", q_seed=int(last))
    finally:
        set_value_checks(previous)


class _LinearInput(torch.nn.Module):
    """``(B, M, F) -> (B, M, C)``: the smallest input adapter with parameters (they see only the local shard)."""

    def __init__(self, in_features: int, channels: int):
        super().__init__()
        self.num_input_channels = channels
        self.linear = torch.nn.Linear(in_features, channels)

    def forward(self, x):
        return self.linear(x)


def _model_and_batch(case: dict, batch: int, generator: torch.Generator):
    """The case's model (the same weights on every rank: built under one seed) and a full batch with its loss."""
    from .. import models

    torch.manual_seed(case.get("seed", 0))
    common = dict(activation_checkpointing=case.get("activation_checkpointing", False), backend=case["backend"])
    if case["model"] == "io":
        length = case.get("length", 11)
        encoder = models.PerceiverEncoder(
            _LinearInput(6, 12), num_latents=5, num_latent_channels=16, num_cross_attention_heads=2,
            num_cross_attention_qk_channels=8, num_cross_attention_v_channels=12, num_cross_attention_layers=2,
            num_self_attention_heads=2, num_self_attention_layers_per_block=2, num_self_attention_blocks=3,
            shared_block_execution=case.get("shared_block_execution", "reuse"), **common,
        )  # fmt: skip
        decoder = models.PerceiverDecoder(
            models.ClassificationOutputAdapter(num_classes=7, num_output_query_channels=10),
            models.TrainableQueryProvider(num_queries=1, num_query_channels=10), num_latent_channels=16,
            num_cross_attention_heads=1, **common,
        )  # fmt: skip
        model = models.PerceiverIO(encoder, decoder)
        x = torch.randn(batch, length, 6, generator=generator)
        pad_mask = torch.zeros(batch, length, dtype=torch.bool)
        pad_mask[1, 2 : length - 1] = True  # most of sample 1, whole shards of it at some world sizes
        target = torch.randn(batch, 7, generator=generator)

        def loss(model, rows: slice):
            return (model(x[rows], pad_mask=pad_mask[rows]) * target[rows]).sum(-1).mean()

    else:
        config = models.CausalSequenceModelConfig(
            vocab_size=40, max_seq_len=20, max_latents=6, num_channels=32, num_heads=4, num_self_attention_layers=2,
            cross_attention_dropout=0.0,
        )  # fmt: skip
        model = models.CausalSequenceModel(config, backend=case["backend"])
        length = case.get("length", 15)
        x = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
        pad_mask = torch.zeros(batch, length, dtype=torch.bool)
        pad_mask[1, :4] = True  # left padding: sample 1's positions start at 0 on its fifth token
        target = torch.randint(0, config.vocab_size, (batch, config.max_latents), generator=generator)

        def loss(model, rows: slice):
            logits = model(x[rows], pad_mask=pad_mask[rows])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target[rows].flatten())

    return model, loss


def check_models_data_x_context(rank: int, world_size: int, cases: list[dict]) -> None:
    """Each case trains one step of a Perceiver model on a (data x context) = (2 x world_size/2) mesh, wrapped
    in DDP or FSDP2 over all ranks, and checks every parameter's (averaged) gradient against the same model in
    one process on the full batch and the full sequence.

    ``case``: ``model`` ("io": a PerceiverIO classifier with padding, two cross-attention layers and shared
    self-attention blocks; "ar": a CausalSequenceModel with left padding), ``wrap`` ("ddp", "fsdp",
    "fsdp-bf16": FSDP2 with bfloat16 parameters, float32 gradient reduction, "fsdp-layers": FSDP2 on each
    attention layer and on the model), ``backend``, and optionally
    ``shared_block_execution``, ``activation_checkpointing``, ``length``, ``seed``."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from ..models.layers import CrossAttentionLayer, SelfAttentionLayer
    from ..testing import REORDERED_FP32_RTOL, compare_reordered

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("data", "context"))
    flat = init_device_mesh("cpu", (world_size,))  # FSDP2 shards over every rank
    context_group = mesh["context"].get_group()
    data_rank, local_batch = mesh.get_local_rank("data"), 2
    rows = slice(data_rank * local_batch, (data_rank + 1) * local_batch)
    for case in cases:
        model, loss = _model_and_batch(case, 2 * local_batch, torch.Generator().manual_seed(case.get("seed", 0)))
        reference = copy.deepcopy(model)
        loss(reference, slice(None)).backward()
        expected = {name: p.grad for name, p in reference.named_parameters()}
        # Gradients that are zero in exact arithmetic (a key bias: softmax ignores a shift of all scores) hold
        # rounding noise only: every parameter is judged at no less than 1/1000 of the largest gradient.
        min_scale = 1e-3 * max(g.abs().max().item() for g in expected.values())

        model.context_group = context_group
        if case["wrap"] == "ddp":
            wrapped = DistributedDataParallel(model)
        else:
            policy = MixedPrecisionPolicy()
            if case["wrap"] == "fsdp-bf16":
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if case["wrap"] == "fsdp-layers":  # each attention layer its own FSDP unit, as transformers shard
                for m in model.modules():
                    if isinstance(m, (SelfAttentionLayer, CrossAttentionLayer)):
                        fully_shard(m, mesh=flat, mp_policy=policy)
            wrapped = fully_shard(model, mesh=flat, mp_policy=policy)
        loss(wrapped, rows).backward()
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            rtol = 3e-2 if case["wrap"] == "fsdp-bf16" else REORDERED_FP32_RTOL
            result = compare_reordered(grad, expected[name], rtol, min_scale)
            if not result.ok:
                raise AssertionError(f"rank {rank}/{world_size}, {case}: the gradient of {name} is off by {result}")
        dist.barrier()


def check_compiled_model(rank: int, world_size: int, compile_backend: str = "aot_eager") -> None:
    """``torch.compile(fullgraph=True)`` of a context-parallel CausalSequenceModel step (the merge's collectives
    traced into the graph, no break): logits and every gradient equal the eager step's."""
    from .. import models
    from ..testing import compare_reordered

    torch.manual_seed(0)
    config = models.CausalSequenceModelConfig(
        vocab_size=40, max_seq_len=20, max_latents=6, num_channels=32, num_heads=4, num_self_attention_layers=2,
        cross_attention_dropout=0.0,
    )  # fmt: skip
    model = models.CausalSequenceModel(config, backend="reference", context_group=dist.group.WORLD)
    x = torch.randint(0, config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(1))
    pad_mask = torch.zeros(2, 15, dtype=torch.bool)
    pad_mask[1, :3] = True

    def step(forward):
        model.zero_grad(set_to_none=True)
        logits = forward(x, pad_mask=pad_mask)
        logits.square().mean().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected_logits, expected_grads = step(model)
    logits, grads = step(torch.compile(model, fullgraph=True, backend=compile_backend))
    for name, actual, expected in [("logits", logits, expected_logits)] + [
        (name, grads[name], expected_grads[name]) for name in expected_grads
    ]:
        result = compare_reordered(actual, expected, min_scale=1e-3 * expected_logits.abs().max().item())
        if not result.ok:
            raise AssertionError(f"rank {rank}/{world_size}, compiled ({compile_backend}): {name} off by {result}")
