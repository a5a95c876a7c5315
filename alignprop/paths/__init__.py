"""Gradient paths: which denoiser calls of a training sample carry the reward's gradient, and what is scored.

One module per path, each a `GradientPath` (`alignprop.paths.base`: the interface the Trainer calls), each opening
with its reference. `gradient_path` (config) names one; `from_config` builds it, `check` validates its settings
before the run directory exists.
"""

from __future__ import annotations

from alignprop.errors import UserError
from alignprop.paths.base import Branch, GradientPath, Plan, score
from alignprop.paths.direct_align import DirectAlign
from alignprop.paths.draft_lv import DraftLv
from alignprop.paths.drtune import Drtune
from alignprop.paths.flowbp_bridge import FlowBPBridge
from alignprop.paths.flowbp_lagrange import FlowBPLagrange
from alignprop.paths.flowbp_sparse import FlowBPSparse
from alignprop.paths.leapalign import LeapAlign
from alignprop.paths.refl import ReFL
from alignprop.paths.truncation import Truncation

ALL = (Truncation, ReFL, DraftLv, Drtune, DirectAlign, LeapAlign, FlowBPSparse, FlowBPBridge, FlowBPLagrange)
REGISTRY: dict[str, type[GradientPath]] = {path.name: path for path in ALL}
NAMES = tuple(REGISTRY)

__all__ = ["NAMES", "REGISTRY", "Branch", "GradientPath", "Plan", "check", "from_config", "score"]


def path_class(config) -> type[GradientPath]:
    name = config.gradient_path
    if name not in REGISTRY:
        raise UserError(f"gradient_path={name!r}; choose one of: {', '.join(NAMES)}")
    return REGISTRY[name]


def check(config) -> None:
    """One UserError line for the first bad gradient-path setting."""
    path_class(config).check(config)


def from_config(config, family: str = "") -> GradientPath:
    """The configured path; `family` (the model family's name, e.g. "sd3", "flux") picks the defaults of paths
    whose reference configs differ by model."""
    return path_class(config)(config, family)
