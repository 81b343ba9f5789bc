"""run_shared_chain (the encoder's memory mode) against plain module reuse and activation checkpointing:
outputs, gradients of x and every parameter, one gradient per parameter, memory, dropout masks and RNG
state, frozen parameters, fallbacks, autocast and a float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import perceiver_kernels as pk
from perceiver_kernels.bench.timing import step_memory
from perceiver_kernels.models import shared
from perceiver_kernels.models.shared import recomputing, run_shared_chain

C, HEADS, WIDEN = 16, 2, 2  # Linear weight shapes (16, 16), (32, 16), (16, 32); rows B*N = 10 differ from all


class Block(nn.Module):
    """Pre-LN transformer block: attention on (B, N, H, D) through perceiver_kernels, then an MLP with
    exact GELU and dropout; ``scale`` is a non-Linear parameter (plain-autograd path)."""

    def __init__(self, channels=C, heads=HEADS, widen=WIDEN, dropout=0.0, backend="reference"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.ln1, self.ln2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.q, self.k, self.v, self.o = (nn.Linear(channels, channels) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(channels, widen * channels), nn.Linear(widen * channels, channels)
        self.drop = nn.Dropout(dropout)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(channels))
        with torch.no_grad():  # non-trivial LayerNorm affine parameters
            for ln in (self.ln1, self.ln2):
                ln.weight.add_(0.1 * torch.randn_like(ln.weight))
                ln.bias.add_(0.1 * torch.randn_like(ln.bias))

    def forward(self, x):
        batch, n, channels = x.shape
        h = self.ln1(x)
        q, k, v = (proj(h).view(batch, n, self.heads, channels // self.heads) for proj in (self.q, self.k, self.v))
        x = x + self.o(pk.attention(q, k, v, backend=self.backend).reshape(batch, n, channels))
        h = self.fc2(self.drop(F.gelu(self.fc1(self.ln2(x)))))
        return x + self.scale * h


def plain_chain(steps, x):
    for step in steps:
        x = step(x)
    return x


def chain_params(steps):
    return list(dict.fromkeys(p for s in steps for p in s.parameters()))


def outputs_and_grads(run, steps, x, grad_out):
    """The chain's output and the gradients of x (if it requires grad) and of every parameter that does."""
    out = run(steps, x)
    targets = ([x] if x.requires_grad else []) + [p for p in chain_params(steps) if p.requires_grad]
    return out, torch.autograd.grad(out, targets, grad_out)


def assert_same(actual, expected, rtol=1e-5):
    # The absolute floor is relative to the largest value compared: some entries cancel to ~0 (the key
    # projection's bias has an exactly zero true gradient, softmax being shift invariant), and there both
    # sides are rounding noise.
    scale = max(e.abs().max().item() for e in expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale)


def make_chain(length, first_shared, **block):
    a = Block(**block)
    rest = a if first_shared else Block(**block)
    return [a] + [rest] * (length - 1)


@pytest.mark.parametrize("first_shared", [True, False], ids=["AAAA", "ABBB"])
@pytest.mark.parametrize("length", [1, 2, 4])
def test_matches_plain_reuse(length, first_shared, device):
    steps = [step.to(device) for step in make_chain(length, first_shared)]
    x = torch.randn(2, 5, C, device=device, requires_grad=True)
    grad_out = torch.randn(2, 5, C, device=device)
    out, grads = outputs_and_grads(run_shared_chain, steps, x, grad_out)
    ref_out, ref_grads = outputs_and_grads(plain_chain, steps, x, grad_out)
    assert_same([out, *grads], [ref_out, *ref_grads])


def test_triton_backend(device):
    # Triton's CPU interpreter without a GPU: keep it tiny.
    steps = [step.to(device) for step in make_chain(2, True, backend="triton")]
    x = torch.randn(1, 5, C, device=device, requires_grad=True)
    grad_out = torch.randn(1, 5, C, device=device)
    out, grads = outputs_and_grads(run_shared_chain, steps, x, grad_out)
    ref_out, ref_grads = outputs_and_grads(plain_chain, steps, x, grad_out)
    assert_same([out, *grads], [ref_out, *ref_grads])


def checkpointed_chain(steps, x):
    for step in steps:
        x = checkpoint(step, x, use_reentrant=False)
    return x


@pytest.mark.parametrize("first_shared", [True, False], ids=["AAA", "ABB"])
def test_one_gradient_per_parameter(first_shared):
    """Each parameter receives its gradient once, summed over its repetitions, as under plain reuse (DDP's
    and FSDP2's gradient hooks count on it)."""
    steps = make_chain(3, first_shared)
    x = torch.randn(2, 5, C, requires_grad=True)
    params = chain_params(steps)
    received = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: received.append(id(p)))
    for run in (run_shared_chain, plain_chain):
        received.clear()
        run(steps, x).sum().backward()
        assert sorted(received) == sorted(map(id, params)), run.__name__
        for p in params:
            p.grad = None


def test_memory_is_activation_checkpointings():
    """Between forward and backward the chain keeps what checkpointing each step keeps (the steps' inputs),
    and the step's peak is checkpointing's too; plain reuse keeps far more."""
    steps = make_chain(6, True, widen=4)
    x = torch.randn(4, 32, C, requires_grad=True)
    grad_out = torch.randn(4, 32, C)
    memory = {}
    for run in (run_shared_chain, checkpointed_chain, plain_chain):

        def step(after_forward, run=run):
            out = run(steps, x)
            after_forward()
            out.backward(grad_out)

        step(lambda: None)  # warm-up: the allocations of a first call (none expected on CPU) are not counted
        for p in [x, *chain_params(steps)]:
            p.grad = None
        memory[run.__name__] = step_memory(step, torch.device("cpu"))
    kept, peak = memory["run_shared_chain"]
    assert kept == memory["checkpointed_chain"][0]
    # The one difference: a recomputation here runs its step to the end, where checkpointing stops once it
    # has what backward needs (its "early stop"), so a step's output exists for a moment. When that moment
    # is the peak (this small chain's wide MLP; not the bench's encoders), the peak is higher by at most it.
    assert peak <= memory["checkpointed_chain"][1] + x.nbytes
    assert 4 * kept < memory["plain_chain"][0]


def test_backward_twice_with_retained_graph():
    """The inputs are freed step by step during backward, except when the graph is retained for another."""
    steps = make_chain(3, True)
    x = torch.randn(2, 5, C, requires_grad=True)
    out = run_shared_chain(steps, x)
    first = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def rng_states(device):
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def test_dropout_masks_and_rng_state(device):
    steps = [step.to(device) for step in make_chain(3, False, dropout=0.3)]
    x = torch.randn(2, 5, C, device=device, requires_grad=True)
    grad_out = torch.randn(2, 5, C, device=device)
    torch.manual_seed(7)
    ref_out = plain_chain(steps, x)
    state_after_forward = rng_states(device)
    ref_grads = torch.autograd.grad(ref_out, [x, *chain_params(steps)], grad_out)
    torch.manual_seed(7)
    out = run_shared_chain(steps, x)
    grads = torch.autograd.grad(out, [x, *chain_params(steps)], grad_out)
    after = rng_states(device)  # recomputation consumed nothing
    assert all(torch.equal(a, b) for a, b in zip(after, state_after_forward, strict=True))
    assert_same([out, *grads], [ref_out, *ref_grads])
    assert not torch.equal(run_shared_chain(steps, x), out)  # the masks are really random


def test_frozen_params_and_x_without_grad():
    steps = make_chain(3, False)
    a = steps[0]
    for p in (a.q.weight, a.ln1.bias, a.fc2.bias, a.scale, *steps[1].ln2.parameters()):
        p.requires_grad_(False)
    x = torch.randn(2, 5, C)  # no grad: the first step's input is a constant, its parameters still learn
    grad_out = torch.randn(2, 5, C)
    out, grads = outputs_and_grads(run_shared_chain, steps, x, grad_out)
    ref_out, ref_grads = outputs_and_grads(plain_chain, steps, x, grad_out)
    assert_same([out, *grads], [ref_out, *ref_grads])
    run_shared_chain(steps, x).backward(grad_out)
    assert a.q.weight.grad is None and a.scale.grad is None and steps[1].ln2.weight.grad is None
    assert a.k.weight.grad is not None and a.q.bias.grad is not None


def test_fallback_to_plain_loop(monkeypatch):
    steps = make_chain(2, True)
    x = torch.randn(2, 5, C, requires_grad=True)
    expected = plain_chain(steps, x)

    def refuse(*args):
        raise AssertionError("the autograd Function must not run here")

    monkeypatch.setattr(shared._RecomputedChain, "apply", refuse)
    with torch.no_grad():
        out = run_shared_chain(steps, x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for p in chain_params(steps):
        p.requires_grad_(False)
    torch.testing.assert_close(run_shared_chain(steps, x.detach()), expected.detach(), rtol=0, atol=0)


def test_parameters_restored_after_failing_backward():
    class FailsInRecomputation(nn.Module):
        def forward(self, x):
            if torch.is_grad_enabled():  # only the recomputation in backward runs with grad
                raise RuntimeError("boom")
            return x

    block = Block()
    params = dict(block.named_parameters())
    x = torch.randn(1, 3, C, requires_grad=True)
    out = run_shared_chain([block, FailsInRecomputation(), block], x)
    with pytest.raises(RuntimeError, match="boom"):
        out.sum().backward()
    assert dict(block.named_parameters()) == params  # the stand-ins are gone, the parameters back
    assert not recomputing()


def test_cpu_autocast_bfloat16():
    steps = make_chain(2, True)
    x = torch.randn(2, 5, C, requires_grad=True)
    grad_out = torch.randn(2, 5, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = outputs_and_grads(run_shared_chain, steps, x, grad_out)
        ref_out, ref_grads = outputs_and_grads(plain_chain, steps, x, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # forward is the plain loop
    assert all(g.dtype == torch.float32 for g in grads)
    # Plain reuse sums the repetitions' bfloat16 weight gradients through autocast's cached bfloat16 copy of
    # each weight; the recomputation casts per step: bfloat16 sums in another order.
    assert_same(grads, ref_grads, rtol=2e-2)


def test_gradcheck_float64():
    block = Block(channels=4, heads=2, widen=1).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    params = chain_params([block])
    # gradcheck perturbs the parameters in place, which is what the module reads.
    assert torch.autograd.gradcheck(lambda x, *ps: run_shared_chain([block, block], x), (x, *params))
