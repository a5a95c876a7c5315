"""eval_seeding="per_prompt": image i of prompt p starts from noise seeded with seed + p + i x P (FlowBP's protocol),
the same in every run and for any number of processes."""

import json

import numpy as np
import pytest
import torch
from checkpoint_runs import run, tiny_config
from PIL import Image
from test_distributed import torchrun

from alignprop import schema
from alignprop.errors import UserError
from alignprop.evaluate import evaluation_latents
from alignprop.families import family_of
from alignprop.models import load_pipeline
from alignprop.prompts import load_prompts

PROMPTS = load_prompts("toyworld_heldout")[:3]
FAST = {"steps": 4, "truncated_backprop_minmax": (0, 4), "trunc_backprop_timestep": 3}  # 4 DDIM steps
FAST_ARGS = ["--config.steps=4", "--config.truncated_backprop_minmax=(0,4)", "--config.trunc_backprop_timestep=3"]


@pytest.fixture(scope="module")
def toy_model(preset):
    return family_of(load_pipeline(preset("tiny").pretrained.model))


def noise_of(model, seed: int) -> torch.Tensor:
    """One latent drawn by hand: torch.randn in the model's latent shape from a CPU generator seeded `seed`."""
    return torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(seed))


def test_each_image_gets_flowbps_seed_whatever_the_subset(toy_model):
    prompt_count, images_per_prompt = 3, 2  # the "all" set: every prompt once, then every prompt again
    count = prompt_count * images_per_prompt
    every = evaluation_latents(count, list(range(count)), toy_model, 42, "per_prompt")
    for entry in range(count):
        prompt, image = entry % prompt_count, entry // prompt_count
        assert torch.equal(every[entry], noise_of(toy_model, 42 + prompt + image * prompt_count)[0])
    # One process's share (every second entry) gets the same latents as the whole set.
    assert torch.equal(evaluation_latents(count, [1, 3, 5], toy_model, 42, "per_prompt"), every[[1, 3, 5]])
    assert not torch.equal(every[0], every[1]), "two prompts must get different noise"
    # "sequential" (the default) stays one generator's draw for the whole set.
    sequential = evaluation_latents(count, list(range(count)), toy_model, 42, "sequential")
    one_draw = torch.randn(toy_model.latent_shape(count), generator=torch.Generator().manual_seed(42))
    assert torch.equal(sequential, one_draw)
    assert torch.equal(sequential[0], every[0]) and not torch.equal(sequential[1], every[1])


def test_per_prompt_seeding_needs_the_files_prompts(preset):
    config = preset("tiny")
    config.eval_seeding = "per_prompt"
    schema.check(config)
    config.eval_prompts = "original"
    with pytest.raises(UserError, match="per_prompt.*eval_prompts='all'"):
        schema.check(config)
    config.eval_prompts, config.eval_seeding = "all", "per_image"
    with pytest.raises(UserError, match="eval_seeding must be one of"):
        schema.check(config)


def evaluation_config(preset, logdir, **overrides):
    """The base toy model evaluated with per_prompt seeding on PROMPTS, one image at a time (batches of 1 make the
    same float operations whatever the process count)."""
    config = tiny_config(
        preset, logdir, only_eval=True, resume_from="stablediffusion", eval_seeding="per_prompt", **FAST, **overrides
    )
    config.train.batch_size_per_gpu_available = 1
    return config


def pixels(run_dir, seed: int = 42) -> dict[str, np.ndarray]:
    """prompt -> the saved image's pixels, from summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_seeding"] == "per_prompt" and summary["seed"] == seed
    return {entry["prompt"]: np.asarray(Image.open(run_dir / entry["file"])) for entry in summary["images"]}


def test_a_prompt_gets_the_same_image_in_every_run_and_on_two_processes(preset, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    one = pixels(run(evaluation_config(preset, tmp_path / "one", run_name="one", eval_prompt_fn=str(prompt_file)))[0])
    # Another run: prompt 1 alone, seed 43 = 42 + 1: the noise prompt 1 got above.
    alone = tmp_path / "alone.txt"
    alone.write_text(PROMPTS[1] + "\n")
    config = evaluation_config(preset, tmp_path / "alone", run_name="alone", eval_prompt_fn=str(alone), seed=43)
    again = pixels(run(config)[0], seed=43)
    torchrun(
        2,
        "main.py",
        "--config",
        "config/align_prop.py:tiny",
        f"--config.logdir={tmp_path / 'two'}",
        "--config.run_name=two",
        "--config.only_eval=True",
        "--config.resume_from=stablediffusion",
        "--config.eval_seeding=per_prompt",
        f"--config.eval_prompt_fn={prompt_file}",
        "--config.train.batch_size_per_gpu_available=1",
        *FAST_ARGS,
    )
    two = pixels(tmp_path / "two" / "two")
    assert list(one) == list(two) == PROMPTS
    for prompt in PROMPTS:  # process 0 drew prompts 0 and 2, process 1 prompt 1
        assert np.array_equal(one[prompt], two[prompt]), prompt
    assert np.array_equal(one[PROMPTS[1]], again[PROMPTS[1]])  # "sequential" would give latent 1 of seed 42's draw
    assert not np.array_equal(one[PROMPTS[0]], one[PROMPTS[1]])
