"""Train a tiny Perceiver AR language model on a few KB of text, then let it write.

    python examples/train_perceiver_ar.py                      # 300 steps on CPU, about a minute
    python examples/train_perceiver_ar.py --steps 1000 --device cuda --backend triton

Bytes are the tokens (vocabulary 256). Every step samples random windows of ``seq_len + 1`` bytes:
the first ``seq_len`` are the input, the last ``num_latents`` positions are the latents, and each
latent predicts the byte after it. Training uses prefix dropout (``cross_attention_dropout``), so
only part of the prefix is attended to; generation uses the KV cache.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from perceiver_kernels.models import CausalSequenceModel, CausalSequenceModelConfig

TEXT = Path(__file__).parent / "data" / "perceiver_notes.txt"


def model_config(seq_len: int, num_latents: int) -> CausalSequenceModelConfig:
    return CausalSequenceModelConfig(
        vocab_size=256, max_seq_len=seq_len, max_latents=num_latents, num_channels=64, num_heads=4,
        num_self_attention_layers=2, num_self_attention_rotary_layers=1, cross_attention_dropout=0.5,
    )  # fmt: skip


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
) -> tuple[CausalSequenceModel, list[float]]:
    """Train and return the model and the loss (nats per byte) of every step."""
    torch.manual_seed(seed)
    data = torch.tensor(list(TEXT.read_bytes()), dtype=torch.long)
    model = CausalSequenceModel(model_config(seq_len, num_latents), backend=backend).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    prefix_len = seq_len - num_latents
    losses = []
    started = time.perf_counter()
    windows = batches(data, batch_size, seq_len, torch.Generator().manual_seed(seed))
    for step in range(steps):
        window = next(windows).to(device)
        logits = model(window[:, :-1], prefix_len=prefix_len)  # (B, num_latents, 256)
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, prefix_len + 1 :].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - started:.1f} s)")
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
    args = parser.parse_args(argv)
    model, losses = train(args.steps, args.batch_size, device=args.device, backend=args.backend)
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} nats/byte")
    print("---")
    print(write(model, args.prompt, 200, args.device))


if __name__ == "__main__":
    main()
