"""Grids a person reads: captions wrapped (never cut to a few characters), before/after as pairs."""

import numpy as np
import pytest
import torch
from PIL import Image

from alignprop.evaluate import EvalResult
from alignprop.report import (
    CAPTION_LINES,
    CELL,
    PAIRS_PER_ROW,
    before_after_layout,
    caption_font,
    line_height,
    save_before_after,
    save_grid,
    text_width,
    wrap,
)

LONG = "a red circle on a blue background, photographed at dusk with a wide lens"


def result(count, value=0.0, prompt=LONG):
    images = torch.linspace(-1, 1, count).view(count, 1, 1, 1).expand(count, 3, 8, 8).clone() * (1 - value)
    return EvalResult([f"{i} {prompt}" for i in range(count)], images, torch.arange(count).float() + value, {})


def test_wrap_keeps_every_word_within_the_width():
    font = caption_font()
    lines = wrap(LONG, font, CELL - 4)
    assert " ".join(lines) == LONG  # nothing cut: "blue background" (the colour) survives
    assert len(lines) > 1 and all(text_width(line, font) <= CELL - 4 for line in lines)


def test_wrap_breaks_a_word_wider_than_the_cell_and_marks_a_cut_after_the_line_limit():
    font = caption_font()
    assert "".join(wrap("x" * 200, font, 60, max_lines=100)) == "x" * 200
    lines = wrap("word " * 500, font, CELL - 4)
    assert len(lines) == CAPTION_LINES and lines[-1].endswith("…")


def test_grid_is_tall_enough_for_the_wrapped_captions(tmp_path):
    save_grid([("", result(3))], tmp_path / "grid.png", columns=3)
    width, height = Image.open(tmp_path / "grid.png").size
    lines = len(wrap(f"0 {LONG}", caption_font(), CELL - 4)) + 1  # the prompt's lines + the reward
    assert width == 3 * CELL and height >= CELL + lines * line_height(caption_font())


@pytest.mark.parametrize("count", [1, 3, 30])
def test_before_after_is_a_grid_of_pairs(tmp_path, count):
    before, after = result(count), result(count, value=0.5)
    path = tmp_path / "before_after.png"
    save_before_after(before, after, path)
    canvas = np.asarray(Image.open(path).convert("RGB"))
    per_row = min(PAIRS_PER_ROW, count)
    rows = -(-count // per_row)
    assert canvas.shape[1] <= per_row * 2 * CELL + (per_row - 1) * 12  # 4 pairs wide, not a strip
    assert canvas.shape[0] > rows * CELL
    if count == 30:
        assert canvas.shape[1] < 1100 and canvas.shape[0] < 2 * canvas.shape[1]  # readable, not 3910 x 312
    caption = len(wrap(f"0 {LONG}", caption_font(), 2 * CELL - 4)) + 1
    _, _, positions = before_after_layout(count, caption * line_height(caption_font()) + 4)
    for index in (0, count - 1):  # each pair: before on the left, after on the right, same prompt
        left, top = positions[index]
        expected_before = ((before.images[index, :, 0, 0] + 1) * 127.5).round().numpy()
        expected_after = ((after.images[index, :, 0, 0] + 1) * 127.5).round().numpy()
        assert np.array_equal(canvas[top + CELL // 2, left + CELL // 2], expected_before)
        assert np.array_equal(canvas[top + CELL // 2, left + CELL + CELL // 2], expected_after)
