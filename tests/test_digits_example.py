"""examples/digits.py: a classifier trained on real digits, converted, finds digits on a canvas."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits.py"
# The stated share: at least this many placed digits get their own class at their own cell.
REQUIRED_SHARE = 0.8


@pytest.fixture(scope="module")
def digits():
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(digits):
    return digits.run(seed=0)


def test_the_map_names_each_digit_at_its_position(digits, result):
    canvas, placed, probabilities, grid = result
    assert grid.stride == (2, 2) and grid.receptive_field == (8, 8)
    found = digits.classes_at_digits(probabilities, grid, placed)
    right = sum(f == p.label for f, p in zip(found, placed))
    assert len(placed) >= 10 and len({p.label for p in placed}) == 10
    assert right >= REQUIRED_SHARE * len(placed), f"{right}/{len(placed)} digits named right: {found}"


def test_empty_canvas_is_background(digits, result):
    canvas, placed, probabilities, grid = result
    rows, cols = probabilities.shape[:2]
    empty = [
        (i, j)
        for i in range(rows)
        for j in range(cols)
        if not any(abs(2 * i - p.top) < 10 and abs(2 * j - p.left) < 10 for p in placed)
    ]
    winners = np.array([np.argmax(probabilities[i, j]) for i, j in empty])
    assert np.mean(winners == digits.BACKGROUND) >= 0.9


def test_the_picture_is_written(digits, result, tmp_path):
    canvas, placed, probabilities, grid = result
    figure = digits.picture(canvas, probabilities, grid, placed)
    path = tmp_path / "digits.png"
    figure.save(path)
    with Image.open(path) as written:
        assert written.width >= canvas.shape[1] * 8 and written.height > canvas.shape[0] * 8
