"""The step benchmark runs end to end on the tiny model, so it cannot rot. Timings are never asserted."""

import json

import pytest
import torch

from alignprop import models
from alignprop.conditioning import encode_prompts
from alignprop.reference import reference_sample
from alignprop.sampling import decode, initial_latents, native_precision, sample
from benchmarks import bench_step


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (these small models are overhead-bound, and more threads on shared cores can be
    many times slower); the benchmark sets it too. The session's count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_forward_equivalents_follow_the_documented_convention():
    plan = (False, False, True, True)  # T=4, K=2
    assert bench_step.forward_equivalents(plan, grad_checkpoint=True) == 4 + 3 * 2
    assert bench_step.forward_equivalents(plan, grad_checkpoint=False) == 4 + 2 * 2


def test_run_spec_parses_strategy_batch_and_variants():
    assert bench_step.Run.parse("full@1:ours,reference", 4) == bench_step.Run("full", 1, ("ours", "reference"))
    assert bench_step.Run.parse("fixed:ours", 4) == bench_step.Run("fixed", 4, ("ours",))


def test_benchmark_one_step_on_tiny(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--arch", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "0", "--iters", "1"]
    argv += ["--forward-repeats", "1", "--threads", "1", "--json", str(out)]
    argv += ["--run", "fixed:ours,reference", "--run", "full@1:ours-no-ckpt"]
    report = bench_step.main(argv)

    saved = json.loads(out.read_text())
    rows = saved["results"]
    assert [(r["strategy"], r["batch"], r["variant"]) for r in rows] == [
        ("fixed", 4, "ours"),
        ("fixed", 4, "reference"),
        ("full", 1, "ours-no-ckpt"),
    ]
    assert rows[0]["kept_steps_mean"] == 1 and rows[0]["forward_equivalents"] == 3 + 3
    assert rows[2]["kept_steps_mean"] == 3 and rows[2]["forward_equivalents"] == 3 + 2 * 3
    assert rows[1]["time_vs_reference"] == 1.0 and rows[2]["time_vs_reference"] is None
    for row in rows:
        assert row["finite_loss"] and row["step_ms_median"] > 0 and row["efficiency"] > 0 and row["peak_mib"] > 0
    assert "| fixed | 4 | ours |" in report["table"] and saved["table"] == report["table"]


def test_benchmark_runs_the_optimization_variants(tiny_dir):
    """bf16 autocast on the CPU exercises the native-dtype and channels_last switches end to end."""
    argv = ["--arch", "tiny", "--device", "cpu", "--dtype", "bf16", "--steps", "2", "--warmup", "0", "--iters", "1"]
    argv += ["--forward-repeats", "1", "--threads", "1"]
    argv += ["--run", "fixed:ours-native,ours-channels-last,ours-decode-ckpt"]
    rows = bench_step.main(argv)["results"]
    assert [r["variant"] for r in rows] == ["ours-native", "ours-channels-last", "ours-decode-ckpt"]
    assert all(r["finite_loss"] for r in rows)


# --- the switchable fast paths the benchmark measures must not change what is computed -------------------


@pytest.fixture(scope="module")
def pipeline64(tiny_dir):
    """The tiny pipeline in float64 with a LoRA whose B factors are non-zero (so folding changes weights)."""
    pipeline = models.load_pipeline(str(tiny_dir))
    models.add_lora(pipeline.unet, rank=4, alpha=4, target_modules=bench_step.LORA_TARGETS)
    pipeline.to(torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pipeline.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
    return pipeline


def lora_grads(pipeline, sampler, keep_grad, **options):
    unet = pipeline.unet
    params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    for param in params.values():
        param.grad = None
    conditioning = encode_prompts(pipeline, ["cat", "a red dog"])
    latents = initial_latents(2, unet, pipeline.scheduler, torch.Generator().manual_seed(0)).double()
    final = sampler(unet, pipeline.scheduler, conditioning, latents, keep_grad, 5.0, **options)
    (decode(pipeline.vae, final) - 0.3).square().mean().backward()
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("keep_grad", [(False,) * 5 + (True,), (False, True, False, False, True, False)])
def test_folded_lora_gives_the_reference_gradients(pipeline64, keep_grad):
    expected = lora_grads(pipeline64, reference_sample, keep_grad)
    folded = lora_grads(pipeline64, sample, keep_grad, fold_lora=True)
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(folded[name], grad, rtol=1e-9, atol=1e-12)


def test_folded_lora_inference_matches_and_restores_the_weights(pipeline64):
    unet = pipeline64.unet
    before = {n: (p, p.detach().clone()) for n, p in unet.named_parameters()}
    conditioning = encode_prompts(pipeline64, ["cat"])
    latents = initial_latents(1, unet, pipeline64.scheduler, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        plain = sample(unet, pipeline64.scheduler, conditioning, latents, (False,) * 4, 5.0)
        folded = sample(unet, pipeline64.scheduler, conditioning, latents, (False,) * 4, 5.0, fold_lora=True)
    torch.testing.assert_close(folded, plain, rtol=1e-10, atol=1e-12)
    after = dict(unet.named_parameters())
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value), name
    layers = models.FoldedLoRA(unet).layers
    assert layers and not any(layer.disable_adapters for layer in layers)


def test_native_dtype_turns_autocast_off_only_inside():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with native_precision(True, torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
        with native_precision(False, torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
