"""The Perceiver AR training example learns (20 steps on CPU) and writes with the KV cache, and its
context-parallel launch (torchrun, 2 CPU processes) trains with the single-process losses."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_perceiver_ar.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_perceiver_ar", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_example_loss_falls_and_it_writes():
    example = load_example()
    model, losses = example.train(steps=20, backend="reference", log_every=0)
    assert len(losses) == 20
    # Uniform guessing over 256 bytes costs ln 256 = 5.55 nats; 20 steps learn the byte frequencies.
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    text = example.write(model.eval(), "The ", 12)
    assert text.startswith("The ") and len(text.encode(errors="replace")) >= 12


def test_context_parallel_training_has_the_single_process_losses(tmp_path):
    """The README's launch: torchrun, 2 CPU processes (gloo), every sequence split over both. Without prefix
    dropout (which is drawn per shard) every step's loss is the single-process run's with the same seed."""
    steps, saved = 4, tmp_path / "losses.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
        "--context-parallel", "2", "--device", "cpu", "--backend", "reference", "--prefix-dropout", "0",
        "--steps", str(steps), "--save-losses", str(saved),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    _, expected = load_example().train(steps=steps, backend="reference", prefix_dropout=0.0, log_every=0)
    losses = json.loads(saved.read_text())
    assert len(losses) == steps
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, expected, strict=True)), (losses, expected)
