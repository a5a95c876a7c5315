"""The caption grammar: "a red circle on a blue background", and its inverse.

Captions state the three named attributes of a scene (shape, its colour, the background colour); size
and position are left free. `parse` reads those attributes back from a prompt, which is how the checker
and the rewards know what was asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alignprop.toyworld.world import COLOURS, SHAPES, Scene

TEMPLATE = "a {colour} {shape} on a {background} background"
_PATTERN = re.compile(
    rf"^\s*an? (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
    rf" on an? (?P<background>{'|'.join(COLOURS)}) background\s*$"
)


@dataclass(frozen=True)
class Request:
    """What a prompt asks for."""

    shape: str
    colour: str
    background: str


def caption(shape: str, colour: str, background: str) -> str:
    return TEMPLATE.format(shape=shape, colour=colour, background=background)


def scene_caption(scene: Scene) -> str:
    return caption(scene.shape, scene.colour, scene.background)


def parse(prompt: str) -> Request:
    """The request a caption makes; ValueError for text outside the grammar."""
    match = _PATTERN.match(prompt.lower())
    if match is None:
        raise ValueError(f"{prompt!r} is not a toy-world caption like {caption('circle', 'red', 'blue')!r}")
    return Request(**match.groupdict())


def grammar_words() -> list[str]:
    """Every word a caption can contain."""
    return sorted({*TEMPLATE.format(shape="", colour="", background="").split(), "an", *COLOURS, *SHAPES})
