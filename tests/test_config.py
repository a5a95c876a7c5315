"""Presets carry the original code's values (its `general()` base and paper presets; the README's tables)."""

import pytest

from alignprop.truncation import truncation_from_config

SEED_KEYS = (
    "seed logdir run_name num_epochs save_freq num_checkpoint_limit mixed_precision allow_tf32 resume_from "
    "resume_from_2 mixing_coef_1 soup_inference only_eval same_evaluation vis_freq max_vis_images visualize_train "
    "visualize_eval prompt_fn eval_prompt_fn reward_fn debug truncated_backprop truncated_backprop_rand "
    "truncated_backprop_minmax trunc_backprop_timestep grad_checkpoint aesthetic_target grad_scale "
    "sd_guidance_scale steps"
).split()
TRAIN_KEYS = (
    "learning_rate adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm loss_coeff use_8bit_adam "
    "total_samples_per_epoch total_batch_size batch_size_per_gpu_available gradient_accumulation_steps "
    "data_loader_iterations"
).split()


@pytest.mark.parametrize("name", ["aesthetic", "aesthetic_k1", "hps", "hps_k1", "evaluate", "evaluate_soup", "tiny"])
def test_every_preset_keeps_the_original_key_names(preset, name):
    config = preset(name)
    for key in SEED_KEYS:
        assert key in config, key
    for key in TRAIN_KEYS:
        assert key in config.train, key
    assert "model" in config.pretrained and "revision" in config.pretrained


def test_base_values(preset):
    config = preset("hps")  # a paper preset; check the untouched base values through it
    assert config.seed == 42 and config.mixed_precision == "fp16" and config.allow_tf32
    assert (config.train.adam_beta1, config.train.adam_beta2, config.train.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert not config.train.use_8bit_adam
    assert (config.sd_guidance_scale, config.steps, config.eta) == (7.5, 50, 0.0)
    assert config.pretrained.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (config.logdir, config.save_freq, config.num_checkpoint_limit, config.vis_freq) == ("logs", 4, 10, 1)
    assert config.max_vis_images == 2 and config.grad_checkpoint and config.same_evaluation
    assert (config.aesthetic_target, config.grad_scale) == (10, 1)
    assert (config.train.total_samples_per_epoch, config.train.total_batch_size) == (256, 128)
    assert config.train.batch_size_per_gpu_available == 4
    assert (config.lora.rank, tuple(config.lora.target_modules)) == (4, ("to_q", "to_k", "to_v", "to_out.0"))


def test_base_optimizer_defaults(preset):
    config = preset("evaluate")  # evaluate keeps the base optimizer settings
    assert (config.train.learning_rate, config.train.adam_weight_decay, config.train.max_grad_norm) == (3e-4, 1e-4, 1.0)
    assert config.train.loss_coeff == 1.0


@pytest.mark.parametrize(
    "name, reward, prompts, eval_prompts, epochs, strategy",
    [
        ("aesthetic", "aesthetic", "simple_animals", "eval_simple_animals", 7, "per_step_uniform"),
        ("aesthetic_k1", "aesthetic", "simple_animals", "eval_simple_animals", 7, "fixed"),
        ("hps", "hps", "hps_v2_all", "eval_hps_v2_all", 200, "per_step_uniform"),
        ("hps_k1", "hps", "hps_v2_all", "eval_hps_v2_all", 200, "fixed"),
    ],
)
def test_paper_presets(preset, name, reward, prompts, eval_prompts, epochs, strategy):
    config = preset(name)
    assert (config.reward_fn, config.prompt_fn, config.eval_prompt_fn) == (reward, prompts, eval_prompts)
    assert config.num_epochs == epochs and truncation_from_config(config).strategy == strategy
    train = config.train
    assert (train.learning_rate, train.adam_weight_decay, train.max_grad_norm, train.loss_coeff) == (
        1e-3,
        0.1,
        5.0,
        0.01,
    )
    assert tuple(config.truncated_backprop_minmax) == (0, 50)
    if strategy == "fixed":
        assert config.trunc_backprop_timestep == 49 and not config.truncated_backprop_rand
    else:
        assert config.truncated_backprop_rand
    if name.startswith("aesthetic"):
        assert (config.save_freq, config.num_checkpoint_limit, config.max_vis_images) == (1, 14, 4)


def test_evaluation_presets(preset):
    evaluate, soup = preset("evaluate"), preset("evaluate_soup")
    assert evaluate.only_eval and evaluate.max_vis_images == 10 and evaluate.eval_prompt_fn == "eval_simple_animals"
    assert soup.only_eval and soup.soup_inference and soup.prompt_fn == "simple_animals"


def test_unknown_preset_is_refused(preset):
    with pytest.raises(ValueError, match="unknown preset"):
        preset("aesthetics")
