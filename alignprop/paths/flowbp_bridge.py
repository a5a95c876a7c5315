"""FlowBP-Bridge (`gradient_path="flowbp_bridge"`): under construction in this change (the registry names it; `check`
refuses it until its module lands)."""

from __future__ import annotations

from alignprop.errors import UserError
from alignprop.paths.base import GradientPath


class FlowBPBridge(GradientPath):
    name = "flowbp_bridge"

    @staticmethod
    def check(config) -> None:
        raise UserError("gradient_path='flowbp_bridge' is not available yet")
