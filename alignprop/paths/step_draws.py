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


def capped_leap_pair(steps: int, max_j_reverse: int, generator: torch.Generator) -> tuple[int, int]:
    """(k, j) with j at most `max_j_reverse` steps from the end: j's reverse index ~ U{1..min(cap, T - 1)}, then
    k's ~ U{j_rev + 1..T} (jk_sampling.py:40-61, uniform mode with jk_dirichlet_max_j_rev set; two draws)."""
    low, high = 1, steps + 1
    j_reverse = int(torch.randint(low, min(max_j_reverse, high - 2) + 1, (1,), generator=generator))
    k_reverse = int(torch.randint(j_reverse + 1, high, (1,), generator=generator))
    return steps - k_reverse, steps - j_reverse


def dirichlet_pair(
    steps: int, concentration: tuple[float, float, float], generator: torch.Generator, max_j_reverse: int = 0
) -> tuple[int, int]:
    """(k, j) from FlowBP's Dirichlet sampler (jk_sampling.py:77-132): one seed drawn from `generator` (its only
    draw from it), then `dirichlet_pair_from_seed`."""
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    return dirichlet_pair_from_seed(steps, concentration, seed, max_j_reverse)


def dirichlet_pair_from_seed(
    steps: int, concentration: tuple[float, float, float], seed: int, max_j_reverse: int = 0
) -> tuple[int, int]:
    """The reverse range [1, T + 1) of length n = T cut into three segments A (the end -> j), B (j -> k) and
    C (k -> the noise end) with lengths round(n p), p ~ Dir(a, b, c) (gammas of a generator seeded with `seed`,
    float32, ties to even), the rounding error moved to the largest share, every segment at least 1 long;
    `max_j_reverse` > 0 caps A at max(1, cap - 1), the overflow moved to C. Then j = T - 1 - |A|, k = |C| - 1."""
    low = 1
    n = steps
    gammas = torch._standard_gamma(
        torch.tensor([concentration], dtype=torch.float32), generator=torch.Generator().manual_seed(seed)
    ).squeeze(0)
    shares = gammas / gammas.sum()
    lengths = (shares * n).round().long()
    lengths[shares.argmax()] += n - lengths.sum()
    lengths = lengths.clamp(min=1)
    rest = n - lengths.sum()
    if rest != 0:
        lengths[lengths.argmax()] += rest
    if max_j_reverse > 0:
        cap = max(1, max_j_reverse - low)
        if lengths[0] > cap:
            lengths[2] += lengths[0] - cap
            lengths[0] = cap
    j_reverse = int(lengths[0]) + low
    k_reverse = int(lengths[0] + lengths[1]) + low
    k, j = steps - k_reverse, steps - j_reverse
    if not 0 <= k < j < steps:
        raise ValueError(f"Dirichlet (k, j) = ({k}, {j}) out of 0 <= k < j < {steps}")
    return k, j


def late_biased_steps(steps: int, count: int, bias: float, generator: torch.Generator) -> list[int]:
    """`count` distinct steps of 0..steps-1 (all of them, without a draw, when count >= steps), drawn without
    replacement with weights (i + 1)^bias in float32: later steps more often for bias > 0
    (`_sample_late_biased_indices`, sd35/flowbp_sparse.py:27-63, flux1/flowbp_sparse.py:57-95). Sorted."""
    count = late_biased_count(steps, count)
    if count >= steps:
        return list(range(steps))
    weights = (torch.arange(steps, dtype=torch.float32) + 1).pow(float(bias))
    chosen = torch.multinomial(weights / weights.sum(), count, replacement=False, generator=generator)
    return sorted(int(step) for step in chosen.tolist())


def late_biased_count(steps: int, count: int) -> int:
    """How many steps `late_biased_steps` draws: `count`, at least 1 and at most `steps`."""
    return max(1, min(count, steps))
