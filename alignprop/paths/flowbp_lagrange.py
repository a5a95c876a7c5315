"""FlowBP-Lagrange (`gradient_path="flowbp_lagrange"`): under construction in this change (the registry names it;
`check` refuses it until its module lands)."""

from __future__ import annotations

from alignprop.errors import UserError
from alignprop.paths.base import GradientPath


class FlowBPLagrange(GradientPath):
    name = "flowbp_lagrange"

    @staticmethod
    def check(config) -> None:
        raise UserError("gradient_path='flowbp_lagrange' is not available yet")
