"""Fixtures of the toy-world tests."""

import pytest

from alignprop.toyworld.data import rendered_dataset


@pytest.fixture(scope="session")
def rendered():
    """300 rendered scenes from a seed no shipped model was trained on."""
    return rendered_dataset(300, seed=4242)
