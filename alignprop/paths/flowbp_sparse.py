"""FlowBP-Sparse (`gradient_path="flowbp_sparse"`): under construction in this change (the registry names it; `check`
refuses it until its module lands)."""

from __future__ import annotations

from alignprop.errors import UserError
from alignprop.paths.base import GradientPath


class FlowBPSparse(GradientPath):
    name = "flowbp_sparse"

    @staticmethod
    def check(config) -> None:
        raise UserError("gradient_path='flowbp_sparse' is not available yet")
