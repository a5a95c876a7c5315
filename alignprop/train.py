"""The AlignProp training loop: sample with gradient, decode, score, backpropagate into the trained weights (a LoRA,
or the whole denoiser with train.finetune="full": `alignprop.trainable`).

`Trainer.train_update` is one optimizer update, top to bottom. `Trainer.fit` runs the epochs around it:
an evaluation before the first update and every `vis_freq` updates (the same function as the evaluate
preset), a checkpoint every `save_freq` epochs (`checkpoints/checkpoint_<completed epochs>`, from which
`resume_from` continues exactly), and Ctrl-C handling (finish the update, save
`checkpoint_<epoch>_update_<n>`, exit 130). Non-finite updates are the guard's (`alignprop.nonfinite`).

`train.no_grad_batch_size` (0: off) runs the gradient-free prefix of every sample of an update (the steps before
its plan's first kept step) in large no-grad batches first (`micro_batches`, `alignprop.prefix`); the random
streams, plans and gradients stay those of the micro-batch-by-micro-batch path.

Override points (tests/distributed_worker.py pins the samples with them): `draw_micro_batch` and
`synchronize_gradients`. tests/test_reliability.py wraps `sample_and_score`, `train_update` and
`save_checkpoint`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from alignprop import checkpoint, paths
from alignprop.batching import BatchPlan
from alignprop.curves import save_curves_after_training
from alignprop.ema import average_from_config
from alignprop.errors import Interrupted, UserError
from alignprop.evaluate import (
    EvalResult,
    evaluation_context,
    evaluator_for,
    log_to_trackers,
    save_before_after,
    saved_image_count,
    write_evaluation,
)
from alignprop.interrupts import InterruptFlag
from alignprop.lora_files import copy_into_adapter, is_original_checkpoint, read_lora
from alignprop.nonfinite import NonFiniteGuard, all_finite, optimizer_tensors
from alignprop.pause import pause_point
from alignprop.prefix import run_prefixes
from alignprop.prompts import configured_prompts
from alignprop.randomness import RandomStreams, global_state, preserved_global_state, set_global_state
from alignprop.rewards import RewardResult
from alignprop.rewards.shaping import shaper_from_config
from alignprop.rundir import MetricsLog
from alignprop.sampling import decode, initial_latents, sampling_options_from_config
from alignprop.session import Session, build_session, start_trackers
from alignprop.sharding import (
    gathered,
    gathered_state,
    load_sharded,
    local,
    save_sharded,
    shard_denoiser,
    split_like,
    split_optimizer_state,
)
from alignprop.trainable import trainable_from_config


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass of one process: its prompts, starting latents and its gradient path's plan."""

    prompts: list[str]
    latents: torch.Tensor
    plan: paths.Plan
    start: int = 0  # steps already run without gradient (`Trainer.micro_batches`): `latents` are those at this step


@dataclass
class Scored:
    """A sampled, decoded and scored micro-batch."""

    loss: torch.Tensor  # the micro-batch's loss (mean x loss_coeff), differentiable when a step kept its gradient
    result: RewardResult  # the first branch's (the finished sample for truncation, drtune, draft_lv)
    plan: paths.Plan
    prompts: tuple[str, ...] = ()
    images: torch.Tensor | None = None  # the first branch's decoded images, detached (visualize_train saves some)
    branch_rewards: dict = field(default_factory=dict)  # every branch's name -> its per-sample rewards, in order

    @property
    def scored_as(self) -> str:
        """What the first branch scored (`paths.Branch.name`)."""
        return next(iter(self.branch_rewards), "final")


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


def make_lr_scheduler(train_config, optimizer, total_updates: int):
    """diffusers' schedule `train.lr_scheduler` over the run's optimizer updates, `train.lr_warmup_steps` of warmup
    (update k, counted from 1, uses the schedule's value at k - 1; stepped once per update, skipped ones included)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train_config.lr_scheduler,
        optimizer,
        num_warmup_steps=train_config.lr_warmup_steps,
        num_training_steps=total_updates,
    )


def average_gradients(params, accelerator) -> None:
    """Mean of the trainable weights' gradients over processes, in one collective (the denoiser is not DDP-wrapped:
    DDP does not support tens of checkpointed forward calls per backward)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for param, chunk in zip(params, flat.split([p.numel() for p in params])):
        param.grad = chunk.view_as(param).clone()


def weights_digest(params) -> str:
    """A fingerprint of the trained tensors, to check that every process holds the same weights."""
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    def __init__(self, config, batches: BatchPlan, run_dir: Path, session: Session | None = None):
        session = session or build_session(config)
        self.config, self.batches, self.run_dir = config, batches, run_dir
        self.accelerator, self.model, self.reward = session.accelerator, session.model, session.reward
        self.denoiser = self.model.denoiser
        set_seed(config.seed)  # peft's LoRA init draws from the global generators: the same on every process
        self.trainable = trainable_from_config(config, self.model)  # train.finetune: a LoRA or the whole denoiser
        resumed = self.load_resumed_weights()  # into the plain modules, before sharding
        # One process has nothing to shard over (and no process group): it trains as sharding="none".
        self.sharded = config.get("sharding", "none") == "fsdp" and self.accelerator.num_processes > 1
        if self.sharded:
            shard_denoiser(self.denoiser, session.dtype, self.accelerator.device)
        self.params = self.trainable.params
        self.optimizer = self.accelerator.prepare(make_optimizer(config.train, self.params))
        total_updates = config.num_epochs * batches.updates_per_epoch
        self.lr_scheduler = make_lr_scheduler(config.train, self.optimizer, total_updates)
        self.average = average_from_config(config.train, self.params)  # train.ema_decay; None: off
        self.options = sampling_options_from_config(config)
        self.path = paths.from_config(config, self.model.name)
        self.shape_loss = shaper_from_config(config)  # the reward's loss, or ReFL/SRPO's threshold form
        self.prompts = configured_prompts(config, config.prompt_fn)
        self.evaluator = evaluator_for(session, config, batches.batch_size, lockstep=self.sharded)
        self.random = RandomStreams.seeded(config.seed, self.accelerator.process_index, shared_plans=self.sharded)
        self.guard = NonFiniteGuard(self.accelerator, config.max_nonfinite_in_a_row)
        self.interrupt = InterruptFlag()
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.epoch = 0  # completed epochs
        self.update = 0  # completed optimizer updates (a skipped non-finite update counts: its samples were drawn)
        self.saved_update = None  # the update of the last checkpoint this run wrote
        if isinstance(resumed, checkpoint.Checkpoint):
            self.restore(resumed)
        elif resumed is not None:
            self.note_original_start(resumed)
        start_trackers(session, config, run_dir)

    # --- one optimizer update -----------------------------------------------------------------------

    def train_update(self) -> dict:
        started = time.perf_counter()
        accumulation = self.batches.gradient_accumulation_steps
        scored = []
        for batch in self.micro_batches(accumulation):
            with torch.autograd.set_detect_anomaly(self.config.debug):  # debug: name the op behind a NaN gradient
                # 1. Sample a micro-batch along its path's plan (from its no-grad prefix's end), decode, score.
                out = self.sample_and_score(batch)
                # 2. Backpropagate (a plan that kept no step has nothing to learn from).
                if out.loss.requires_grad:
                    self.accelerator.backward(out.loss / accumulation)
            scored.append(out)
        # 3. Average the gradients over processes and clip them.
        self.synchronize_gradients()
        grad_norm = gathered(self.accelerator.clip_grad_norm_(self.params, self.config.train.max_grad_norm))
        # 4. Step, unless a loss, the gradient or the stepped weights are non-finite (then nothing changes).
        losses = torch.stack([out.loss.detach() for out in scored])
        stepped = self.guard.step(self.optimizer, [local(p) for p in self.params], losses, grad_norm)
        if stepped and self.average is not None:
            self.average.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.update += 1
        record = self.update_record(scored, grad_norm, stepped, time.perf_counter() - started)  # this update's lr
        self.lr_scheduler.step()  # the next update's learning rate
        self.save_train_samples(scored)
        return record

    def micro_batches(self, count: int) -> Iterator[MicroBatch]:
        """The update's micro-batches. train.no_grad_batch_size=0: each drawn just before its pass. Otherwise all
        drawn first (each random stream is its own generator: the same draws), every sample advanced through its
        plan's gradient-free steps in no-grad chunks of that size, each micro-batch yielded at its first step with
        gradient."""
        chunk = self.config.train.get("no_grad_batch_size", 0)
        if not chunk:
            for _ in range(count):
                yield self.draw_micro_batch()
            return
        yield from self.advance_prefixes([self.draw_micro_batch() for _ in range(count)], chunk)

    def advance_prefixes(self, drawn: list[MicroBatch], chunk: int) -> list[MicroBatch]:
        """`drawn`, each at its plan's first step with gradient: every sample's gradient-free steps run without
        gradient (`run_prefixes`)."""
        starts = [self.path.gradient_free_steps(batch.plan) for batch in drawn]
        lengths = [start for start, batch in zip(starts, drawn) for _ in batch.prompts]
        prompts = [prompt for batch in drawn for prompt in batch.prompts]
        with self.accelerator.autocast():
            conditioning = self.model.conditioning(prompts, guided=self.model.guided(self.options))
            latents = torch.cat([batch.latents for batch in drawn])
            advanced = run_prefixes(self.model, conditioning, latents, lengths, self.options, chunk)
        sizes = [len(batch.prompts) for batch in drawn]
        return [
            replace(batch, latents=latents, start=start)
            for batch, latents, start in zip(drawn, advanced.split(sizes), starts)
        ]

    def draw_micro_batch(self) -> MicroBatch:
        """This process's next micro-batch, from its own random streams."""
        size = self.batches.batch_size
        prompts = [self.random.prompts.choice(self.prompts) for _ in range(size)]
        latents = initial_latents(size, self.model, self.random.latents, self.accelerator.device)
        return MicroBatch(prompts, latents, self.path.draw(self.random, self.model, latents))

    def sample_and_score(self, batch: MicroBatch) -> Scored:
        """The gradient path's branches for `batch`, each decoded and scored; the loss is the batch mean of the
        weighted sum of the branches' shaped per-sample losses, times `train.loss_coeff`."""
        with self.accelerator.autocast():
            conditioning = self.model.conditioning(batch.prompts, guided=self.model.guided(self.options))
            branches = self.path.sample(
                self.model, conditioning, batch.latents, batch.plan, self.options, batch.start, self.random.latents
            )
            total, results, first_images = 0, {}, None
            for branch in branches:
                images = decode(self.model, branch.latents, self.options)
                result = paths.score(self.reward, branch, images, batch.prompts)
                total = total + branch.weight * self.shape_loss(result).float()
                results[branch.name] = result
                first_images = images.detach() if first_images is None else first_images
        loss = total.mean() * self.config.train.loss_coeff
        first = branches[0].name
        rewards = {name: result.reward.detach() for name, result in results.items()}
        return Scored(loss, results[first], batch.plan, tuple(batch.prompts), first_images, rewards)

    def synchronize_gradients(self) -> None:
        if not self.sharded:  # FSDP reduce-scattered them during the backward
            average_gradients(self.params, self.accelerator)

    def update_record(self, scored: list[Scored], grad_norm, stepped: bool, seconds: float) -> dict:
        """What metrics.jsonl and the trackers get for one update (rewards gathered over processes)."""
        gather, device = self.accelerator.gather, self.accelerator.device
        rewards = gather(torch.cat([out.result.reward.detach().float() for out in scored]).to(device))
        record = {
            "update": self.update,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(unbiased=False).item(),
            **self.original_rewards_std(scored),
            "loss": self.accelerator.reduce(torch.stack([o.loss.detach() for o in scored]).mean(), "mean").item(),
            "grad_norm": float(grad_norm),
            "skipped_nonfinite": not stepped,
            "nonfinite_count": self.guard.total,
            "lr": self.optimizer.param_groups[0]["lr"],
            "kept_steps": [out.plan.trained_steps() for out in scored],
            "plans": [out.plan.record() for out in scored],
            "gradient_calls": sum(self.path.gradient_calls(out.plan) for out in scored) / len(scored),
            "scored": scored[0].scored_as,
            "seconds": seconds,
        }
        if len(scored[0].branch_rewards) > 1:  # every branch's reward, by what it scored
            for name in scored[0].branch_rewards:
                values = torch.cat([out.branch_rewards[name].float().to(device) for out in scored])
                record[f"reward_{name}_mean"] = gather(values).mean().item()
        for name in scored[0].result.metrics:
            values = torch.cat([out.result.metrics[name].float().to(device) for out in scored])
            record[f"{name}_mean"] = gather(values).mean().item()
        return record

    def original_rewards_std(self, scored: list[Scored]) -> dict:
        """The original's `rewards_std`: the unbiased std of each micro-batch's rewards, averaged over the update's
        micro-batches and the processes (mihirp1998/AlignProp @ 7f4503f, main.py, lines 510, 519, 570-571). Not
        logged with one sample per micro-batch (undefined there; the original logged NaN)."""
        if self.batches.batch_size < 2:
            return {}
        stds = torch.stack([out.result.reward.detach().float().std() for out in scored]).mean()
        return {"rewards_std": self.accelerator.reduce(stds.to(self.accelerator.device), "mean").item()}

    # --- the run ------------------------------------------------------------------------------------

    def fit(self) -> tuple[EvalResult, EvalResult]:
        """Every remaining epoch; returns the evaluations before the first and after the last update."""
        with self.interrupt.installed():
            before = after = self.evaluate_and_record()
            per_epoch = self.batches.updates_per_epoch
            total = self.config.num_epochs * per_epoch
            main = self.accelerator.is_main_process
            with tqdm(total=total, initial=self.update, desc="updates", disable=not main) as progress:
                for epoch in range(self.epoch, self.config.num_epochs):
                    # A mid-epoch checkpoint resumes inside its epoch: run only the updates it had not done.
                    while self.update < (epoch + 1) * per_epoch:
                        record = self.train_update()
                        self.log({"epoch": epoch, **record})
                        self.guard.check_streak(record["skipped_nonfinite"], self.update)
                        progress.set_postfix(reward=f"{record['reward_mean']:.4g}")
                        progress.update()
                        if self.eval_due():
                            after = self.evaluate_and_record()
                            self.reseed_training_noise()
                        if self.update < (epoch + 1) * per_epoch and self.interrupted():
                            self.stop_for_interrupt()
                    self.epoch = epoch + 1
                    if self.checkpoint_due():
                        self.save_checkpoint()
                    if self.epoch < self.config.num_epochs and self.interrupted():
                        self.stop_for_interrupt()
            if not self.eval_due():  # the last update was not evaluated yet
                after = self.evaluate_and_record()
        self.finish(before, after)
        return before, after

    def finish(self, before: EvalResult, after: EvalResult) -> None:
        """Fingerprints of every process's weights, the final weights and the before/after grid."""
        digest = weights_digest([gathered(param) for param in self.params])
        self.log({"update": self.update, "weights_sha256_per_process": gather_object([digest])})
        with self.averaged():  # the final weights are the average when train.ema_decay is on
            weights = self.gathered_weights()
            if self.accelerator.is_main_process:
                self.trainable.export(self.run_dir, weights)
        if self.accelerator.is_main_process:
            save_before_after(before, after, self.run_dir / "before_after.png")
            save_curves_after_training(self.run_dir)  # RUN/curves.png; a failure is only a warning
        self.accelerator.end_training()

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.metrics.write(record)
        if not record.get("eval"):  # evaluations go to the trackers under eval/ (evaluate_and_record)
            scalars = {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
            self.accelerator.log(scalars, step=self.update)

    # --- evaluation ---------------------------------------------------------------------------------

    def evaluate_and_record(self) -> EvalResult:
        """Evaluate on seeded latents (fixed ones when `same_evaluation`), log, and keep the first
        `max_vis_images` images under run_dir/eval/update_N/."""
        seed = self.config.seed if self.config.same_evaluation else self.config.seed + self.update
        with preserved_global_state(), self.averaged():
            result = self.evaluator(seed)
        self.log({"update": self.update, "eval": True, **result.summary()})
        pause_point("evaluate")  # test hook: SIGKILL mid-evaluation, before its images are written
        if self.accelerator.is_main_process:
            directory = self.run_dir / "eval" / f"update_{self.update:06d}"
            context = {**evaluation_context(self.config, None, "train"), "seed": seed, "update": self.update}
            summary = write_evaluation(result, directory, context, max_images=saved_image_count(self.config))
            log_to_trackers(self.accelerator, "eval", summary, directory / "grid.png", step=self.update)
        return result

    def averaged(self):
        """The EMA weights in place inside the block when train.ema_decay is on (evaluation, the final weights)."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def eval_due(self) -> bool:
        return evaluation_due(self.config, self.update)

    def reseed_training_noise(self) -> None:
        """original_training_noise: the original's evaluation (same_evaluation) reseeded the generator its training
        latents came from with `seed` (`torch.cuda.manual_seed` returns None: its `generator=` was that default
        generator) and drew its latents from it first; training went on after that draw, alike on every process
        (mihirp1998/AlignProp @ 7f4503f, main.py, lines 442 and 538-542). So the stream is reseeded, then advanced
        past one draw of the evaluation set's size in the shape and dtype the evaluation draws (`seeded_latents`)."""
        if not self.config.original_training_noise:
            return
        if self.config.same_evaluation:
            self.random.latents.manual_seed(self.config.seed)
        initial_latents(len(self.evaluator.prompts), self.model, self.random.latents)  # the evaluation's draw

    # --- training samples (visualize_train) ---------------------------------------------------------

    def samples_due(self) -> bool:
        """Every vis_freq updates; with vis_freq=0 the first and the last update."""
        config, total = self.config, self.config.num_epochs * self.batches.updates_per_epoch
        if config.vis_freq > 0:
            return self.update % config.vis_freq == 0
        return self.update in (1, total)

    def save_train_samples(self, scored: list[Scored]) -> None:
        """visualize_train: the first max_vis_images (at least one) images of the update's first micro-batch on the
        main process, with prompt and reward, in run_dir/train_samples/update_N/ and to the trackers."""
        first = scored[0]
        if not (self.config.visualize_train and self.accelerator.is_main_process and self.samples_due()):
            return
        if first.images is None:
            return
        count = max(1, self.config.max_vis_images)
        rewards = first.result.reward.detach().float().cpu()[:count]
        shown = EvalResult(list(first.prompts[:count]), first.images[:count].float().cpu(), rewards, {})
        directory = self.run_dir / "train_samples" / f"update_{self.update:06d}"
        write_evaluation(shown, directory, {"mode": "train_samples", "update": self.update})
        log_to_trackers(self.accelerator, "train_samples", {}, directory / "grid.png", step=self.update)

    # --- interrupts ---------------------------------------------------------------------------------

    def interrupted(self) -> bool:
        return not self.guard.agreed(not self.interrupt.raised)

    def stop_for_interrupt(self) -> None:
        """Save the last completed update (if checkpoints are on) and leave with `Interrupted`."""
        if self.config.save_freq > 0 and self.saved_update != self.update:
            self.save_checkpoint()
        self.accelerator.end_training()
        if self.config.save_freq == 0:
            raise Interrupted(f"stopped after update {self.update}; checkpoints are off (save_freq=0), nothing saved")
        saved, run_dir = self.run_dir / checkpoint.CHECKPOINTS_DIR, self.run_dir
        raise Interrupted(f"stopped after update {self.update}; saved checkpoint in {saved}; resume_from={run_dir}")

    # --- checkpoints --------------------------------------------------------------------------------

    def checkpoint_due(self) -> bool:
        return checkpoint.save_due(self.config, self.epoch)  # the schedule the start-up line prints

    def gathered_weights(self) -> dict | None:
        """Sharded: the denoiser's state dict (LoRA: its trained tensors) gathered on the main process (every process
        calls it). Unsharded: None, the trainable writes its own tensors."""
        if not self.sharded:
            return None
        return gathered_state(self.denoiser, trainable_only=self.trainable.mode == "lora")

    def save_checkpoint(self) -> None:
        """checkpoints/checkpoint_<epoch>: the trained weights + optimizer, scaler, counters and every process's RNG
        streams. An interrupt mid-epoch saves checkpoint_<epoch>_update_<update> (its update count says where to go
        on)."""
        accelerator = self.accelerator
        # Checked on every process (each on its shard under fsdp) and agreed, so all of them stop together.
        mine = [local(p) for p in self.params] + [local(t) for t in optimizer_tensors(self.optimizer.state_dict())]
        if not self.guard.agreed(all_finite(mine)):
            raise UserError(
                f"refusing to save a checkpoint with non-finite values at update {self.update}: the weights or the "
                "optimizer state holds NaN/Inf; lower train.learning_rate and resume from the last checkpoint"
            )
        random_states = gather_object([{"streams": self.random.state_dict(), "global": global_state()}])
        root = self.run_dir / checkpoint.CHECKPOINTS_DIR
        mid_epoch = self.update != self.epoch * self.batches.updates_per_epoch  # saved by an interrupt
        staging = self.write_shards(checkpoint.final_path(root, self.epoch, self.update, mid_epoch))
        # Sharded weights are gathered whole by every process together; the main process writes them.
        weights, average_weights = self.gathered_weights(), None
        if self.average is not None:
            with self.averaged():  # what evaluating this checkpoint scores
                average_weights = self.gathered_weights()
        if accelerator.is_main_process:
            state = checkpoint.build_training_state(
                self.epoch,
                self.update,
                self.trainable.names(),
                None if self.sharded else self.optimizer.state_dict(),  # sharded: in sharded/
                accelerator.scaler,
                random_states,
                self.guard.state_dict(),
                self.lr_scheduler,
                None if self.average is None else self.average.state_dict(tensors=not self.sharded),
            )

            def write(directory: Path) -> None:
                self.trainable.save(directory, weights)
                if self.average is not None:
                    with self.averaged():
                        self.trainable.save(directory / checkpoint.AVERAGE_DIR, average_weights)
                checkpoint.write_training_state(directory, state)

            info = {"update": self.update, "num_processes": accelerator.num_processes, **self.checkpoint_kind()}
            checkpoint.save(root, self.epoch, info, write, mid_epoch=mid_epoch, staging=staging)
            checkpoint.rotate(root, self.config.num_checkpoint_limit)
        self.saved_update = self.update
        accelerator.wait_for_everyone()

    def write_shards(self, final: Path) -> Path | None:
        """sharding=fsdp: the main process makes the checkpoint's staging directory and every process writes its
        shards of AdamW's state and of the average into it (`sharding.save_sharded`); returns it. Else None."""
        if not self.sharded:
            return None
        holder = [str(checkpoint.staging_dir(final)) if self.accelerator.is_main_process else None]
        broadcast_object_list(holder)
        staging = Path(holder[0])
        save_sharded(staging / checkpoint.SHARDED_DIR, self.denoiser, self.optimizer.optimizer, self.average_tensors())
        self.accelerator.wait_for_everyone()
        return staging

    def average_tensors(self) -> dict | None:
        """The moving average's tensors by parameter name (None without one)."""
        return None if self.average is None else dict(zip(self.trainable.names(), self.average.tensors))

    def checkpoint_kind(self) -> dict:
        """What checkpoint.json says the checkpoint holds (`Checkpoint.finetune`, `Checkpoint.denoiser_name`)."""
        if self.trainable.mode == "full":
            return {"finetune": "full", "denoiser": self.model.denoiser_name}
        return {"finetune": "lora"}

    def load_resumed_weights(self) -> checkpoint.Checkpoint | Path | None:
        """The weights `resume_from` names, copied into the denoiser (its plain modules: before any sharding);
        returns the checkpoint (or an original AlignProp checkpoint's directory) whose state `restore` reads."""
        source = self.config.resume_from
        if not source:
            return None
        if is_original_checkpoint(Path(source)):
            copy_into_adapter(self.denoiser, read_lora(Path(source)))
            return Path(source)
        saved = checkpoint.resolve(source)
        self.trainable.restore(saved.path)
        return saved

    def note_original_start(self, directory: Path) -> None:
        """An original AlignProp checkpoint: its LoRA, and a new optimizer (its accelerate state is not read)."""
        if self.accelerator.is_main_process:
            print(
                f"resume_from: {directory} is an original AlignProp checkpoint; training starts from its LoRA with "
                "a new optimizer at epoch 0 (its optimizer and random states are not read)",
                flush=True,
            )
        self.log({"update": 0, "initialized_from_original": str(directory)})

    def restore(self, saved: checkpoint.Checkpoint) -> None:
        """Continue exactly where `saved` stopped (its weights already loaded): optimizer, scaler, RNG streams,
        counters and the moving average."""
        state = checkpoint.read_training_state(saved, self.trainable.names())
        saved_average = state.get("ema")
        if state["optimizer"] is None:  # a sharding=fsdp checkpoint: optimizer and average in sharded/
            average = self.average_tensors() if saved_average is not None else None
            load_sharded(saved.sharded_state, self.denoiser, self.optimizer.optimizer, average)
            if average is not None:
                saved_average = {**saved_average, "shadow_params": self.average.tensors}
        else:
            self.optimizer.load_state_dict(split_optimizer_state(state["optimizer"], self.params))
        if state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.epoch, self.update = state["epoch"], state["update"]
        self.restore_streams(state["random"], saved.path)
        self.guard.load_state_dict(state.get("nonfinite", [0, 0]))
        self.restore_average(saved_average, saved.path)
        self.log({"update": self.update, "resumed_from": str(saved.path), "completed_epochs": self.epoch})

    def restore_streams(self, saved: list[dict], path: Path) -> None:
        """Each process continues the random streams of the process of its index. A checkpoint of another process
        count resumes too (the weights and optimizer state in it are whole): a process it had no streams for draws
        from fresh ones (seeded from the seed and the update count; the plans' stream, shared under fsdp, from
        process 0's), and the run says in one line that this part is not exact."""
        index, count = self.accelerator.process_index, self.accelerator.num_processes
        if index < len(saved):
            self.random.load_state_dict(saved[index]["streams"])
            set_global_state(saved[index]["global"])
        else:
            self.random = RandomStreams.seeded(self.config.seed + self.update, index, shared_plans=self.sharded)
            if self.sharded:
                self.random.plans.set_state(saved[0]["streams"]["plans"])
        if count != len(saved) and self.accelerator.is_main_process:
            saved_count = len(saved)
            if count > saved_count:
                streams = f"processes {saved_count}..{count - 1} draw from fresh random streams"
            else:
                streams = f"the random streams of processes {count}..{saved_count - 1} are dropped"
            print(
                f"resume_from: {path} was written by {saved_count} processes, this launch has {count}: weights, "
                f"optimizer state, schedule and counters continue; {streams} (a resume on the same count is exact)",
                flush=True,
            )

    def restore_average(self, saved, path: Path) -> None:
        """The checkpoint's moving average; one without one (saved with train.ema_decay=0) starts it afresh from
        the restored weights, and says so."""
        if self.average is None:
            return
        if saved is not None:
            self.average.load_state_dict(saved, place=split_like)
            return
        self.average = average_from_config(self.config.train, self.params)
        if self.accelerator.is_main_process:
            print(f"train.ema_decay: {path} holds no moving average; it starts from the restored weights", flush=True)


def train(config, batches: BatchPlan, run_dir: Path, session: Session | None = None) -> tuple[EvalResult, EvalResult]:
    return Trainer(config, batches, run_dir, session).fit()


def evaluation_due(config, update: int) -> bool:
    """Whether training evaluates after `update` (every `vis_freq`-th, when in-loop evaluation is on)."""
    return config.visualize_eval and config.vis_freq > 0 and update % config.vis_freq == 0
