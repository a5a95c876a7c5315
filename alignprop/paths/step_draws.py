"""Random step indices shared by the leap-style paths (LeapAlign, FlowBP): which steps of a T-step schedule a
micro-batch trains, drawn from the trainer's `plans` stream.

Reference: `RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/common/jk_sampling.py` (`sample_jk_indices`). Steps
count forward from 0 (the noisiest); FlowBP counts "reverse indices" r = T - i from the clean end, in [min, max).
"""

from __future__ import annotations

import torch


def leap_pair(steps: int, generator: torch.Generator, reverse_range: tuple[int, int] | None = None) -> tuple[int, int]:
    """(k, j), 0 <= k < j < steps: two distinct reverse indices drawn uniformly from [low, high) (default: every
    step, FlowBP's min_idx 1, max_idx T + 1), the larger one k's (jk_sampling.py:63-74, uniform mode)."""
    low, high = reverse_range or (1, steps + 1)
    low, high = max(low, 1), min(high, steps + 1)
    drawn = torch.randperm(high - low, generator=generator)[:2] + low
    k_reverse, j_reverse = sorted(drawn.tolist(), reverse=True)
    return steps - k_reverse, steps - j_reverse
