import torch
from PIL import Image

from alignprop.toyworld.figures import curves, image_grid, running_mean


def test_running_mean_averages_the_recent_window():
    assert running_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_figures_are_written(tmp_path):
    images = torch.zeros(3, 3, 32, 32)
    image_grid([("base", images), ("after", images)], tmp_path / "grid.png", column_titles=["a\nb"] * 3, cell=40)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[1] >= 2 * 40
    curves({"one": ([1, 2, 3], [0.1, 0.5, 0.2]), "two": ([1, 2], [0.3, 0.4])}, tmp_path / "c.png", "title", "y")
    assert (tmp_path / "c.png").stat().st_size > 0
