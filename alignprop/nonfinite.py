"""The non-finite guard: an update whose loss, gradient or stepped weights are NaN/Inf changes nothing.

Such an update is skipped (weights and optimizer state as before it), counted and logged; after
`max_nonfinite_in_a_row` of them in a row the run stops with its last good checkpoint intact. Every
process takes the same decision (`agreed`), so they skip or step together.
"""

from __future__ import annotations

import torch

from alignprop.errors import UserError


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def optimizer_tensors(state_dict: dict) -> list[torch.Tensor]:
    return [value for values in state_dict["state"].values() for value in values.values() if torch.is_tensor(value)]


class NonFiniteGuard:
    def __init__(self, accelerator, limit: int):
        self.accelerator, self.limit = accelerator, limit
        self.total = 0  # skipped updates in the whole run (logged as nonfinite_count)
        self.in_a_row = 0  # consecutive skips that count towards the stop

    def agreed(self, ok: bool) -> bool:
        """True only if `ok` on every process."""
        if self.accelerator.num_processes == 1:
            return ok
        flag = torch.tensor(0.0 if ok else 1.0, device=self.accelerator.device)
        return self.accelerator.reduce(flag, reduction="sum").item() == 0

    def step(self, optimizer, params: list[torch.Tensor], losses: torch.Tensor, grad_norm) -> bool:
        """`optimizer.step()` if the losses and the gradient norm are finite and the stepped weights too;
        otherwise leave weights and optimizer state as they were. Returns whether the update was applied."""
        loss_finite = self.agreed(bool(torch.isfinite(losses).all()))
        if loss_finite and self.agreed(bool(torch.isfinite(torch.as_tensor(grad_norm)).all())):
            before = ([p.detach().clone() for p in params], _cloned(optimizer.state_dict()))
            optimizer.step()
            if self.agreed(all_finite(params)):
                return True
            with torch.no_grad():  # finite gradients, non-finite weights (e.g. an absurd learning rate): undo
                for param, saved in zip(params, before[0]):
                    param.copy_(saved)
            optimizer.load_state_dict(before[1])
            self.total, self.in_a_row = self.total + 1, self.in_a_row + 1  # held against the run
            return False
        self._skip(loss_finite)
        return False

    def _skip(self, loss_finite: bool) -> None:
        """An fp16 gradient overflow with a finite loss is the GradScaler's normal business (it lowers its scale
        and tries again): logged, not held against the run."""
        self.total += 1
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.update()  # unscale_ (in clip_grad_norm_) saw the inf: back off the scale
            if loss_finite:
                return
        self.in_a_row += 1

    def check_streak(self, skipped: bool, update: int) -> None:
        if not skipped:
            self.in_a_row = 0
        elif self.in_a_row >= self.limit:
            raise UserError(
                f"stopped at update {update}: {self.limit} updates in a row had a non-finite loss or gradient "
                "(skipped, weights untouched); the last good checkpoint is intact. Lower train.learning_rate "
                "or set mixed_precision=bf16/no, then resume_from it"
            )

    def state_dict(self) -> list[int]:
        return [self.total, self.in_a_row]

    def load_state_dict(self, state: list[int]) -> None:
        self.total, self.in_a_row = state


def _cloned(state_dict: dict) -> dict:
    """A copy of an optimizer state dict whose tensors do not alias the live ones."""
    state = {
        key: {k: v.clone() if torch.is_tensor(v) else v for k, v in values.items()}
        for key, values in state_dict["state"].items()
    }
    return {"state": state, "param_groups": [dict(group) for group in state_dict["param_groups"]]}
