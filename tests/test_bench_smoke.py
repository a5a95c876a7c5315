"""The step benchmark runs end to end on the tiny model, so it cannot rot. Timings are never asserted."""

import json
import re
import shlex
from pathlib import Path

import pytest

from benchmarks import bench_step


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
    argv += ["--forward-repeats", "1", "--threads", "1", "--json", str(out), "--peak-tflops", "0.001"]
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
    # FLOP limit: fe forwards of the batch's FLOPs at the given peak; the tiny CFG forward is a few MFLOP
    assert 0 < rows[0]["unet_forward_tflop"] < 1e-3 and rows[0]["flop_efficiency"] > 0
    assert rows[0]["flop_limit_ms"] == pytest.approx(1000 * 6 * rows[0]["unet_forward_tflop"] / 0.001)


def gpu_script_commands() -> list[list[str]]:
    """The bench_step argument lists of benchmarks/gpu_sd15.sh (its `bench` array plus each call's arguments)."""
    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sd15.sh").read_text()
    text = text.replace("\\\n", " ")
    base = shlex.split(re.search(r"bench=\((.*?)\)", text, re.S).group(1))[3:]  # after python3 -m benchmarks.bench_step
    calls = re.findall(r'"\$\{bench\[@\]\}"(.*?)--json', text)
    return [base + shlex.split(call) for call in calls]


def test_the_gpu_script_names_only_known_variants_and_valid_arguments():
    """The device window is too short to find a typo there: every bench call of gpu_sd15.sh parses here."""
    commands = gpu_script_commands()
    assert len(commands) >= 4
    for argv in commands:
        args = bench_step.parse_args(argv)
        for run in bench_step.runs_from_args(args):
            assert set(run.variants) <= set(bench_step.VARIANTS), run
            assert run.strategy in bench_step.STRATEGIES


def test_benchmark_runs_the_optimization_variants(tiny_dir):
    """bf16 autocast on the CPU exercises the native-dtype and channels_last switches end to end."""
    argv = ["--arch", "tiny", "--device", "cpu", "--dtype", "bf16", "--steps", "2", "--warmup", "0", "--iters", "1"]
    argv += ["--forward-repeats", "1", "--threads", "1"]
    argv += ["--run", "fixed:ours-native,ours-channels-last,ours-decode-ckpt"]
    rows = bench_step.main(argv)["results"]
    assert [r["variant"] for r in rows] == ["ours-native", "ours-channels-last", "ours-decode-ckpt"]
    assert all(r["finite_loss"] for r in rows)


@pytest.mark.parametrize("case", ["tiny_sdxl_lora", "tiny_sd3_full", "tiny_flux_lora", "tiny_flux_24gb"])
def test_whole_update_benchmark_runs_each_kind_of_case_on_the_cpu(case):
    """bench_update drives the real Trainer: a full case trains every weight, a LoRA case only the adapter."""
    from benchmarks import bench_update

    result = bench_update.main(["--case", case, "--device", "cpu", "--warmup", "0", "--iters", "1"])
    assert result["seconds_per_update"] > 0 and result["peak_gib"] > 0
    assert result["finetune"] == ("full" if case.endswith("full") else "lora")
    assert (result["trainable_parameters"] == result["denoiser_parameters"]) == case.endswith("full")
    assert (result["quantized_denoiser_layers"] > 0) == case.endswith("24gb"), "the one-GPU preset's int8 base"


def test_the_gpu_scale_script_names_existing_cases():
    from benchmarks import bench_update

    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_scale.sh").read_text()
    named = re.findall(r"^case_run (\S+) (\d+)(?: --memory-cap-gb 24)?$", text, re.M)
    cases = ["flux_24gb", "sd35_full_512", "flux_lora_512_k1", "sdxl_24gb", "sdxl_lora_1024_k1"]
    assert [name for name, _ in named] == cases
    assert re.findall(r"^case_run (\S+) \d+ --memory-cap-gb 24$", text, re.M) == ["flux_24gb", "sdxl_24gb"]
    assert all(name in bench_update.CASES for name, _ in named)
    assert sum(int(limit) for _, limit in named) <= 480  # under 8 minutes of runs


def test_the_readme_gpu_update_table_is_the_measured_results():
    """README's table of whole updates on the H200 is what update_table renders from the committed JSON results."""
    from benchmarks import update_table

    root = Path(__file__).resolve().parent.parent
    results = sorted((root / "benchmarks" / "results").glob("h200-update_*.json"))
    results.append(root / "benchmarks" / "results" / "h200-check-cudnn-off_sdxl_lora_1024_k1.json")
    assert len(results) == 6
    readme = (root / "README.md").read_text()
    assert update_table.table(results) in readme, "README: rerun python -m benchmarks.update_table (its command)"
    one_gpu = [path for path in results if path.name.startswith(("h200-update_sdxl", "h200-update_flux"))]
    assert len(one_gpu) == 4 and update_table.table(one_gpu) in readme, "the 24 GB section's measured rows"
