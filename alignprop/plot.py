"""A small line plot with error bars, drawn with PIL (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 55
TICKS = 5


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:  # a single point or a flat line: give it some room
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def line_plot(
    xs: list[float],
    ys: list[float],
    errors: list[float],
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
) -> None:
    """Points (x, y) joined by a line, each with a +-error bar; axes with tick labels; saved as PNG."""
    x_low, x_high = _span(xs)
    y_low, y_high = _span([y - e for y, e in zip(ys, errors)] + [y + e for y, e in zip(ys, errors)])
    plot_width, plot_height = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    to_x = lambda x: MARGIN_LEFT + (x - x_low) / (x_high - x_low) * plot_width
    to_y = lambda y: MARGIN_TOP + (y_high - y) / (y_high - y_low) * plot_height

    canvas = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.rectangle((MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM), outline="black")
    for i in range(TICKS + 1):
        x_value = x_low + (x_high - x_low) * i / TICKS
        y_value = y_low + (y_high - y_low) * i / TICKS
        x, y = to_x(x_value), to_y(y_value)
        draw.line((x, HEIGHT - MARGIN_BOTTOM, x, HEIGHT - MARGIN_BOTTOM + 4), fill="black")
        draw.text((x - 12, HEIGHT - MARGIN_BOTTOM + 6), f"{x_value:.3g}", fill="black", font=font)
        draw.line((MARGIN_LEFT - 4, y, MARGIN_LEFT, y), fill="black")
        draw.text((4, y - 6), f"{y_value:.4g}", fill="black", font=font)
    draw.text((MARGIN_LEFT, 6), title, fill="black", font=font)
    draw.text((MARGIN_LEFT + plot_width // 3, HEIGHT - 20), x_label, fill="black", font=font)
    draw.text((4, MARGIN_TOP - 16), y_label, fill="black", font=font)

    points = [(to_x(x), to_y(y)) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for (px, py), y, error in zip(points, ys, errors):
        draw.line((px, to_y(y - error), px, to_y(y + error)), fill=(120, 120, 120), width=1)
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=(31, 119, 180))
    canvas.save(path)
