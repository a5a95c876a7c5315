"""AlignProp's truncated backpropagation as a gradient path (`gradient_path="truncation"`, the default).

Reference: Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion Models with Reward Backpropagation",
arXiv 2310.03739; code `mihirp1998/AlignProp` @ 7f4503f, `main.py` (the sampling loop with `.detach()`ed UNet
outputs before the truncation point). The plan is a truncation strategy's draw (`alignprop.truncation`); the whole
chain is sampled along it, and the finished sample is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignprop.paths.base import Branch, Calls, GradientPath, Plan
from alignprop.sampling import sample
from alignprop.truncation import truncation_from_config


@dataclass(frozen=True)
class TruncationPlan(Plan):
    pass


class Truncation(GradientPath):
    name = "truncation"
    reference = "AlignProp, arXiv 2310.03739; mihirp1998/AlignProp @ 7f4503f main.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        self.strategy = truncation_from_config(config)

    @staticmethod
    def check(config) -> None:
        truncation_from_config(config)

    def settings(self) -> dict:
        strategy = self.strategy
        chosen = {
            "fixed": {"cut": strategy.cut},
            "per_step_uniform": {"minmax": strategy.minmax},
            "uniform": {"minmax": strategy.minmax},
            "gaussian": {"mean": strategy.gaussian_mean, "std": strategy.gaussian_std},
        }
        return {"strategy": strategy.strategy, "steps": strategy.steps, **chosen.get(strategy.strategy, {})}

    def expected_calls(self) -> Calls:
        # Step i keeps its gradient when the cut is <= i; per_step_uniform draws a cut per step with the same
        # distribution, so each step's chance is the same as with one cut.
        cuts = self.strategy.cut_probabilities()
        kept = sum(p for step in range(self.steps) for cut, p in cuts.items() if cut <= step)
        return Calls(kept, self.steps - kept)

    def draw(self, random, model, latents) -> TruncationPlan:
        return TruncationPlan(self.strategy.draw(random.plans))

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        final = sample(model, conditioning, latents, plan.trained, options, generator, start)
        return [Branch("final", final)]
