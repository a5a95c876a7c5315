"""The AlignProp training loop: sample with gradient, decode, score, backpropagate into LoRA.

Read top to bottom: `train` sets up, then for every epoch runs `updates_per_epoch` optimizer updates,
each accumulating gradients over `gradient_accumulation_steps` forward passes (micro-batches).
Every `vis_freq` updates it evaluates (the same function as the evaluate preset); every `save_freq`
epochs it writes checkpoints/checkpoint_<completed epochs>, from which `resume_from` continues exactly.
A NaN/Inf loss or gradient skips its update (weights and optimizer untouched, logged); `max_nonfinite_in_a_row`
of them stop the run. Ctrl-C finishes the current update, saves it (mid-epoch: checkpoint_<epoch>_update_<n>)
and exits 130; resuming from it continues inside that epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from alignprop import checkpoint, models
from alignprop.batching import BatchPlan
from alignprop.conditioning import encode_prompts
from alignprop.errors import Interrupted, UserError
from alignprop.evaluate import (
    EvalResult,
    Evaluator,
    evaluation_context,
    evaluation_prompts,
    log_to_trackers,
    save_grid,
    write_evaluation,
)
from alignprop.lora_files import check_matches_config, copy_into_adapter, read_lora
from alignprop.pause import pause_point
from alignprop.prompts import load_prompts
from alignprop.randomness import RandomStreams, global_state, preserved_global_state, set_global_state
from alignprop.rewards import build_reward
from alignprop.rundir import MetricsLog
from alignprop.runtime import make_accelerator
from alignprop.sampling import decode, initial_latents, sample, truncation_from_config

__all__ = ["RandomStreams", "Trainer", "check_options", "train"]


def check_options(config) -> None:
    """The checkpoint and evaluation cadence (checked before the run directory is created)."""
    keys = (("save_freq", 0), ("num_checkpoint_limit", 1), ("vis_freq", 0), ("max_vis_images", 0))
    for key, minimum in (*keys, ("max_nonfinite_in_a_row", 1)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"{key} must be an integer >= {minimum}, got {value!r}")


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


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def optimizer_tensors(state_dict: dict) -> list[torch.Tensor]:
    return [value for values in state_dict["state"].values() for value in values.values() if torch.is_tensor(value)]


class InterruptFlag:
    """SIGINT sets a flag that the loop reads between updates; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.raised = False

    def handle(self, signum, frame) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupt: finishing this update and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield self
            return
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class Trainer:
    def __init__(self, config, plan: BatchPlan, run_dir: Path):
        self.config, self.plan, self.run_dir = config, plan, run_dir
        self.accelerator = accelerator = make_accelerator(config, run_dir)
        self.device = accelerator.device
        self.dtype = models.inference_dtype(config.mixed_precision)

        self.pipeline = models.load_pipeline(config.pretrained.model, config.pretrained.revision, self.dtype)
        self.pipeline.to(self.device)
        self.unet = self.pipeline.unet
        # The LoRA init draws from the global generators: seed them, the same on every process.
        set_seed(config.seed)
        self.params = models.add_lora(self.unet, config.lora.rank, config.lora.alpha, config.lora.target_modules)
        self.optimizer = accelerator.prepare(make_optimizer(config.train, self.params))
        self.reward = build_reward(config, self.device, self.dtype)
        self.prompts = load_prompts(config.prompt_fn)
        self.eval_prompts = evaluation_prompts(config)
        self.evaluator = Evaluator(accelerator, self.pipeline, self.reward, self.eval_prompts, config, plan.batch_size)
        self.truncation = truncation_from_config(config)
        self.random = RandomStreams.seeded(config.seed, accelerator.process_index)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.epoch = 0  # completed epochs
        self.update = 0  # completed optimizer updates (a skipped non-finite update counts: its samples were drawn)
        self.nonfinite_total = self.nonfinite_in_a_row = 0
        self.interrupt = InterruptFlag()
        self.saved_update = None  # the update of the last checkpoint this run wrote
        if config.resume_from:
            self.restore(checkpoint.resolve(config.resume_from))
        if accelerator.is_main_process and config.tracker != "none":
            accelerator.init_trackers("alignprop", config=json.loads(config.to_json_best_effort()))

    # --- one forward pass -------------------------------------------------------------------------

    def draw_batch(self) -> tuple[list[str], torch.Tensor, tuple[bool, ...]]:
        """This process's next micro-batch: prompts, starting latents and truncation plan."""
        batch_size = self.plan.batch_size
        prompts = [self.random.prompts.choice(self.prompts) for _ in range(batch_size)]
        latents = initial_latents(batch_size, self.unet, self.pipeline.scheduler, self.random.latents, self.device)
        return prompts, latents, self.truncation.plan(self.random.plans)

    def forward(self) -> dict:
        """Sample one micro-batch with the truncation plan, score it; returns the loss and what to log."""
        config = self.config
        prompts, latents, keep_grad = self.draw_batch()
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
                native_dtype=config.native_dtype,
                fold_lora=config.fold_lora,
            )
            images = decode(
                self.pipeline.vae, final, grad_checkpoint=config.decode_checkpoint, native_dtype=config.native_dtype
            )
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
        self.synchronize_gradients()
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
        loss_finite = self.agreed(bool(torch.isfinite(torch.stack(losses)).all()))
        finite = loss_finite and self.agreed(bool(torch.isfinite(torch.as_tensor(grad_norm)).all()))
        if finite:
            self.optimizer.step()
        else:
            self.skip_nonfinite(loss_finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.update += 1

        rewards = self.accelerator.gather(torch.cat(rewards).to(self.device))
        record = {
            "update": self.update,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(unbiased=False).item(),
            "loss": self.accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item(),
            "grad_norm": float(grad_norm),
            "skipped_nonfinite": not finite,
            "nonfinite_count": self.nonfinite_total,
            "lr": self.optimizer.param_groups[0]["lr"],
            "kept_steps": kept_steps,
            "seconds": time.perf_counter() - started,
        }
        for name, values in extras.items():
            record[f"{name}_mean"] = self.accelerator.gather(torch.cat(values)).mean().item()
        return record

    def synchronize_gradients(self) -> None:
        average_gradients(self.params, self.accelerator)

    # --- non-finite losses and gradients ----------------------------------------------------------

    def agreed(self, ok: bool) -> bool:
        """True only if `ok` on every process, so all processes skip (or step) together."""
        if self.accelerator.num_processes == 1:
            return ok
        flag = torch.tensor(0.0 if ok else 1.0, device=self.device)
        return self.accelerator.reduce(flag, reduction="sum").item() == 0

    def skip_nonfinite(self, loss_finite: bool) -> None:
        """Leave weights and optimizer state untouched. An fp16 gradient overflow with a finite loss is the
        GradScaler's normal business (it lowers its scale and tries again): logged, not held against the run."""
        self.nonfinite_total += 1
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.update()  # unscale_ (in clip_grad_norm_) saw the inf: back off the scale
            if loss_finite:
                return
        self.nonfinite_in_a_row += 1

    def check_nonfinite_streak(self, record: dict) -> None:
        if record["skipped_nonfinite"]:
            limit = self.config.max_nonfinite_in_a_row
            if self.nonfinite_in_a_row >= limit:
                raise UserError(
                    f"stopped at update {self.update}: {limit} updates in a row had a non-finite loss or gradient "
                    "(skipped, weights untouched); the last good checkpoint is intact. Lower train.learning_rate "
                    "or set mixed_precision=bf16/no, then resume_from it"
                )
        else:
            self.nonfinite_in_a_row = 0

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self) -> EvalResult:
        """Score the eval prompts on seeded latents (fixed ones when `same_evaluation`); all processes share."""
        seed = self.config.seed if self.config.same_evaluation else self.config.seed + self.update
        with preserved_global_state():
            return self.evaluator(seed)

    def evaluate_and_record(self) -> EvalResult:
        """Evaluate, log, and keep the first `max_vis_images` images under run_dir/eval/update_N/."""
        result = self.evaluate()
        self.log({"update": self.update, "eval": True, **result.summary()})
        pause_point("evaluate")  # test hook: SIGKILL mid-evaluation, before its images are written
        if self.accelerator.is_main_process:
            directory = self.run_dir / "eval" / f"update_{self.update:06d}"
            context = {**evaluation_context(self.config, None, "train"), "update": self.update}
            summary = write_evaluation(result, directory, context, max_images=self.config.max_vis_images)
            log_to_trackers(self.accelerator, "eval", summary, directory / "grid.png", step=self.update)
        return result

    def eval_due(self) -> bool:
        config = self.config
        return config.visualize_eval and config.vis_freq > 0 and self.update % config.vis_freq == 0

    # --- checkpoints ------------------------------------------------------------------------------

    def checkpoint_due(self) -> bool:
        save_freq = self.config.save_freq
        return save_freq > 0 and (self.epoch % save_freq == 0 or self.epoch == self.config.num_epochs)

    def trainable_names(self) -> list[str]:
        return [name for name, param in self.unet.named_parameters() if param.requires_grad]

    def save_checkpoint(self) -> None:
        """checkpoints/checkpoint_<epoch>: LoRA + optimizer, scaler, counters and every process's RNG streams.
        An interrupt mid-epoch saves checkpoint_<epoch>_update_<update> (its update count says where to go on)."""
        accelerator = self.accelerator
        # Checked on every process (they hold the same values), so all of them stop together.
        if not (all_finite(self.params) and all_finite(optimizer_tensors(self.optimizer.state_dict()))):
            raise UserError(f"refusing to save a checkpoint with non-finite values at update {self.update}")
        random_states = gather_object([{"streams": self.random.state_dict(), "global": global_state()}])
        if accelerator.is_main_process:
            scaler = accelerator.scaler
            state = {
                "epoch": self.epoch,
                "update": self.update,
                "trainable": self.trainable_names(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "random": random_states,  # one entry per process, in process order
                "nonfinite": [self.nonfinite_total, self.nonfinite_in_a_row],
            }
            unet = accelerator.unwrap_model(self.unet)

            def write(directory: Path) -> None:
                models.save_lora(unet, directory)
                checkpoint.write_training_state(directory, state)

            root = self.run_dir / checkpoint.CHECKPOINTS_DIR
            info = {"update": self.update, "num_processes": accelerator.num_processes}
            mid_epoch = self.update != self.epoch * self.plan.updates_per_epoch  # saved by an interrupt
            checkpoint.save(root, self.epoch, info, write, mid_epoch=mid_epoch)
            checkpoint.rotate(root, self.config.num_checkpoint_limit)
        self.saved_update = self.update
        accelerator.wait_for_everyone()

    def restore(self, saved: checkpoint.Checkpoint) -> None:
        """Continue exactly where `saved` stopped: weights, optimizer, scaler, RNG streams and counters."""
        weights = read_lora(saved.lora_path)
        check_matches_config(weights, self.config.lora)
        copy_into_adapter(self.unet, weights)
        state = saved.training_state()
        if state["trainable"] != self.trainable_names():
            raise UserError(f"the trainable parameters of {str(saved.path)!r} differ from this model's")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        mine = state["random"][self.accelerator.process_index]
        self.random.load_state_dict(mine["streams"])
        set_global_state(mine["global"])
        self.epoch, self.update = state["epoch"], state["update"]
        self.nonfinite_total, self.nonfinite_in_a_row = state.get("nonfinite", [0, 0])
        self.log({"update": self.update, "resumed_from": str(saved.path), "completed_epochs": self.epoch})

    def lora_digests(self) -> list[str]:
        """Every process's LoRA fingerprint, in process order (all equal when gradients are in sync)."""
        return gather_object([lora_digest(self.params)])

    # --- the run ----------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.metrics.write(record)
        if not record.get("eval"):  # evaluations go to the trackers under eval/ (evaluate_and_record)
            scalars = {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
            self.accelerator.log(scalars, step=self.update)

    def run(self) -> tuple[EvalResult, EvalResult]:
        with self.interrupt.installed():
            return self.run_epochs()

    def interrupted(self) -> bool:
        return not self.agreed(not self.interrupt.raised)

    def stop_for_interrupt(self) -> None:
        """Save the last completed update (if checkpoints are on) and leave with `Interrupted`."""
        if self.config.save_freq > 0 and self.saved_update != self.update:
            self.save_checkpoint()
        self.accelerator.end_training()
        if self.config.save_freq == 0:
            raise Interrupted(f"stopped after update {self.update}; checkpoints are off (save_freq=0), nothing saved")
        saved, run_dir = self.run_dir / checkpoint.CHECKPOINTS_DIR, self.run_dir
        raise Interrupted(f"stopped after update {self.update}; saved checkpoint in {saved}; resume_from={run_dir}")

    def run_epochs(self) -> tuple[EvalResult, EvalResult]:
        config, plan, main = self.config, self.plan, self.accelerator.is_main_process
        before = after = self.evaluate_and_record()
        total = config.num_epochs * plan.updates_per_epoch
        with tqdm(total=total, initial=self.update, desc="updates", disable=not main) as progress:
            for epoch in range(self.epoch, config.num_epochs):
                # A mid-epoch checkpoint resumes inside its epoch: run only the updates it had not done.
                while self.update < (epoch + 1) * plan.updates_per_epoch:
                    record = self.train_update()
                    self.log({"epoch": epoch, **record})
                    self.check_nonfinite_streak(record)
                    progress.set_postfix(reward=f"{record['reward_mean']:.4g}")
                    progress.update()
                    if self.eval_due():
                        after = self.evaluate_and_record()
                    if self.update < (epoch + 1) * plan.updates_per_epoch and self.interrupted():
                        self.stop_for_interrupt()
                self.epoch = epoch + 1
                if self.checkpoint_due():
                    self.save_checkpoint()
                if self.epoch < config.num_epochs and self.interrupted():
                    self.stop_for_interrupt()
        if not self.eval_due():  # the last update was not evaluated yet
            after = self.evaluate_and_record()
        self.log({"update": self.update, "lora_sha256_per_process": self.lora_digests()})
        if main:
            models.save_lora(self.accelerator.unwrap_model(self.unet), self.run_dir / "lora")
            save_grid([("before", before), ("after", after)], self.run_dir / "before_after.png")
        self.accelerator.end_training()
        return before, after


def lora_digest(params) -> str:
    """A fingerprint of the LoRA tensors, to check that every process holds the same weights."""
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def train(config, plan: BatchPlan, run_dir: Path) -> tuple[EvalResult, EvalResult]:
    return Trainer(config, plan, run_dir).run()
