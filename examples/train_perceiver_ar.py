"""Train a tiny Perceiver AR language model on a few KB of text, then let it write.

    python examples/train_perceiver_ar.py                      # 300 steps on CPU, about a minute
    python examples/train_perceiver_ar.py --steps 1000 --device cuda --backend triton
    torchrun --nproc-per-node 2 examples/train_perceiver_ar.py --context-parallel 2 --device cpu

With ``--context-parallel N`` under torchrun (world size W, a multiple of N), the ranks form a
(W / N data) x (N context) mesh: every sequence is split over N ranks (the latents on the last one), each
rank projects and attends only its part of the prefix, and the model is wrapped in DDP over all W ranks,
each data replica taking its slice of every batch. Without prefix dropout the losses are those of the
single-process run with the same seed; prefix dropout is then drawn per shard (the same rate).

Bytes are the tokens (vocabulary 256). Every step samples random windows of ``seq_len + 1`` bytes:
the first ``seq_len`` are the input, the last ``num_latents`` positions are the latents, and each
latent predicts the byte after it. Training uses prefix dropout (``cross_attention_dropout``), so
only part of the prefix is attended to; generation uses the KV cache.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from perceiver_kernels.models import CausalSequenceModel, CausalSequenceModelConfig

TEXT = Path(__file__).parent / "data" / "perceiver_notes.txt"


def model_config(seq_len: int, num_latents: int, prefix_dropout: float = 0.5) -> CausalSequenceModelConfig:
    return CausalSequenceModelConfig(
        vocab_size=256, max_seq_len=seq_len, max_latents=num_latents, num_channels=64, num_heads=4,
        num_self_attention_layers=2, num_self_attention_rotary_layers=1, cross_attention_dropout=prefix_dropout,
    )  # fmt: skip


def context_parallel_mesh(context_parallel: int, device: str):
    """The (data x context) groups of a torchrun launch: ``(data_group, data_rank, data_size, context_group)``."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    world = dist.get_world_size()
    if world % context_parallel:
        raise SystemExit(f"--context-parallel {context_parallel} must divide the world size {world}")
    if device.startswith("cuda"):
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    mesh = init_device_mesh(device.split(":")[0], (world // context_parallel, context_parallel),
                            mesh_dim_names=("data", "context"))  # fmt: skip
    data = mesh["data"]
    return data.get_group(), data.get_local_rank(), data.size(), mesh["context"].get_group()


def batches(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless ``(B, seq_len + 1)`` windows at random offsets."""
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])


def train(
    steps: int = 300,
    batch_size: int = 16,
    seq_len: int = 96,
    num_latents: int = 32,
    lr: float = 3e-3,
    device: str = "cpu",
    backend: str = "auto",
    seed: int = 0,
    log_every: int = 25,
    prefix_dropout: float = 0.5,
    context_parallel: int = 0,
) -> tuple[CausalSequenceModel, list[float]]:
    """Train and return the model and the loss (nats per byte, over the whole batch) of every step.
    ``context_parallel``: N > 0 to run as one rank of a torchrun launch (see the module docstring)."""
    torch.manual_seed(seed)  # the same weights (and dropout masks) on every rank
    data = torch.tensor(list(TEXT.read_bytes()), dtype=torch.long)
    model = CausalSequenceModel(model_config(seq_len, num_latents, prefix_dropout), backend=backend)
    model = model.to(device).train()
    trained, rows, data_group = model, slice(None), None
    if context_parallel:
        data_group, data_rank, data_size, model.context_group = context_parallel_mesh(context_parallel, device)
        if batch_size % data_size:
            raise SystemExit(f"--batch-size {batch_size} must be a multiple of the data-parallel size {data_size}")
        share = batch_size // data_size
        rows = slice(data_rank * share, (data_rank + 1) * share)
        trained = torch.nn.parallel.DistributedDataParallel(model)  # averages over all ranks: exact
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    prefix_len = seq_len - num_latents
    losses = []
    started = time.perf_counter()
    windows = batches(data, batch_size, seq_len, torch.Generator().manual_seed(seed))
    for step in range(steps):
        window = next(windows)[rows].to(device)  # every rank draws the whole batch and keeps its slice
        logits = trained(window[:, :-1], prefix_len=prefix_len)  # (B, num_latents, 256)
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, prefix_len + 1 :].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        whole = loss.detach()
        if data_group is not None:  # the loss over the whole batch: the mean of the replicas' (equal) slices
            dist.all_reduce(whole, group=data_group)
            whole = whole / dist.get_world_size(data_group)
        losses.append(whole.item())
        lead = data_group is None or dist.get_rank() == 0
        if lead and log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.3f}  ({time.perf_counter() - started:.1f} s)")
    model.context_group = None  # generation runs whole on one rank
    return model, losses


def write(model: CausalSequenceModel, prompt: str, num_bytes: int, device: str = "cpu") -> str:
    """Sample ``num_bytes`` bytes after ``prompt`` (top-k sampling with the KV cache)."""
    x = torch.tensor([list(prompt.encode())], dtype=torch.long, device=device)
    out = model.generate(
        x, num_bytes, num_latents=min(x.shape[1], model.config.max_latents), do_sample=True, temperature=0.8,
        top_k=10, generator=torch.Generator(device).manual_seed(0),
    )  # fmt: skip
    return bytes(out[0].tolist()).decode(errors="replace")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="pk.attention backend: auto, triton, reference")
    parser.add_argument("--prompt", default="The river ")
    parser.add_argument("--prefix-dropout", type=float, default=0.5, help="cross_attention_dropout")
    parser.add_argument("--context-parallel", type=int, default=0, metavar="N",
                        help="split every sequence over N ranks (run under torchrun)")  # fmt: skip
    parser.add_argument("--save-losses", metavar="JSON", help="write the loss of every step here (rank 0)")
    args = parser.parse_args(argv)
    model, losses = train(
        args.steps, args.batch_size, device=args.device, backend=args.backend, prefix_dropout=args.prefix_dropout,
        context_parallel=args.context_parallel,
    )  # fmt: skip
    lead = not dist.is_initialized() or dist.get_rank() == 0
    if dist.is_initialized():
        dist.destroy_process_group()
    if not lead:
        return
    if args.save_losses:
        Path(args.save_losses).write_text(json.dumps(losses))
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} nats/byte")
    print("---")
    print(write(model, args.prompt, 200, args.device))


if __name__ == "__main__":
    main()
