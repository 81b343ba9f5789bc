"""Shared by the pk.patch tests (tests/test_patch_*.py): run a model forward and backward, compare two
runs, patch-compare-unpatch, and the small models they build.

Every model is a tiny, randomly initialised one built from its config (no downloads), on the test
device (a GPU when there is one). "reference" runs our PyTorch reference, "triton" the Triton kernels
(in the CPU interpreter without a GPU).
"""

import torch
from torch import Tensor, nn

from perceiver_kernels.integrations import PatchReport, patch, patch_status, unpatch

# float32 throughout. The reference backend differs from the models' own einsum/matmul code only in
# summation order; the Triton kernels accumulate in tiles.
TOLERANCES = {"reference": dict(rtol=1e-5, atol=1e-5), "triton": dict(rtol=1e-4, atol=1e-4)}
BACKENDS = list(TOLERANCES)


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


def small_perceiver(perceiver_pytorch, device, **overrides):
    settings = dict(
        num_freq_bands=2, depth=2, max_freq=4.0, input_channels=3, input_axis=2, num_latents=8, latent_dim=32,
        cross_heads=1, latent_heads=2, cross_dim_head=16, latent_dim_head=16, num_classes=5,
    )  # fmt: skip
    settings.update(overrides)
    return perceiver_pytorch.Perceiver(**settings).to(device).eval()
