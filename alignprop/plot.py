"""Small line plots with error bars, drawn with PIL (no plotting library needed): one plot (`line_plot`, the soup
sweep) or a figure of panels, each with one or more series (`save_panels`: a run's curves, a comparison of runs)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 420  # one panel
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 55
TICKS = 5
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
ERROR_BAR = (120, 120, 120)
CHAR_WIDTH = 6  # pixels of one character of PIL's default font (to shorten category names)
MAX_MARKERS = 100  # a joined series with more points is drawn as a line only (thousands of dots are a blob)


@dataclass(frozen=True)
class Series:
    """Points (x, y) with optional +-error bars, joined by a line unless `joined` is False; `label`: its legend."""

    xs: list[float]
    ys: list[float]
    errors: list[float] | None = None
    label: str = ""
    joined: bool = True


@dataclass(frozen=True)
class Panel:
    """One plot of a figure. `categories`: the x axis names x = 0, 1, ... (e.g. runs) instead of numbers. `x_ticks`:
    ticks at exactly these x values (e.g. a sweep's coefficients) instead of evenly spaced ones. `y_limits`: the
    range the y axis and the error bars stay inside (e.g. the values a reward took), padding included."""

    title: str
    x_label: str
    y_label: str
    series: list[Series]
    categories: list[str] | None = None
    x_ticks: list[float] | None = None
    y_limits: tuple[float, float] | None = None


@dataclass(frozen=True)
class Axes:
    """A panel's axis ranges and ticks: (value, label) pairs."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:  # a single point or a flat line: give it some room
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def _bounds(series: Series) -> list[float]:
    errors = series.errors or [0.0] * len(series.ys)
    return [y + sign * e for y, e in zip(series.ys, errors) for sign in (-1, 1)]


def _clipped(span: tuple[float, float], limits: tuple[float, float] | None) -> tuple[float, float]:
    """`span` cut to `limits`; unchanged when that leaves nothing (limits of one value: every point is on it)."""
    if limits is None:
        return span
    low, high = max(span[0], limits[0]), min(span[1], limits[1])
    return (low, high) if high - low > 1e-12 else span


def axes(panel: Panel) -> Axes:
    """The ranges and ticks `draw_panel` draws for `panel`."""
    xs = [x for series in panel.series for x in series.xs]
    ys = [y for series in panel.series for y in _bounds(series)]
    if panel.categories is not None:
        x_range = (-0.5, len(panel.categories) - 0.5)
    else:
        x_range = _span(xs or [0.0])
    y_range = _clipped(_span(ys or [0.0]), panel.y_limits)
    if panel.categories is not None:
        x_ticks = [(float(i), name) for i, name in enumerate(panel.categories)]
    elif panel.x_ticks is not None:
        x_ticks = [(x, f"{x:g}") for x in panel.x_ticks]
    else:
        x_ticks = [(x_range[0] + (x_range[1] - x_range[0]) * i / TICKS, "") for i in range(TICKS + 1)]
        x_ticks = [(x, f"{x:.3g}") for x, _ in x_ticks]
    y_ticks = [y_range[0] + (y_range[1] - y_range[0]) * i / TICKS for i in range(TICKS + 1)]
    return Axes(x_range, y_range, x_ticks, [(y, f"{y:.4g}") for y in y_ticks])


def _shortened(name: str, width: float) -> str:
    characters = max(int(width // CHAR_WIDTH), 2)
    return name if len(name) <= characters else name[: characters - 1] + "…"


def draw_panel(canvas: Image.Image, left: int, top: int, panel: Panel) -> None:
    """`panel` in the WIDTH x HEIGHT box at (left, top) of `canvas`: frame, ticks, labels, series, legend."""
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    frame = axes(panel)
    (x_low, x_high), (y_low, y_high) = frame.x_range, frame.y_range
    plot_width, plot_height = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    to_x = lambda x: left + MARGIN_LEFT + (x - x_low) / (x_high - x_low) * plot_width
    to_y = lambda y: top + MARGIN_TOP + (y_high - y) / (y_high - y_low) * plot_height
    bottom = top + HEIGHT - MARGIN_BOTTOM

    draw.rectangle((left + MARGIN_LEFT, top + MARGIN_TOP, left + WIDTH - MARGIN_RIGHT, bottom), outline="black")
    slot = plot_width / max(len(frame.x_ticks), 1)
    for x_value, name in frame.x_ticks:
        x = to_x(x_value)
        text = _shortened(name, slot) if panel.categories is not None else name
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - len(text) * CHAR_WIDTH / 2, bottom + 6), text, fill="black", font=font)
    for y_value, text in frame.y_ticks:
        y = to_y(y_value)
        draw.line((left + MARGIN_LEFT - 4, y, left + MARGIN_LEFT, y), fill="black")
        draw.text((left + 4, y - 6), text, fill="black", font=font)
    draw.text((left + MARGIN_LEFT, top + 6), panel.title, fill="black", font=font)
    draw.text((left + MARGIN_LEFT + plot_width // 3, top + HEIGHT - 20), panel.x_label, fill="black", font=font)
    draw.text((left + 4, top + MARGIN_TOP - 16), panel.y_label, fill="black", font=font)

    for series, color in zip(panel.series, COLORS * len(panel.series)):
        points = [(to_x(x), to_y(y)) for x, y in zip(series.xs, series.ys)]
        if series.joined and len(points) > 1:
            draw.line(points, fill=color, width=2)
        for (px, py), y, error in zip(points, series.ys, series.errors or [0.0] * len(points)):
            if error:
                low, high = max(y - error, y_low), min(y + error, y_high)  # inside y_limits
                draw.line((px, to_y(low), px, to_y(high)), fill=ERROR_BAR, width=1)
            if not series.joined or len(points) <= MAX_MARKERS:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
    labelled = [(series.label, color) for series, color in zip(panel.series, COLORS * len(panel.series))]
    if len(panel.series) > 1:
        for row, (label, color) in enumerate(labelled):
            y = top + MARGIN_TOP + 8 + row * 14
            x = left + WIDTH - MARGIN_RIGHT - 16 - CHAR_WIDTH * len(label)
            draw.line((x - 16, y, x - 4, y), fill=color, width=2)
            draw.text((x, y - 6), label, fill="black", font=font)


def save_panels(panels: list[Panel], path: Path, columns: int = 2) -> None:
    """The panels in rows of `columns`, saved as one PNG."""
    columns = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    canvas = Image.new("RGB", (columns * WIDTH, rows * HEIGHT), "white")
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        draw_panel(canvas, column * WIDTH, row * HEIGHT, panel)
    canvas.save(path)


def line_plot(
    xs: list[float],
    ys: list[float],
    errors: list[float],
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    x_ticks: list[float] | None = None,
    y_limits: tuple[float, float] | None = None,
) -> None:
    """Points (x, y) joined by a line, each with a +-error bar; axes with tick labels; saved as PNG. `x_ticks`,
    `y_limits`: as `Panel`'s."""
    panel = Panel(title, x_label, y_label, [Series(xs, ys, errors)], x_ticks=x_ticks, y_limits=y_limits)
    save_panels([panel], path, columns=1)
