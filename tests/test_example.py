"""The Perceiver AR training example learns (20 steps on CPU) and writes with the KV cache."""

import importlib.util
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
