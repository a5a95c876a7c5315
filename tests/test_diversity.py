"""Diversity numbers of an evaluation: mean pairwise cosine distances of image embeddings, within and across
prompts, against a naive double loop; what the evaluation writes."""

import json
import math

import pytest
import torch
from checkpoint_runs import read_metrics, run, tiny_config

from alignprop import schema
from alignprop.diversity import ACROSS, WITHIN, diversity, mean_pairwise_cosine_distance
from alignprop.errors import UserError
from alignprop.evaluate import EvalResult
from alignprop.prompts import load_prompts
from alignprop.toyworld.rewards import load_classifier

FAST = {"steps": 4, "truncated_backprop_minmax": (0, 4), "trunc_backprop_timestep": 3}  # 4 DDIM steps


def naive_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def naive_mean_over_pairs(vectors: list[list[float]]) -> float:
    distances = [
        naive_distance(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))
    ]
    return sum(distances) / len(distances)


def test_hand_computed_pairs():
    # (1, 0), (0, 1), (1, 1): distances 1, 1 - 1/sqrt(2), 1 - 1/sqrt(2)
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert mean_pairwise_cosine_distance(embeddings) == pytest.approx((3 - math.sqrt(2)) / 3, abs=1e-12)
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 2.0], [3.0, 6.0]])) == pytest.approx(0, abs=1e-12)


def test_within_and_across_prompts_match_a_double_loop():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(9, 5, generator=generator)
    prompts = ["cat", "dog", "fox"] * 3  # the evaluation set's order: every prompt, then every prompt again
    prompts[8] = "owl"  # one prompt with a single image: not in the within-prompt mean
    rows = embeddings.tolist()
    per_prompt = [
        naive_mean_over_pairs([rows[i] for i in range(9) if prompts[i] == prompt]) for prompt in ("cat", "dog", "fox")
    ]
    numbers = diversity(embeddings, prompts)
    assert numbers[WITHIN] == pytest.approx(sum(per_prompt) / 3, abs=1e-12)
    assert numbers[ACROSS] == pytest.approx(naive_mean_over_pairs(rows), abs=1e-12)


def test_one_image_per_prompt_has_no_within_prompt_number():
    embeddings = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    numbers = diversity(embeddings, ["a", "b", "c", "d"])
    assert WITHIN not in numbers and numbers[ACROSS] == pytest.approx(naive_mean_over_pairs(embeddings.tolist()))
    assert diversity(embeddings[:1], ["a"]) == {}


def test_the_summary_holds_them_only_with_embeddings_and_merging_keeps_their_order():
    embeddings = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    whole = EvalResult(["a", "b", "a", "b"], torch.zeros(4, 3, 2, 2), torch.arange(4.0), {}, embeddings)
    parts = [
        ([0, 2], EvalResult(["a", "a"], torch.zeros(2, 3, 2, 2), torch.tensor([0.0, 2.0]), {}, embeddings[[0, 2]]))
    ]
    parts.append(
        ([1, 3], EvalResult(["b", "b"], torch.zeros(2, 3, 2, 2), torch.tensor([1.0, 3.0]), {}, embeddings[[1, 3]]))
    )
    merged = EvalResult.merge(parts)
    assert torch.equal(merged.embeddings, embeddings)
    assert merged.summary()[WITHIN] == whole.summary()[WITHIN] == diversity(embeddings, whole.prompts)[WITHIN]
    unembedded = EvalResult(whole.prompts, whole.images, whole.rewards, {})
    assert WITHIN not in unembedded.summary() and ACROSS not in unembedded.summary()


def test_a_named_encoder_must_be_one_of_the_runs_rewards(preset):
    config = preset("tiny")
    config.eval_diversity_encoder = "clip_score"
    with pytest.raises(UserError, match="eval_diversity_encoder='clip_score'.*add it to eval_reward_fns"):
        schema.check(config)
    config.eval_diversity_encoder = "toyworld_shape"  # the run's reward
    schema.check(config)
    config.eval_diversity_encoder = "inception"
    with pytest.raises(UserError, match="eval_diversity_encoder must be one of"):
        schema.check(config)


def test_an_evaluation_writes_them_from_its_images(preset, tmp_path):
    """Toy world, 2 images per prompt: the classifier's pooled features of the images (computed here from the returned
    images) give the logged numbers; with 1 image per prompt the within-prompt number is absent; "off" writes none."""
    three = tmp_path / "three.txt"
    three.write_text("\n".join(load_prompts("toyworld_heldout")[:3]) + "\n")
    config = tiny_config(
        preset,
        tmp_path,
        run_name="two",
        only_eval=True,
        resume_from="stablediffusion",
        eval_prompt_fn=str(three),
        eval_images_per_prompt=2,
        **FAST,
    )
    run_dir, result = run(config)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diversity_encoder"] == "toyworld_shape"
    classifier = load_classifier("")  # the shipped one, as the reward loads it
    with torch.no_grad():
        features = classifier.features(result.images.float()).mean(dim=(2, 3)).tolist()
    within = [naive_mean_over_pairs([features[p], features[p + 3]]) for p in range(3)]
    assert summary[WITHIN] == pytest.approx(sum(within) / 3, rel=1e-5)
    assert summary[ACROSS] == pytest.approx(naive_mean_over_pairs(features), rel=1e-5)
    assert 0 < summary[WITHIN] <= 2

    single = config.copy_and_resolve_references()
    single.run_name, single.eval_images_per_prompt = "one", 1
    summary = json.loads((run(single)[0] / "summary.json").read_text())
    assert WITHIN not in summary and ACROSS in summary

    off = config.copy_and_resolve_references()
    off.run_name, off.eval_diversity_encoder = "off", "off"
    summary = json.loads((run(off)[0] / "summary.json").read_text())
    assert summary["diversity_encoder"] is None and WITHIN not in summary and ACROSS not in summary


def test_training_logs_them_at_every_evaluation(preset, tmp_path):
    config = tiny_config(preset, tmp_path, run_name="train", num_epochs=1, vis_freq=1, eval_images_per_prompt=2, **FAST)
    config.train.total_samples_per_epoch = 8  # one update
    evaluations = [record for record in read_metrics(run(config)[0]) if record.get("eval")]
    assert [record["update"] for record in evaluations] == [0, 1]
    assert all(0 < record[WITHIN] <= 2 and 0 < record[ACROSS] <= 2 for record in evaluations)
