"""What an evaluation leaves for a person: one PNG per image, captioned grids, a JSON summary, tracker logs.

Captions are the prompt, word-wrapped to the cell's width (at most `CAPTION_LINES` lines; the whole prompt is
always in summary.json), and the reward. `save_before_after` lays a training run's two evaluations out as
before/after pairs, several pairs per row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from alignprop.errors import UserError
from alignprop.rundir import slugify

if TYPE_CHECKING:
    from alignprop.evaluate import EvalResult

SETTINGS = ("seed", "steps", "guidance_scale", "eta", "update", "num_images")  # in a summary, not a series
SLUG_LENGTH = 48  # characters of the prompt in an image's file name
GRID_COLUMNS = 8
CELL = 128  # pixels of one image in a grid
CAPTION_LINES = 8  # wrapped prompt lines under an image at most (then "…")
PAIRS_PER_ROW = 4  # before_after.png: before/after pairs side by side per row
PAIR_GAP = 12  # pixels between two pairs
PADDING = 2


def image_file_name(index: int, prompt: str) -> str:
    """Index (unique) + a short slug of the prompt (safe whatever the prompt holds)."""
    return f"{index:04d}_{slugify(prompt, max_length=SLUG_LENGTH)}.png"


def to_pil(image: torch.Tensor) -> Image.Image:
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def drawable(text: str, font) -> str:
    """PIL's bitmap fallback font only knows latin-1; FreeType fonts draw any text."""
    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def caption_font():
    return ImageFont.load_default()


def line_height(font) -> int:
    return font.getbbox("Ag")[3] + 2


def text_width(text: str, font) -> float:
    return font.getlength(drawable(text, font))


def wrap(text: str, font, width: float, max_lines: int = CAPTION_LINES) -> list[str]:
    """`text` in lines of at most `width` pixels, broken between words (inside a word only when it alone is too
    wide); beyond `max_lines` the last line ends in "…"."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and text_width(candidate, font) <= width:
            lines[-1] = candidate
            continue
        piece = ""
        for char in word:  # a word wider than the cell: break it
            if piece and text_width(piece + char, font) > width:
                lines.append(piece)
                piece = ""
            piece += char
        lines.append(piece)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and text_width(last + "…", font) > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + "…"]
    return lines or [""]


def caption(prompt: str, reward: str, font, width: float) -> list[str]:
    return [*wrap(prompt, font, width), reward]


def draw_lines(draw, lines: list[str], left: int, top: int, font) -> None:
    for index, line in enumerate(lines):
        draw.text(
            (left + PADDING, top + PADDING + index * line_height(font)), drawable(line, font), fill="black", font=font
        )


def save_grid(rows: list[tuple[str, EvalResult]], path: Path, cell: int = CELL, columns: int | None = None) -> None:
    """One row per result (labelled, e.g. "base"), wrapped every `columns` images; caption: prompt, reward."""
    font = caption_font()
    columns = columns or max(len(result.prompts) for _, result in rows)
    label_width = 70 if any(label for label, _ in rows) else 0
    captions = [
        [
            caption(prompt, f"{reward.item():.3g}", font, cell - 2 * PADDING)
            for prompt, reward in zip(r.prompts, r.rewards)
        ]
        for _, r in rows
    ]
    lines = max((len(c) for row in captions for c in row), default=1)
    caption_height = lines * line_height(font) + 2 * PADDING
    row_lines = [math.ceil(len(result.prompts) / columns) for _, result in rows]
    size = (label_width + columns * cell, max(sum(row_lines), 1) * (cell + caption_height))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    first_line = 0
    for (label, result), row_captions, line_count in zip(rows, captions, row_lines):
        top = first_line * (cell + caption_height)
        draw.text((4, top + cell // 2), drawable(label, font), fill="black", font=font)
        for i, (image, text) in enumerate(zip(result.images, row_captions)):
            left = label_width + (i % columns) * cell
            cell_top = top + (i // columns) * (cell + caption_height)
            canvas.paste(to_pil(image).resize((cell, cell), Image.NEAREST), (left, cell_top))
            draw_lines(draw, text, left, cell_top + cell, font)
        first_line += line_count
    canvas.save(path)


def before_after_layout(count: int, caption_height: int, cell: int = CELL, pairs_per_row: int = PAIRS_PER_ROW):
    """(canvas size, header height, [(left, top) of each pair]) of `save_before_after`."""
    per_row = max(1, min(pairs_per_row, count))
    header = line_height(caption_font()) + 2 * PADDING + 2
    pair_width, row_height = 2 * cell, cell + caption_height
    positions = [
        (column * (pair_width + PAIR_GAP), header + row * (row_height + PAIR_GAP))
        for row, column in (divmod(i, per_row) for i in range(count))
    ]
    rows = math.ceil(count / per_row)
    size = (per_row * pair_width + (per_row - 1) * PAIR_GAP, header + rows * row_height + max(rows - 1, 0) * PAIR_GAP)
    return size, header, positions


def save_before_after(
    before: EvalResult, after: EvalResult, path: Path, cell: int = CELL, pairs_per_row: int = PAIRS_PER_ROW
) -> None:
    """Pairs (before | after) of the same prompt and latent, `pairs_per_row` pairs per row; under each pair its
    prompt and the reward before -> after."""
    font = caption_font()
    captions = [
        caption(prompt, f"{b.item():.3g} -> {a.item():.3g}", font, 2 * cell - 2 * PADDING)
        for prompt, b, a in zip(before.prompts, before.rewards, after.rewards)
    ]
    caption_height = max((len(c) for c in captions), default=1) * line_height(font) + 2 * PADDING
    size, _, positions = before_after_layout(len(captions), caption_height, cell, pairs_per_row)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw_lines(draw, ["each pair: before | after training; reward before -> after"], 0, 0, font)
    for (left, top), first, second, text in zip(positions, before.images, after.images, captions):
        canvas.paste(to_pil(first).resize((cell, cell), Image.NEAREST), (left, top))
        canvas.paste(to_pil(second).resize((cell, cell), Image.NEAREST), (left + cell, top))
        draw_lines(draw, text, left, top + cell, font)
    canvas.save(path)


def write_evaluation(result: EvalResult, directory: Path, context: dict, max_images: int | None = None) -> dict:
    """directory/images/<index>_<slug>.png (the first `max_images`), grid.png and summary.json (the context, the
    images' resolution, the statistics, then per image: index, prompt, file, reward, metrics).

    Returns the summary (the statistics always cover every image, saved or not).
    """
    shown = result.head(max_images)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for index, (image, prompt) in enumerate(zip(shown.images, shown.prompts)):
        files.append(f"images/{image_file_name(index, prompt)}")
        to_pil(image).save(directory / files[-1])
    save_grid([("", shown)], directory / "grid.png", columns=min(GRID_COLUMNS, max(len(files), 1)))
    resolution = list(result.images.shape[-2:])  # height, width: evaluations at different sizes do not pair
    summary = {**context, "resolution": resolution, "num_images": len(result.prompts), **result.summary()}
    per_image = []
    for index, prompt in enumerate(result.prompts):
        entry = {"index": index, "prompt": prompt, "file": files[index] if index < len(files) else None}
        entry["reward"] = result.rewards[index].item()
        entry.update({name: values[index].item() for name, values in result.metrics.items()})
        per_image.append(entry)
    (directory / "summary.json").write_text(json.dumps({**summary, "images": per_image}, indent=2) + "\n")
    return summary


def log_to_trackers(accelerator, prefix: str, summary: dict, grid: Path | None, step: int) -> None:
    """Scalars (numbers of the summary, not the settings: those are the logged config) and the grid image
    to every tracker (wandb, tensorboard)."""
    scalars = {
        f"{prefix}/{k}": v
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SETTINGS
    }
    if scalars:
        accelerator.log(scalars, step=step)
    if grid is None or not accelerator.is_main_process:
        return
    image = np.asarray(Image.open(grid).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({f"{prefix}/grid": image[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({f"{prefix}/grid": [image]}, step=step)


# --- reading a summary back (alignprop compare, eval_all_checkpoints) ----------------------------------------

NOT_METRICS = {"index", "prompt", "file"}  # the other fields of a summary's per-image entries


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def per_image_metrics(summary: dict, where: Path | str) -> dict[str, np.ndarray]:
    """Every number of a summary's per-image entries; "reward" is named by its reward_fn (two rewards never share a
    row). `where`: the summary's file, named when an entry lacks a number."""
    entries = summary["images"]
    names = [key for key, value in entries[0].items() if key not in NOT_METRICS and is_number(value)]
    metrics = {}
    for name in names:
        if not all(is_number(entry.get(name)) for entry in entries):
            raise UserError(f"{where}: {name!r} is missing or not a number for some images")
        shown = f"reward ({summary['reward_fn']})" if name == "reward" and summary.get("reward_fn") else name
        metrics[shown] = np.array([float(entry[name]) for entry in entries])
    return metrics


def mean_and_standard_error(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); NaN for one value)."""
    if len(values) < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
