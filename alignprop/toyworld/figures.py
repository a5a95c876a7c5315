"""Figures for toy-world results, drawn with PIL: labelled image grids and multi-line curves."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def to_pil(image: torch.Tensor, cell: int) -> Image.Image:
    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)


def image_grid(rows: list[tuple[str, torch.Tensor]], path: Path, column_titles: list[str] = (), cell: int = 80) -> None:
    """One labelled row of images per entry; optional titles (up to 3 lines) above the columns."""
    label_width, title_height = 130, 40 if column_titles else 0
    columns = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (label_width + columns * (cell + 4), title_height + len(rows) * (cell + 4)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, title in enumerate(column_titles):
        for line, text in enumerate(title.split("\n")[:3]):
            draw.text((label_width + c * (cell + 4), 2 + 12 * line), text[:14], fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        top = title_height + r * (cell + 4)
        draw.text((4, top + cell // 2 - 6), label, fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(to_pil(image, cell), (label_width + c * (cell + 4), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and up to `window - 1` before it (noisy per-batch curves read better)."""
    means = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1) : i + 1]
        means.append(sum(recent) / len(recent))
    return means


def curves(series: dict[str, tuple[list[float], list[float]]], path: Path, title: str, y_label: str) -> None:
    """Several lines (label -> xs, ys) on shared axes, with a legend."""
    width, height, left, right, top, bottom = 640, 400, 60, 150, 30, 40
    xs = [x for values, _ in series.values() for x in values]
    ys = [y for _, values in series.values() for y in values]
    x_low, x_high = min(xs), max(xs) + 1e-9
    pad = (max(ys) - min(ys)) * 0.05 + 1e-6
    y_low, y_high = min(ys) - pad, max(ys) + pad
    to_x = lambda x: left + (x - x_low) / (x_high - x_low) * (width - left - right)  # noqa: E731
    to_y = lambda y: top + (y_high - y) / (y_high - y_low) * (height - top - bottom)  # noqa: E731
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for i in range(5):
        y_value, x_value = y_low + (y_high - y_low) * i / 4, x_low + (x_high - x_low) * i / 4
        draw.text((4, to_y(y_value) - 6), f"{y_value:.3g}", fill="black", font=font)
        x_text = f"{x_value:.0f}" if x_high - x_low >= 10 else f"{x_value:.3g}"
        draw.text((to_x(x_value) - 6, height - bottom + 4), x_text, fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    draw.text((4, top - 14), y_label, fill="black", font=font)
    draw.text((width // 2 - 60, height - 18), "optimizer update", fill="black", font=font)
    for k, (label, (x_values, y_values)) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [(to_x(x), to_y(y)) for x, y in zip(x_values, y_values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.line((width - right + 10, top + 10 + 16 * k, width - right + 30, top + 10 + 16 * k), fill=colour, width=3)
        draw.text((width - right + 34, top + 4 + 16 * k), label, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
