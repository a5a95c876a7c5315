"""LeapAlign (`gradient_path="leapalign"`): under construction in this change (the registry names it; `check`
refuses it until its module lands)."""

from __future__ import annotations

from alignprop.errors import UserError
from alignprop.paths.base import GradientPath


class LeapAlign(GradientPath):
    name = "leapalign"

    @staticmethod
    def check(config) -> None:
        raise UserError("gradient_path='leapalign' is not available yet")
