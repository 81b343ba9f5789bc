"""The model-level benchmark entries (perceiver_kernels/bench/models.py): the SDPA variant of the Perceiver AR model
against our reference backend, the suite's rows for model entries (checks, a wrong anchor, the time
budget) and their tables and plots. The full quick pipeline runs in tests/test_cli.py."""

import dataclasses
import json
from typing import ClassVar

import pytest
import torch

import perceiver_kernels.models.perceiver as perceiver_module
from perceiver_kernels.bench import models, report, suite
from perceiver_kernels.bench.models import (
    MODEL_SUITES,
    MODELS,
    PERCEIVER_MODELS,
    QUICK_MODELS,
    ARTrain,
    attention_variant,
    first_step,
)
from perceiver_kernels.bench.shapes import SHAPES
from perceiver_kernels.models import CausalSequenceModel, CausalSequenceModelConfig, MultiHeadAttention
from perceiver_kernels.testing import compare

CPU = torch.device("cpu")
CEILINGS = {"matmul_dtype": "float32", "matmul_tflops": 1.0, "copy_gbps": 1.0}  # not measured: saves a second
TINY = CausalSequenceModelConfig(
    vocab_size=32, max_seq_len=40, max_latents=12, num_channels=32, num_heads=2, num_self_attention_layers=2,
    num_self_attention_rotary_layers=2, cross_attention_dropout=0.5,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ARWithoutTriton(ARTrain):
    """The quick AR entry without the Triton variant (the interpreter's seconds are spent in test_cli)."""

    variants: ClassVar = tuple(v for v in ARTrain.variants if v.name != "triton")


QUICK_SHARED, QUICK_AR = QUICK_MODELS
AR_FAST = ARWithoutTriton(QUICK_AR.name, QUICK_AR.batches, QUICK_AR.config, note=QUICK_AR.note)
RESULT_KEYS = {"shape", "provider", "ours", "mode", "kind", "batch", "status", "ms", "p20_ms", "p80_ms",
               "first_call_s", "peak_mib", "kept_mib", "throughput", "throughput_unit", "loss", "best_other",
               "speedup", "peak_ratio"}  # fmt: skip


def loss_and_grads(model, name, tokens, pad_mask=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same prefix-dropout rows for every variant
    with attention_variant(model, name):
        logits = model(tokens[:, :-1], pad_mask=pad_mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, -logits.shape[1] :].flatten())
        loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("variant", ["sdpa", "triton"])
def test_attention_variants_match_the_reference_model(variant, padded, device):
    """Same weights, tokens and prefix-dropout rows: the loss, the logits and every gradient (judged
    together, as some are zero in exact arithmetic) agree at float32 accuracy (Triton: the CPU
    interpreter without a GPU)."""
    torch.manual_seed(1)
    model = CausalSequenceModel(TINY, backend="reference").to(device).train()
    tokens = torch.randint(0, TINY.vocab_size, (3, TINY.max_seq_len + 1), device=device)
    pad_mask = None
    if padded:  # left padding inside the prefix: every latent still sees a key
        pad_mask = torch.zeros(3, TINY.max_seq_len, dtype=torch.bool, device=device)
        pad_mask[1, :5] = pad_mask[2, :17] = True
    ref_loss, ref_logits, ref_grads = loss_and_grads(model, "reference", tokens, pad_mask)
    loss, logits, grads = loss_and_grads(model, variant, tokens, pad_mask)
    assert compare(loss, ref_loss).ok and compare(logits, ref_logits).ok
    assert compare(
        torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in ref_grads.values()])
    ).ok


def top_left_causal(monkeypatch):
    """The classic SDPA mistake: a top-left aligned causal mask (``is_causal=True``) for latents that are
    the *last* queries; the cross-attention's latents then miss most of the prefix."""
    import torch.nn.attention.bias as bias

    monkeypatch.setattr(bias, "causal_lower_right", bias.causal_upper_left)


def test_a_wrong_sdpa_variant_is_visible_in_the_check(monkeypatch):
    """What the suite's check relies on: a wrong mask moves the logits and gradients well past the
    float32 agreement limit (1e-3), where the right one stays at ~1e-7."""
    model = CausalSequenceModel(TINY, backend="reference").train()
    tokens = torch.randint(0, TINY.vocab_size, (2, TINY.max_seq_len + 1))
    _, ref_logits, ref_grads = loss_and_grads(model, "reference", tokens)
    top_left_causal(monkeypatch)
    _, logits, grads = loss_and_grads(model, "sdpa", tokens)
    assert suite.relative_difference(logits, ref_logits) > 3e-2
    assert models.relative_l2(list(grads.values()), list(ref_grads.values())) > 3e-2


def test_attention_variant_is_restored_even_on_error():
    model = CausalSequenceModel(TINY, backend="reference")
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    with pytest.raises(RuntimeError, match="boom"), attention_variant(model, "sdpa"):
        assert all("attend" in m.__dict__ for m in attentions)
        raise RuntimeError("boom")
    assert all("attend" not in m.__dict__ and m.backend == "reference" for m in attentions)
    with attention_variant(model, "triton"):
        assert {m.backend for m in attentions} == {"triton"}
    assert {m.backend for m in attentions} == {"reference"}


def test_entries_and_their_configurations():
    assert [m.name for m in MODEL_SUITES["perceiver"]] == ["shared-blocks", "model-ar-train"]
    assert [m.name for m in MODEL_SUITES["quick"]] == ["quick-shared-blocks", "quick-model-ar-train"]
    assert [m.name for m in MODEL_SUITES["blocks"]] == ["medium-shared-blocks"]
    assert not set(MODELS) & set(SHAPES)  # one namespace with the attention shapes
    shared, ar = PERCEIVER_MODELS
    assert (shared.num_latents, shared.num_latent_channels, shared.num_heads) == (512, 1024, 8)
    assert (shared.layers_per_block, shared.blocks, shared.batches) == (6, (2, 4, 8), (1, 4, 16))
    assert "4096 x 261 input (real model: 50176)" in shared.describe()
    assert [v.name for v in shared.ordered_variants()] == ["reuse", "checkpointing", "recompute"]
    assert shared.variant("recompute").rival == "checkpointing" and shared.as_dict()["rivals"] == {
        "recompute": "checkpointing"
    }
    assert shared.sizes()[:4] == [{"blocks": 2, "batch": 1}, {"blocks": 2, "batch": 4}, {"blocks": 2, "batch": 16},
                                  {"blocks": 4, "batch": 1}]  # fmt: skip
    medium = MODEL_SUITES["blocks"][0]
    assert (medium.num_latents, medium.num_latent_channels, medium.layers_per_block) == (128, 256, 4)
    assert (medium.blocks, medium.batches, medium.backend) == ((2, 4, 8), (1, 4, 16), "reference")
    c = ar.config
    assert (c.vocab_size, c.max_seq_len, c.max_latents, c.num_channels, c.num_heads) == (262, 4096, 512, 512, 8)
    assert (c.num_self_attention_layers, c.cross_attention_dropout, ar.batches) == (8, 0.5, (24,))
    record = json.loads(json.dumps(ar.as_dict()))  # what bench.json keeps
    assert record["kind"] == "model" and record["anchor"] == "reference" and record["ours"] == ["triton"]
    assert set(record["variants"]) == {"triton", "reference", "sdpa"} and record["config"]["max_latents"] == 512


def test_a_step_checks_dropout_rows_and_gradients():
    """Every variant's first step draws the same prefix-dropout rows (seeded), and fills every gradient."""
    model = QUICK_AR.build(CPU, torch.float32, {"batch": 2})
    size = {"batch": 2}
    checks = [first_step(QUICK_AR.step(model, QUICK_AR.variant("reference"), size, CPU), CPU)[0] for _ in range(2)]
    assert checks[0].loss == checks[1].loss and torch.equal(checks[0].output, checks[1].output)
    assert all(g is not None for g in checks[0].grads)
    assert models.relative_l2(checks[0].grads, checks[1].grads) == 0.0


def test_live_bytes_follows_storages_until_freed():
    """timing.LiveBytes (the CPU memory figures): fresh storages count until freed, an ``out=`` tensor at its
    resized size, views and in-place results of tensors from before not at all."""
    from perceiver_kernels.bench.timing import LiveBytes

    before = torch.zeros(256)  # 1 KiB, allocated before the mode
    with LiveBytes() as live:
        a = torch.ones(1024)  # 4 KiB
        view, _ = before[:128], before.add_(1)
        out = torch.empty(0)
        torch.mul(a, 2, out=out)  # resized to 4 KiB
        assert live.live == 8192
        del a, out
        b = torch.ones(512)  # 2 KiB
        assert live.live == 2048 and live.peak == 8192
    del b, view
    assert live.live == 0


def test_cpu_timing_interleaves_the_variants():
    """On CPU the variants of a size are timed in turns, so that a slow spell falls on all of them."""
    calls = []
    steps = [models.Step(lambda name=name: calls.append(name), params=[], units=1) for name in "abc"]
    timings = models.interleaved_quantiles(steps)
    assert len(timings) == 3 and all(p20 <= median <= p80 for median, p20, p80 in timings)
    assert len(calls) >= 3 * models.CPU_MIN_REPS and calls[:6] == list("abcabc")


def run_models(monkeypatch, tmp_path, entries, **kwargs):
    monkeypatch.setattr(suite, "device_ceilings", lambda device, dtype: CEILINGS)
    return suite.run_suite(
        [], [], ["fwd", "fwd+bwd"], CPU, torch.float32, "quick", tmp_path, progress=False, models=entries, **kwargs
    )


def test_model_rows(monkeypatch, tmp_path):
    results = run_models(monkeypatch, tmp_path, [QUICK_SHARED, AR_FAST])
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {(r["shape"], r["provider"], r["batch"]): r for r in results["rows"]}
    assert list(rows) == [
        ("quick-shared-blocks", "reuse", 1),  # the anchor first, at every size
        ("quick-shared-blocks", "checkpointing", 1),
        ("quick-shared-blocks", "recompute", 1),
        ("quick-shared-blocks", "reuse", 2),
        ("quick-shared-blocks", "checkpointing", 2),
        ("quick-shared-blocks", "recompute", 2),
        ("quick-model-ar-train", "reference", 2),
        ("quick-model-ar-train", "sdpa", 2),
    ]
    for r in rows.values():
        assert r["status"] == "ok" and RESULT_KEYS <= set(r), r
        assert r["kind"] == "model" and r["mode"] == "fwd+bwd"
        if r["provider"] != "sdpa":  # under the CPU tracker (a dispatch mode) SDPA's CausalBias cannot be made
            assert 0 < r["kept_mib"] < r["peak_mib"]  # measured on CPU too (timing.LiveBytes)
        assert r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["first_call_s"] > 0
        if r.get("anchor"):
            assert "agrees" not in r
        else:
            assert r["agrees"] and r["max_rel_diff"] < 1e-4 and r["grad_rel_diff"] < 1e-4 and r["checked_against"]
    shared = rows[("quick-shared-blocks", "recompute", 2)]
    assert shared["blocks"] == 2 and shared["rival"] == "checkpointing"
    assert shared["ours"] and shared["best_other"] == "checkpointing" and shared["speedup"] > 0  # its rival
    reuse, checkpointing = rows[("quick-shared-blocks", "reuse", 2)], rows[("quick-shared-blocks", "checkpointing", 2)]
    assert shared["kept_mib"] == checkpointing["kept_mib"] < reuse["kept_mib"]  # exact: bytes of storage
    assert shared["peak_ratio"] == pytest.approx(shared["peak_mib"] / checkpointing["peak_mib"])
    assert shared["throughput"] == pytest.approx(2 / shared["ms"] * 1e3) and shared["throughput_unit"] == "samples/s"
    assert shared["loss"] is None
    ar = rows[("quick-model-ar-train", "sdpa", 2)]
    assert ar["throughput"] == pytest.approx(2 * 16 / ar["ms"] * 1e3) and ar["throughput_unit"] == "latent tok/s"
    assert ar["loss"] == pytest.approx(rows[("quick-model-ar-train", "reference", 2)]["loss"], rel=1e-5)
    assert ar["loss_rel_diff"] < 1e-5 and "loss_rel_diff" not in shared
    records = {s["name"]: s for s in results["shapes"]}
    assert records["quick-shared-blocks"]["anchor"] == "reuse" and records["quick-shared-blocks"]["batches"]

    text = report.text_report(results)
    assert "== quick-shared-blocks: PerceiverEncoder 16 latents x 64 ch" in text
    assert "== quick-model-ar-train: CausalSequenceModel" in text and "latent tok/s" in text
    assert "recompute (ours)" in text and "reuse *" in text and "L2 B2" in text
    md = report.markdown_summary(results)
    assert md.count("| quick-shared-blocks |") == 6 and md.count("| quick-model-ar-train |") == 2
    names = sorted(p.name for p in report.write_outputs(results, tmp_path))
    assert names == ["bench.md", "bench.txt", "model-quick-model-ar-train.png", "model-quick-shared-blocks.png"]


def test_wrong_variants_are_flagged(monkeypatch, tmp_path):
    """An anchor that disagrees is ``wrong`` (and never the best other); ours disagreeing is an ``error``."""
    top_left_causal(monkeypatch)
    run_chain = perceiver_module.run_shared_chain
    monkeypatch.setattr(perceiver_module, "run_shared_chain", lambda steps, x: run_chain(steps[:-1], x))
    entry = dataclasses.replace(QUICK_SHARED, batches=(1,))
    rows = {(r["shape"], r["provider"]): r for r in run_models(monkeypatch, tmp_path, [entry, AR_FAST])["rows"]}
    wrong = rows[("quick-model-ar-train", "sdpa")]
    assert wrong["status"] == "wrong" and not wrong["agrees"] and "differs from reference" in wrong["reason"]
    assert rows[("quick-model-ar-train", "reference")]["best_other"] == "reference"  # not the wrong one
    error = rows[("quick-shared-blocks", "recompute")]
    assert error["status"] == "error" and "differs from reuse" in error["reason"]


def test_time_budget_skips_model_rows(monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(type(QUICK_SHARED), "build", lambda *args: built.append(args))
    results = run_models(monkeypatch, tmp_path, [QUICK_SHARED], time_budget_s=0.0)
    assert len(results["rows"]) == 6 and not built  # nothing is built once the budget is spent
    assert all(r["status"] == "skipped" and r["reason"] == "time budget spent" for r in results["rows"])
    assert "skipped (time budget spent)" in report.text_report(results)


def test_only_forward_runs_no_model_row(monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "device_ceilings", lambda device, dtype: CEILINGS)
    results = suite.run_suite([], [], ["fwd"], CPU, torch.float32, "quick", None, progress=False, models=[AR_FAST])
    assert results["rows"] == [] and results["shapes"][0]["name"] == "quick-model-ar-train"


def gpu_like_results():
    """What a GPU run's model rows look like, next to one attention row."""
    rows = [{"shape": "s", "provider": "triton", "ours": True, "mode": "fwd", "status": "ok", "ms": 1.0,
             "tflops": 1.0, "p20_ms": 0.9, "p80_ms": 1.1}]  # fmt: skip
    measured = {  # batch: (ms, peak MiB) of reuse, checkpointing, recompute
        1: ((10, 900), (13, 300), (12, 300)),
        4: ((40, 3600), (46, 1100), (44, 1000)),
    }
    for batch, cells in measured.items():
        for (provider, ours), (ms, mib) in zip((("reuse", False), ("checkpointing", False), ("recompute", True)), cells,
                                               strict=True):  # fmt: skip
            rows.append({
                "shape": "shared-blocks", "provider": provider, "ours": ours, "mode": "fwd+bwd", "kind": "model",
                "blocks": 8, "batch": batch, "status": "ok", "ms": ms, "p20_ms": ms, "p80_ms": ms, "first_call_s": 1.0,
                "peak_mib": mib, "kept_mib": mib / 3, "throughput": batch / ms * 1e3, "throughput_unit": "samples/s",
                "loss": None, **({"rival": "checkpointing"} if ours else {}),
            })  # fmt: skip
    rows.append({"shape": "shared-blocks", "provider": "recompute", "ours": True, "mode": "fwd+bwd", "kind": "model",
                 "blocks": 8, "batch": 16, "status": "n/a", "reason": "out of device memory",
                 "rival": "checkpointing"})  # fmt: skip
    return {
        "schema": 1, "suite": "perceiver", "timestamp": "2026-11-26T00:00:00Z", "dtype": "bfloat16",
        "versions": {"torch": "x", "triton": "y"}, "git": {"sha": "abc"},
        "device": {"type": "cuda", "name": "Test GPU", "matmul_dtype": "bfloat16", "matmul_tflops": 500.0,
                   "copy_gbps": 3000.0},
        "shapes": [{"name": "s", "description": "B1 H1 8x8 D8", "flops": {"fwd": 1e9}},
                   {**PERCEIVER_MODELS[0].as_dict()}],
        "rows": rows,
    }  # fmt: skip


def test_model_report_with_peak_memory(tmp_path):
    results = gpu_like_results()
    report.add_speedups(results)
    by_key = {(r["shape"], r["provider"], r.get("batch")): r for r in results["rows"]}
    shared = by_key[("shared-blocks", "recompute", 4)]
    assert shared["best_other"] == "checkpointing"  # its rival, not the fastest other (reuse); per size
    assert shared["speedup"] == pytest.approx(46 / 44) and shared["peak_ratio"] == pytest.approx(1000 / 1100)
    checkpointing = by_key[("shared-blocks", "checkpointing", 4)]
    assert checkpointing["best_other"] == "reuse" and checkpointing["peak_ratio"] == pytest.approx(1100 / 3600)
    assert by_key[("shared-blocks", "reuse", 1)]["peak_ratio"] == pytest.approx(1.0)
    assert by_key[("s", "triton", None)]["speedup"] is None and "peak_ratio" not in by_key[("s", "triton", None)]
    assert by_key[("shared-blocks", "recompute", 16)]["speedup"] is None
    text = report.text_report(results)
    assert "0.91" in text and "1.05x" in text and "n/a (out of device memory)" in text and "L8 B4" in text
    md = report.markdown_summary(results)
    assert md.splitlines()[2].startswith("| s | fwd | triton |")  # the attention table is unchanged
    assert (
        "| shared-blocks | L8 B4 | recompute (ours) | 44.000 | 90.9 samples/s | 333.3 | 1000.0 | checkpointing "
        "| 1.05x | 0.91 |" in md
    )
    names = {p.name for p in report.write_outputs(results, tmp_path)}
    assert names == {"bench.txt", "bench.md", "shape-s.png", "summary.png", "model-shared-blocks.png"}
    assert (tmp_path / "model-shared-blocks.png").stat().st_size > 1000


def test_cli_selects_model_entries(monkeypatch, capsys):
    monkeypatch.setattr(suite.signal, "signal", lambda *args: None)  # run_cli's SIGTERM handler: not in pytest
    args = type("Args", (), dict(device="cpu", suite=None, shapes=["quick-shared-blocks", "nope"], providers=None,
                                 mode="both", dtype=None, out=None, time_budget=None, progress=False))  # fmt: skip
    assert suite.run_cli(args) == 2
    assert "--shapes nope not in the 'quick' suite" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(suite, "run_suite", lambda shapes, *a, models=(), **k: seen.update(shapes=shapes,
                        models=models) or {"rows": []})  # fmt: skip
    monkeypatch.setattr(report, "text_report", lambda results: "")
    args.shapes = ["quick-shared-blocks", "quick-cross"]
    assert suite.run_cli(args) == 0
    assert [s.name for s in seen["shapes"]] == ["quick-cross"] and [m.name for m in seen["models"]] == [
        "quick-shared-blocks"
    ]
