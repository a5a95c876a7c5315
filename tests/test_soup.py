"""Soup: the original's parameter-wise mix, the exact weight-delta mix, the sweep and its table."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_runs import evaluated_run, read_metrics, run, straight_run, tiny_config

from alignprop import jobs, plot, soup
from alignprop.checkpoint import resolve_weights
from alignprop.errors import UserError
from alignprop.families import family_of
from alignprop.lora import add_lora, save_lora
from alignprop.lora_files import read_lora
from alignprop.models import load_pipeline
from alignprop.presets import load_preset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loras(preset, tmp_path_factory):
    """A = checkpoint_2 and B = checkpoint_1 of the straight run; C = rank 2 on to_q only (another layout)."""
    run_dir = straight_run(preset, tmp_path_factory)
    a = read_lora(run_dir / "checkpoints" / "checkpoint_2")
    b = read_lora(run_dir / "checkpoints" / "checkpoint_1")
    pipeline = load_pipeline(preset("tiny").pretrained.model)
    unet = pipeline.unet
    add_lora(unet, rank=2, alpha=2, target_modules=("to_q",))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    directory = tmp_path_factory.mktemp("other_layout")
    save_lora(family_of(pipeline), directory)
    return {"a": a, "b": b, "c": read_lora(directory), "run_dir": run_dir}


def file_deltas(weights) -> dict[str, torch.Tensor]:
    """dW = alpha/r * up @ down of every module, computed from the file alone."""
    alpha, rank = weights.config_value("lora_alpha"), weights.config_value("r")
    return {
        module: alpha
        / rank
        * weights.tensors[f"unet.{module}.lora.up.weight"]
        @ weights.tensors[f"unet.{module}.lora.down.weight"]
        for module in weights.modules
    }


def combine(*terms):
    """sum of coef * deltas over (coef, deltas) terms, module-wise (modules missing from a term count as 0)."""
    modules = set().union(*(deltas.keys() for _, deltas in terms))
    return {m: sum(coef * deltas[m] for coef, deltas in terms if m in deltas) for m in modules}


def assert_deltas(got, expected):
    nonzero = {m: d for m, d in got.items() if not (isinstance(d, int) or torch.count_nonzero(d) == 0)}
    assert set(nonzero) <= set(expected)
    for module, delta in expected.items():
        assert torch.allclose(got[module], delta, rtol=1e-5, atol=1e-8), module


def soup_deltas(inputs, coefficient):
    unet = load_pipeline(load_preset("tiny").pretrained.model).unet
    mixed = soup.Soup(unet, inputs)
    mixed.set_coefficient(coefficient)
    return soup.effective_deltas(unet)


def test_parameter_mix_endpoints_are_the_inputs_exactly(loras):
    a, b = loras["a"], loras["b"]
    assert all(torch.equal(soup.mix_parameters(a, b, 1.0).tensors[k], a.tensors[k]) for k in a.tensors)
    assert all(torch.equal(soup.mix_parameters(a, b, 0.0).tensors[k], b.tensors[k]) for k in a.tensors)
    assert all(torch.count_nonzero(t) == 0 for t in soup.mix_parameters(a, None, 0.0).tensors.values())


@pytest.mark.parametrize("coefficient", [0.0, 0.3, 1.0])
def test_parameter_mix_scales_both_factors(loras, coefficient):
    """Against the base model, the original's mix gives c^2 * dW_A, not c * dW_A; between two LoRAs the
    endpoints are exactly A and B."""
    a, b = loras["a"], loras["b"]
    got = soup_deltas(soup.SoupInputs(a, None, "params", (coefficient,)), coefficient)
    assert_deltas(got, combine((coefficient**2, file_deltas(a))))
    if coefficient in (0.0, 1.0):
        got = soup_deltas(soup.SoupInputs(a, b, "params", (coefficient,)), coefficient)
        assert_deltas(got, file_deltas(a if coefficient == 1.0 else b))


@pytest.mark.parametrize("partner", ["b", "c", None])
def test_delta_mix_is_linear_in_the_coefficient(loras, partner):
    """W + c*dW_A + (1-c)*dW_B exactly, also for a partner of another rank and targets, or the base model."""
    a, b = loras["a"], None if partner is None else loras[partner]
    for coefficient in (0.0, 0.25, 1.0, 1.5):
        got = soup_deltas(soup.SoupInputs(a, b, "delta", (coefficient,)), coefficient)
        terms = [(coefficient, file_deltas(a))] + ([] if b is None else [(1 - coefficient, file_deltas(b))])
        assert_deltas(got, combine(*terms))


def test_soup_at_coefficient_one_gives_the_evaluate_images(preset, tmp_path_factory, loras):
    from alignprop.evaluate import generate_and_score
    from alignprop.rewards import build_reward
    from alignprop.sampling import sampling_options_from_config

    _, evaluated = evaluated_run(preset, tmp_path_factory)  # checkpoint_2 = A
    config = preset("tiny")
    reward = build_reward(config, torch.device("cpu"), torch.float32)
    for mode in soup.SOUP_MODES:
        pipeline = load_pipeline(config.pretrained.model)
        soup.Soup(pipeline.unet, soup.SoupInputs(loras["a"], loras["b"], mode, (1.0,))).set_coefficient(1.0)
        options = sampling_options_from_config(config)
        images = generate_and_score(family_of(pipeline), reward, evaluated.prompts, options, 4, seed=42).images
        assert torch.allclose(images, evaluated.images, atol=1e-6), mode


def test_sweep_writes_its_table_and_plot(preset, tmp_path_factory, tmp_path, loras):
    _, evaluated = evaluated_run(preset, tmp_path_factory)
    base_eval = read_metrics(loras["run_dir"])[0]  # before training: the LoRA's up factors are zero = base model
    assert base_eval["eval"] and base_eval["update"] == 0
    config = tiny_config(
        preset,
        tmp_path / "logs",
        run_name="sweep",
        soup_inference=True,
        resume_from=str(loras["run_dir"]),
        resume_from_2="base",
        soup_sweep=(1, 0.5, 0),
    )
    run_dir, rows = run(config)
    with (run_dir / "soup.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [float(row["coefficient"]) for row in table] == [1.0, 0.5, 0.0]
    assert {"mode", "reward_mean", "reward_std", "checker_shape_mean", "images"} <= table[0].keys()
    by_coefficient = {row["coefficient"]: row for row in json.loads((run_dir / "soup.json").read_text())["rows"]}
    assert by_coefficient[1.0]["reward_mean"] == pytest.approx(evaluated.summary()["reward_mean"], abs=1e-5)
    assert by_coefficient[0.0]["reward_mean"] == pytest.approx(base_eval["reward_mean"], abs=1e-5)
    assert (run_dir / "soup.png").stat().st_size > 0
    for row in table:
        assert len(list((run_dir / row["images"] / "images").iterdir())) == 30
    # The plot: a tick at each coefficient; the y axis inside the rewards the images took (a probability: 0..1).
    saved = json.loads((run_dir / "soup.json").read_text())
    frame = plot.axes(soup.soup_panel(saved["rows"], saved))
    assert [value for value, _ in frame.x_ticks] == [0.0, 0.5, 1.0]
    assert [label for _, label in frame.x_ticks] == ["0", "0.5", "1"]
    per_image = [image["reward"] for row in table for image in read_summary(run_dir / row["images"])["images"]]
    assert min(per_image) <= frame.y_range[0] < frame.y_range[1] <= max(per_image) <= 1.0
    assert any(row["reward_mean"] + row["reward_std"] > max(per_image) for row in saved["rows"])  # what was cut


def read_summary(directory: Path) -> dict:
    return json.loads((directory / "summary.json").read_text())


def test_plot_axes_keep_to_given_ticks_and_limits():
    """Hand-computed: points 0.2 and 0.9 with std 0.3 span -0.1..1.2, padded by 5% of 1.3 each side; limits (0, 1)
    cut that to 0..1 and the ticks are the given coefficients, else 6 evenly spaced ones over the padded x span."""
    series = plot.Series([0.0, 0.25, 1.0], [0.2, 0.5, 0.9], [0.3, 0.0, 0.3])
    free = plot.axes(plot.Panel("t", "x", "y", [series]))
    assert free.y_range == pytest.approx((-0.1 - 0.065, 1.2 + 0.065))
    assert [value for value, _ in free.x_ticks] == pytest.approx([-0.05 + 1.1 * i / 5 for i in range(6)])
    bounded = plot.axes(plot.Panel("t", "x", "y", [series], x_ticks=[0.0, 0.25, 1.0], y_limits=(0.0, 1.0)))
    assert bounded.y_range == (0.0, 1.0) and bounded.x_ticks == [(0.0, "0"), (0.25, "0.25"), (1.0, "1")]
    assert bounded.y_ticks[0] == (0.0, "0") and bounded.y_ticks[-1] == (1.0, "1")


@pytest.mark.parametrize("word", ["base", "stablediffusion"])
def test_the_base_model_is_named_base_or_the_originals_word(preset, loras, tmp_path, word):
    from alignprop import jobs

    config = tiny_config(preset, tmp_path / "logs", soup_inference=True, resume_from=str(loras["run_dir"]))
    config.resume_from_2 = word
    assert soup.prepare(config).b is None
    config = tiny_config(preset, tmp_path / "logs", only_eval=True, resume_from=word)
    assert jobs.evaluation_weights(config) is None
    assert jobs.prepare(config, num_processes=1).kind == "evaluate" and not (tmp_path / "logs").exists()


def test_parameter_mix_refuses_other_layouts_and_delta_mix_accepts_them(preset, loras, tmp_path):
    config = tiny_config(preset, tmp_path / "logs", soup_inference=True, mixing_coef_1=0.5)
    config.resume_from = str(loras["a"].source.parent)
    config.resume_from_2 = str(loras["c"].source.parent)
    with pytest.raises(UserError, match="LoRA targets differ"):
        jobs.prepare(config, num_processes=1)
    config.soup_mode = "delta"
    assert jobs.prepare(config, num_processes=1).kind == "soup"
    assert not (tmp_path / "logs").exists()


def test_parameter_mix_refuses_another_rank(loras, tmp_path):
    a = loras["a"]
    halved = {k: (v[:2] if k.endswith("down.weight") else v[:, :2]) for k, v in a.tensors.items()}
    other = soup.LoraWeights(halved, a.metadata, tmp_path / "rank2.safetensors")
    with pytest.raises(UserError, match="LoRA ranks differ"):
        soup.check_same_layout(a, other)


@pytest.mark.parametrize("value", ["abc", "0,x", float("nan"), math.inf, True, None])
def test_coefficients_must_be_finite_numbers(preset, value):
    config = preset("evaluate_soup")
    config.soup_sweep = (value,)
    with pytest.raises(UserError, match="soup_sweep"):
        soup.parse_coefficients(config)


def test_coefficient_lists(preset):
    config = preset("evaluate_soup")
    config.mixing_coef_1 = 0.3
    assert soup.parse_coefficients(config) == (0.3,)
    config.soup_sweep = ("0, 0.5,1",)  # what --config.soup_sweep=0,0.5,1 gives
    assert soup.parse_coefficients(config) == (0.0, 0.5, 1.0)
    config.soup_sweep = (1, 0.5, 1)
    assert soup.parse_coefficients(config) == (1.0, 0.5)


def test_command_line_refuses_a_non_numeric_coefficient_in_one_line(tmp_path, loras):
    lora = str(resolve_weights(str(loras["run_dir"])))
    command = [
        sys.executable,
        "main.py",
        "--config",
        "config/align_prop.py:tiny",
        f"--config.logdir={tmp_path / 'logs'}",
        "--config.soup_inference=True",
        f"--config.resume_from={lora}",
        "--config.resume_from_2=stablediffusion",
        "--config.soup_sweep=0,zero",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: soup_sweep='zero' is not a number"]
    assert not (tmp_path / "logs").exists()
