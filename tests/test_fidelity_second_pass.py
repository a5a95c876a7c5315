"""The paper presets against the original code, second pass (issue 29): each test compares with a transcription of the
original's lines (mihirp1998/AlignProp @ 7f4503f, cited per test).

1. training noise: after an evaluation the training stream is reseeded and advanced past the evaluation's draw;
2. the evaluation prompts are the very list the original's main process drew;
3. blank lines of prompt files are empty prompts, drawn where the original drew them;
4. the save schedule's epochs;
5. the logged standard deviations (`rewards_std`, `eval_rewards_std`).
"""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from small_runs import make_trainer, small_config

from alignprop import checkpoint
from alignprop.evaluate import evaluation_prompts, original_prompt_draw
from alignprop.lora_files import LORA_FILE_NAME
from alignprop.prompts import ASSETS, configured_prompts, load_prompts
from alignprop.sampling import seeded_latents

# The switches the paper presets turn on to behave as the original code (README: differences from the original code).
PAPER_SWITCHES = ("eval_prompts", "blank_prompts", "original_training_noise", "save_schedule")
PAPER_PRESETS = ("aesthetic", "aesthetic_k1", "hps", "hps_k1", "evaluate", "evaluate_soup")


def original_lines(file_name: str) -> list[str]:
    """The original's `_load_lines` (7f4503f, prompts.py, lines 22-23) on the shipped copy of its file."""
    with open(ASSETS / file_name) as f:
        return [line.strip() for line in f.readlines()]


def original_random_choices(seed: int, lines: list[str], count: int) -> list[str]:
    """`random.seed(seed)` (accelerate's set_seed, main.py line 200) then `random.choice` `count` times (main.py lines
    383-385, prompts.py line 28), on Python's global generator, restored afterwards."""
    saved = random.getstate()
    try:
        random.seed(seed)
        return [random.choice(lines) for _ in range(count)]
    finally:
        random.setstate(saved)


def unbiased_std(values: list[float]) -> float:
    """torch's default `.std()` (Bessel's correction), by hand."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_the_paper_presets_switch_on_the_original_behaviour(preset):
    for name in PAPER_PRESETS:
        config = preset(name)
        assert [config[key] for key in PAPER_SWITCHES] == ["original", "keep", True, "original"], name
    for name in ("tiny", "hps_sdxl", "hps_sd35", "hps_flux"):  # elsewhere: fresh noise, no blank prompts, periodic
        config = preset(name)
        assert (config.blank_prompts, config.original_training_noise, config.save_schedule) == (
            "skip",
            False,
            "periodic",
        ), name


# --- one small run of the tiny preset with the paper presets' switches on ------------------------------------------


@pytest.fixture(scope="module")
def paper_run(preset, tmp_path_factory):
    """2 epochs x 2 updates x 2 micro-batches of 2 samples, an evaluation of 2 x 2 drawn prompts after every update,
    save_freq 2; records every micro-batch's latents and rewards."""
    tmp = tmp_path_factory.mktemp("paper_run")
    switches = {key: preset("hps")[key] for key in PAPER_SWITCHES}
    config = small_config(
        preset,
        tmp,
        **switches,
        vis_freq=1,
        max_vis_images=2,
        save_freq=2,
        **{"train.total_samples_per_epoch": 8, "train.total_batch_size": 4},
    )
    trainer = make_trainer(config)
    drawn, rewards = [], []
    draw, sample_and_score = trainer.draw_micro_batch, trainer.sample_and_score

    def recording_draw():
        batch = draw()
        drawn.append(batch.latents.clone())
        return batch

    def recording_score(batch):
        out = sample_and_score(batch)
        rewards.append(out.result.reward.detach().float().tolist())
        return out

    trainer.draw_micro_batch, trainer.sample_and_score = recording_draw, recording_score
    trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, trainer, drawn, rewards, records


def test_training_noise_continues_after_the_evaluations_draw(paper_run):
    """main.py lines 538-540: `torch.cuda.manual_seed(seed)` reseeds the default generator (and returns None, the
    `generator=`), the evaluation's latents are drawn from it, then the next update's training latents (line 442)."""
    config, _, drawn, _, _ = paper_run
    micro_batches = 2  # per update
    assert len(drawn) == 4 * micro_batches
    shape = drawn[0].shape
    evaluation_count = config.train.batch_size_per_gpu_available * config.max_vis_images
    generator = torch.Generator().manual_seed(config.seed)
    evaluation = torch.randn((evaluation_count, *shape[1:]), generator=generator)
    expected = [torch.randn(shape, generator=generator) for _ in range(micro_batches)]
    update_2 = drawn[micro_batches : 2 * micro_batches]
    for mine, theirs in zip(update_2, expected):
        assert torch.equal(mine, theirs)
    training_rows = torch.cat(update_2)
    assert not any(torch.equal(row, eval_row) for row in training_rows for eval_row in evaluation)
    assert all(torch.equal(a, b) for a, b in zip(drawn[2 * micro_batches :], update_2 * 2))  # every later update
    assert not torch.equal(drawn[0], update_2[0])  # update 1: before any evaluation in the loop


def test_without_same_evaluation_the_stream_is_advanced_but_not_reseeded(paper_run):
    """main.py lines 541-542: with same_evaluation off the evaluation drew from the default generator unseeded; the
    training stream still continues after that draw."""
    config, trainer, drawn, _, _ = paper_run
    count = config.train.batch_size_per_gpu_available * config.max_vis_images
    before = trainer.random.latents.get_state()
    transcription = torch.Generator()
    transcription.set_state(before)
    torch.randn((count, *drawn[0].shape[1:]), generator=transcription)
    config.same_evaluation = False
    try:
        trainer.reseed_training_noise()
    finally:
        config.same_evaluation = True
    assert torch.equal(trainer.random.latents.get_state(), transcription.get_state())


def test_the_evaluation_draws_from_a_cpu_generator_seeded_with_seed(paper_run):
    """The evaluation draw the noise test transcribes (a CPU one: the original's CUDA fp16 draws cannot be
    reproduced)."""
    config, trainer, drawn, _, _ = paper_run

    count = config.train.batch_size_per_gpu_available * config.max_vis_images
    expected = torch.randn((count, *drawn[0].shape[1:]), generator=torch.Generator().manual_seed(config.seed))
    assert torch.equal(seeded_latents(count, trainer.model, config.seed), expected)


@pytest.mark.parametrize(
    # The original's config (7f4503f, config/align_prop.py): eval_prompt_fn, or prompt_fn where it is '' (main.py
    # lines 346-349); batch_size_per_gpu_available 4 (set_config_batch) x max_vis_images.
    "name, file_name, count",
    [
        ("aesthetic", "eval_simple_animals.txt", 4 * 4),  # lines 110, 116, 126
        ("hps", "hps_v2_all_eval.txt", 4 * 2),  # lines 160, 175; general()'s max_vis_images 2 (line 16)
        ("evaluate", "eval_simple_animals.txt", 4 * 10),  # lines 228, 231-232
        ("evaluate_soup", "simple_animals.txt", 4 * 10),  # lines 211, 214, 221
    ],
)
def test_evaluation_prompts_are_the_original_main_process_list(preset, name, file_name, count):
    config = preset(name)
    expected = original_random_choices(config.seed + 0, original_lines(file_name), count)  # process 0: seed + 0
    assert evaluation_prompts(config) == expected
    lines = configured_prompts(config, config.eval_prompt_fn)
    other_process = original_random_choices(config.seed + 1, original_lines(file_name), count)
    assert original_prompt_draw(lines, config.seed, count, process_index=1) == other_process != expected


def test_blank_lines_are_the_originals_empty_prompts(preset):
    lines = original_lines("hps_v2_all.txt")
    config = preset("hps")
    assert configured_prompts(config, config.prompt_fn) == lines
    assert lines.count("") == 2 and len(lines) == 752
    assert load_prompts("hps_v2_all") == [line for line in lines if line]  # the default elsewhere: skipped


def test_blank_prompts_are_drawn_where_the_original_draws_them(preset, tmp_path):
    """Training draws `random.choice` over the lines as the original's prompt_fn did (main.py lines 449-451): the
    same generator state gives "" exactly where the original's list has its blank lines."""
    config = small_config(
        preset, tmp_path, blank_prompts="keep", prompt_fn="hps_v2_all", **{"train.batch_size_per_gpu_available": 2}
    )
    trainer = make_trainer(config)
    state = trainer.random.prompts.getstate()
    drawn = [prompt for _ in range(1000) for prompt in trainer.draw_micro_batch().prompts]
    original = random.Random()
    original.setstate(state)
    lines = original_lines("hps_v2_all.txt")
    expected = [original.choice(lines) for _ in range(len(drawn))]
    assert drawn == expected
    assert "" in drawn  # 2000 draws, 2 blank lines of 752: the case under test occurs


@pytest.mark.parametrize(
    "name, save_freq, num_epochs, first_epoch",
    [("hps", None, None, 0), ("aesthetic", None, None, 0), ("hps", 3, 10, 0), ("hps", 4, 200, 5), ("hps", 2, 4, 0)],
)
def test_the_save_schedule_is_the_originals(preset, name, save_freq, num_epochs, first_epoch):
    """main.py lines 435 and 601: after the epoch of 0-based index e when e % save_freq == 0."""
    config = preset(name)
    config.save_freq = save_freq or config.save_freq
    config.num_epochs = num_epochs or config.num_epochs
    original = [e + 1 for e in range(first_epoch, config.num_epochs) if e % config.save_freq == 0]
    assert checkpoint.saved_epochs(config, first_epoch) == original
    if name == "hps" and save_freq is None:
        assert original[-1] == 197 and len(original) == 50  # never the last 3 epochs
        config.save_schedule = "periodic"
        assert checkpoint.saved_epochs(config) == list(range(4, 201, 4))


def test_the_last_checkpoint_and_the_final_lora_are_found(paper_run):
    """save_freq 2 over 2 epochs, the original's schedule: checkpoint_1 only; resume_from=RUN finds it, and the final
    weights are written."""
    _, trainer, _, _, _ = paper_run
    saved = sorted(path.name for path in (trainer.run_dir / checkpoint.CHECKPOINTS_DIR).iterdir())
    assert saved == ["checkpoint_1"]
    assert checkpoint.resolve(str(trainer.run_dir)).epoch == 1
    assert (trainer.run_dir / "lora" / LORA_FILE_NAME).is_file()


def test_the_logged_standard_deviations_are_the_originals(paper_run):
    """rewards_std: mean over the update's micro-batches of `rewards.std()` (main.py lines 509-510, 519, 570);
    eval_rewards_std: `eval_rewards.std()` (lines 548-550, 574). Both unbiased; reward_std stays the population std
    over all samples."""
    _, trainer, _, rewards, records = paper_run
    updates = [record for record in records if "loss" in record]
    assert len(updates) == 4
    for index, record in enumerate(updates):
        micro_batches = rewards[2 * index : 2 * index + 2]
        expected = sum(unbiased_std(batch) for batch in micro_batches) / len(micro_batches)
        assert record["rewards_std"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        every = [value for batch in micro_batches for value in batch]
        population = unbiased_std(every) * math.sqrt((len(every) - 1) / len(every))
        assert record["reward_std"] == pytest.approx(population, rel=1e-5, abs=1e-7)
    evaluations = [record for record in records if record.get("eval")]
    assert len(evaluations) == 5  # before the first update and after each
    for record in evaluations:
        summary = json.loads(
            Path(trainer.run_dir / "eval" / f"update_{record['update']:06d}" / "summary.json").read_text()
        )
        values = [image["reward"] for image in summary["images"]]
        assert len(values) == 4
        assert record["eval_rewards_std"] == pytest.approx(unbiased_std(values), rel=1e-5, abs=1e-7)
        assert summary["eval_rewards_std"] == record["eval_rewards_std"]
