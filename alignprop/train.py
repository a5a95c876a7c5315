"""The AlignProp training loop: sample with gradient, decode, score, backpropagate into LoRA.

Read top to bottom: `train` sets up, then for every epoch runs `updates_per_epoch` optimizer updates,
each accumulating gradients over `gradient_accumulation_steps` forward passes (micro-batches).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from alignprop import models
from alignprop.batching import BatchPlan
from alignprop.conditioning import encode_prompts
from alignprop.evaluate import EvalResult, generate_and_score, save_grid
from alignprop.prompts import load_prompts
from alignprop.rewards import build_reward
from alignprop.rundir import MetricsLog
from alignprop.runtime import make_accelerator
from alignprop.sampling import decode, initial_latents, sample, truncation_from_config


@dataclass
class RandomStreams:
    """Every random draw of training comes from these, seeded from (seed, process index)."""

    prompts: random.Random
    latents: torch.Generator
    plans: torch.Generator

    @classmethod
    def seeded(cls, seed: int, process_index: int) -> RandomStreams:
        base = seed * 1_000_003 + process_index * 7_919
        return cls(
            prompts=random.Random(base),
            latents=torch.Generator().manual_seed(base + 1),
            plans=torch.Generator().manual_seed(base + 2),
        )


def make_optimizer(train_config, params):
    if train_config.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=train_config.learning_rate,
        betas=(train_config.adam_beta1, train_config.adam_beta2),
        weight_decay=train_config.adam_weight_decay,
        eps=train_config.adam_epsilon,
    )


def average_gradients(params, accelerator) -> None:
    """Mean of the LoRA gradients over processes, in one collective (the UNet is not DDP-wrapped:
    DDP does not support tens of checkpointed forward calls per backward)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for param, chunk in zip(params, flat.split([p.numel() for p in params])):
        param.grad = chunk.view_as(param).clone()


class Trainer:
    def __init__(self, config, plan: BatchPlan, run_dir: Path):
        self.config, self.plan, self.run_dir = config, plan, run_dir
        self.accelerator = accelerator = make_accelerator(config, run_dir)
        self.device = accelerator.device
        self.dtype = models.inference_dtype(config.mixed_precision)

        self.pipeline = models.load_pipeline(config.pretrained.model, config.pretrained.revision, self.dtype)
        self.pipeline.to(self.device)
        self.unet = self.pipeline.unet
        self.params = models.add_lora(self.unet, config.lora.rank, config.lora.alpha, config.lora.target_modules)
        self.optimizer = accelerator.prepare(make_optimizer(config.train, self.params))
        self.reward = build_reward(config, self.device, self.dtype)
        self.prompts = load_prompts(config.prompt_fn)
        self.eval_prompts = load_prompts(config.eval_prompt_fn)
        self.truncation = truncation_from_config(config)
        self.random = RandomStreams.seeded(config.seed, accelerator.process_index)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.update = 0
        if accelerator.is_main_process and config.tracker != "none":
            accelerator.init_trackers("alignprop", config=json.loads(config.to_json_best_effort()))

    # --- one forward pass -------------------------------------------------------------------------

    def forward(self) -> dict:
        """Sample one micro-batch with the truncation plan, score it; returns the loss and what to log."""
        config, batch_size = self.config, self.plan.batch_size
        prompts = [self.random.prompts.choice(self.prompts) for _ in range(batch_size)]
        latents = initial_latents(batch_size, self.unet, self.pipeline.scheduler, self.random.latents, self.device)
        keep_grad = self.truncation.plan(self.random.plans)
        with self.accelerator.autocast():
            final = sample(
                self.unet,
                self.pipeline.scheduler,
                encode_prompts(self.pipeline, prompts),
                latents,
                keep_grad,
                config.sd_guidance_scale,
                eta=config.eta,
                grad_checkpoint=config.grad_checkpoint,
                generator=self.random.latents,
            )
            images = decode(self.pipeline.vae, final, grad_checkpoint=config.decode_checkpoint)
            result = self.reward.score(images, prompts)
        loss = result.loss.float().mean() * config.train.loss_coeff
        return {"loss": loss, "result": result, "kept_steps": [i for i, keep in enumerate(keep_grad) if keep]}

    # --- one optimizer update ---------------------------------------------------------------------

    def train_update(self) -> dict:
        started = time.perf_counter()
        accumulation = self.plan.gradient_accumulation_steps
        rewards, losses, kept_steps, extras = [], [], [], {}
        for _ in range(accumulation):
            out = self.forward()
            loss = out["loss"] / accumulation
            if loss.requires_grad:  # False only when the plan kept no step: nothing to learn from
                self.accelerator.backward(loss)
            rewards.append(out["result"].reward.detach().float())
            losses.append(out["loss"].detach())
            kept_steps.append(out["kept_steps"])
            for name, values in out["result"].metrics.items():
                extras.setdefault(name, []).append(values.float().to(self.device))
        average_gradients(self.params, self.accelerator)
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update += 1

        rewards = self.accelerator.gather(torch.cat(rewards).to(self.device))
        record = {
            "update": self.update,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(unbiased=False).item(),
            "loss": self.accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item(),
            "grad_norm": float(grad_norm),
            "lr": self.optimizer.param_groups[0]["lr"],
            "kept_steps": kept_steps,
            "seconds": time.perf_counter() - started,
        }
        for name, values in extras.items():
            record[f"{name}_mean"] = self.accelerator.gather(torch.cat(values)).mean().item()
        return record

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self) -> EvalResult:
        """Score the eval prompts on fixed latents; each process does a share, all get the result."""
        rank, count = self.accelerator.process_index, self.accelerator.num_processes
        indices = list(range(len(self.eval_prompts)))[rank::count]
        mine = generate_and_score(
            self.pipeline,
            self.unet,
            self.reward,
            self.eval_prompts,
            self.config,
            self.plan.batch_size,
            seed=self.config.seed,
            indices=indices,
        )
        parts = gather_object([(indices, mine)])
        return EvalResult.merge(parts)

    # --- the run ----------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.metrics.write(record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=self.update)

    def run(self) -> tuple[EvalResult, EvalResult]:
        config, plan, main = self.config, self.plan, self.accelerator.is_main_process
        before = self.evaluate()
        self.log({"update": 0, "eval": True, **before.summary()})
        total = config.num_epochs * plan.updates_per_epoch
        with tqdm(total=total, desc="updates", disable=not main) as progress:
            for epoch in range(config.num_epochs):
                for _ in range(plan.updates_per_epoch):
                    record = self.train_update()
                    self.log({"epoch": epoch, **record})
                    progress.set_postfix(reward=f"{record['reward_mean']:.4g}")
                    progress.update()
        after = self.evaluate()
        self.log({"update": self.update, "eval": True, **after.summary()})
        if main:
            models.save_lora(self.accelerator.unwrap_model(self.unet), self.run_dir / "lora")
            save_grid([("before", before), ("after", after)], self.run_dir / "before_after.png")
        self.accelerator.end_training()
        return before, after


def train(config, plan: BatchPlan, run_dir: Path) -> tuple[EvalResult, EvalResult]:
    return Trainer(config, plan, run_dir).run()
