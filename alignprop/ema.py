"""An exponential moving average of the trainable weights (`train.ema_decay`; 0: off).

FlowBP updates its EMA copy after every optimizer step with a constant decay, ema <- ema + (1 - decay) (w - ema)
(`RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/sd35/leapalign.py:898-900`, decay 0.995 in its configs), and
evaluates and exports the EMA weights. diffusers' `EMAModel` does exactly that with `min_decay = decay` and
`update_after_step = -1` (its warm-up then never goes below `decay`). Evaluation and the final export use the
average (`applied`); checkpoints keep the raw weights and the average's state, so a resumed run continues both.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.training_utils import EMAModel


class WeightAverage:
    """The moving average of `params` (a list of tensors that the optimizer updates in place)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.average = EMAModel(params, decay=decay, min_decay=decay, update_after_step=-1)

    def update(self) -> None:
        """After an optimizer step that changed the weights."""
        self.average.step(self.params)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in place of the raw ones inside the block (restored after it)."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The averaged tensors, one per parameter (sharded like them under sharding=fsdp)."""
        return self.average.shadow_params

    def state_dict(self, tensors: bool = True) -> dict:
        """For a checkpoint; without `tensors` (written sharded, `sharding.save_sharded`) only the counters."""
        state = self.average.state_dict()
        shadow = [tensor.detach().cpu().clone() for tensor in state["shadow_params"]] if tensors else None
        return {**state, "shadow_params": shadow}

    def load_state_dict(self, state: dict, place=None) -> None:
        """A checkpoint's average; the decay stays this run's (`train.ema_decay`). `place(tensor, param)`: each
        averaged tensor cut like its parameter (sharding.split_like), else as it is."""
        if place is not None:
            state = {**state, "shadow_params": [place(t, p) for t, p in zip(state["shadow_params"], self.params)]}
        self.average.load_state_dict(state)
        self.average.decay = self.average.min_decay = self.decay
        self.average.to(self.params[0].device)


def average_from_config(train_config, params) -> WeightAverage | None:
    decay = train_config.get("ema_decay", 0.0)
    return WeightAverage(params, decay) if decay else None
