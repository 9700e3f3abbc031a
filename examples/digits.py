"""Find handwritten digits on a larger canvas with a converted classifier, offline.

A small Flatten + Dense CNN is trained for a few seconds on scikit-learn's
bundled 8x8 digits (plus a "background" class of blank patches and off-centre
digit fragments), converted to a fully convolutional network, and run once on
a canvas holding several held-out digits. Every map cell is the classifier on
one 8x8 window (stride 2); the picture marks the digits found and their class.

Run::

    python examples/digits.py -o digits.png
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402

SIDE = 8  # the digits are 8 x 8
BACKGROUND = 10  # class index of "no digit centred here"
CLASS_NAMES = [str(d) for d in range(10)] + ["background"]
NOISE = 0.08  # background noise level of the canvas (pixels in [0, 1])


@dataclass(frozen=True)
class Placed:
    """A digit put on the canvas: its true class and its window's top-left corner."""

    label: int
    top: int
    left: int


def load_digits(seed: int = 0, held_out: int = 200):
    """scikit-learn's 8x8 digits in [0, 1], split into training and held-out digits."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = (data.images / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:held_out], order[held_out:]
    return (images[train], data.target[train]), (images[test], data.target[test])


def background_patches(digits, rng, count: int) -> np.ndarray:
    """Windows with no centred digit: noise alone, or a digit shifted off-centre by at least 2 pixels (one stride)."""
    patches = rng.uniform(0, NOISE, (count, SIDE, SIDE)).astype(np.float32)
    for patch in patches[count // 4 :]:
        digit = digits[rng.integers(len(digits))]
        dy, dx = rng.integers(-6, 7, size=2)
        while max(abs(dy), abs(dx)) < 2:
            dy, dx = rng.integers(-6, 7, size=2)
        canvas = np.zeros((3 * SIDE, 3 * SIDE), np.float32)
        canvas[SIDE + dy : 2 * SIDE + dy, SIDE + dx : 2 * SIDE + dx] = digit
        np.maximum(patch, canvas[SIDE : 2 * SIDE, SIDE : 2 * SIDE], out=patch)
    return patches


def build_classifier() -> keras.Sequential:
    """valid 3x3 convolutions, a 2x2 pooling, Flatten and two Dense layers: 8x8 -> 11 classes."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((SIDE, SIDE, 1), name="digit"),
            layers.Conv2D(32, 3, activation="relu", name="conv1"),
            layers.Conv2D(32, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(2, name="pool"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="fc1"),
            layers.Dense(len(CLASS_NAMES), activation="softmax", name="classes"),
        ],
        name="digits_cnn",
    )


def train_classifier(train, seed: int = 0, epochs: int = 12) -> keras.Sequential:
    """Train on the digits (with a little noise) plus as many background patches."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels = train
    noisy = np.maximum(images, rng.uniform(0, NOISE, images.shape).astype(np.float32))
    background = background_patches(images, rng, len(images))
    x = np.concatenate([noisy, background])[..., None]
    y = np.concatenate([labels, np.full(len(background), BACKGROUND)])
    model = build_classifier()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=epochs, shuffle=True, verbose=0)
    return model


def make_canvas(test, count: int = 15, size=(56, 96), seed: int = 1):
    """Held-out digits (each class in turn) on a noisy canvas, at even coordinates (the stride), not touching."""
    rng = np.random.default_rng(seed)
    canvas = rng.uniform(0, NOISE, size).astype(np.float32)
    images, labels = test
    placed: list[Placed] = []
    while len(placed) < count:
        top = 2 * int(rng.integers(0, (size[0] - SIDE) // 2 + 1))
        left = 2 * int(rng.integers(0, (size[1] - SIDE) // 2 + 1))
        if any(abs(top - p.top) < SIDE + 2 and abs(left - p.left) < SIDE + 2 for p in placed):
            continue
        wanted = len(placed) % 10  # every class in turn, each time the next held-out example of it
        index = np.flatnonzero(labels == wanted)[len(placed) // 10]
        canvas[top : top + SIDE, left : left + SIDE] = np.maximum(
            canvas[top : top + SIDE, left : left + SIDE], images[index]
        )
        placed.append(Placed(wanted, top, left))
    return canvas, placed


def classes_at_digits(probabilities, grid, placed) -> list[int]:
    """The map's class at each placed digit's own cell (its window is the digit's 8x8 square)."""
    stride = grid.stride
    return [int(np.argmax(probabilities[p.top // stride[0], p.left // stride[1]])) for p in placed]


def detections(probabilities, grid, threshold: float = 0.5):
    """Cells whose most likely class is a digit, kept where their confidence is a local maximum."""
    digit_score = 1 - probabilities[..., BACKGROUND]
    found = []
    rows, cols = digit_score.shape
    for i in range(rows):
        for j in range(cols):
            score = digit_score[i, j]
            if score < threshold:
                continue
            neighbours = digit_score[max(i - 2, 0) : i + 3, max(j - 2, 0) : j + 3]
            if score >= neighbours.max():
                top, left, bottom, right = grid.input_box(i, j)
                label = int(np.argmax(probabilities[i, j, :BACKGROUND]))
                found.append((label, float(score), (top, left, bottom, right)))
    return found


def picture(canvas, probabilities, grid, placed, scale: int = 8) -> Image.Image:
    """Detections over the canvas (green: right class, red: wrong or spurious) above the class map."""
    shown = Image.fromarray((canvas * 255).round().astype(np.uint8)).convert("RGB")
    shown = shown.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(shown)
    font = ImageFont.load_default(size=14)
    truth = {(p.top, p.left): p.label for p in placed}
    for label, score, (top, left, bottom, right) in detections(probabilities, grid):
        color = "lime" if truth.get((top, left)) == label else "red"
        draw.rectangle([left * scale, top * scale, right * scale - 1, bottom * scale - 1], outline=color, width=2)
        draw.text((left * scale + 3, top * scale + 1), f"{label} {score:.2f}", fill=color, font=font)
    first = placed[0].label
    style = kfs.HeatmapStyle(scale=scale // 2)
    class_map = kfs.heatmap(canvas, probabilities, grid, first, class_names=CLASS_NAMES, style=style)
    figure = Image.new("RGB", (max(shown.width, class_map.width), shown.height + class_map.height), "white")
    figure.paste(shown, (0, 0))
    figure.paste(class_map, (0, shown.height))
    return figure


def run(seed: int = 0):
    """Train, convert, build the canvas and compute its map; returns everything the picture and tests need."""
    train, test = load_digits(seed)
    classifier = train_classifier(train, seed)
    fcn = kfs.convert(classifier)
    canvas, placed = make_canvas(test, seed=seed + 1)
    probabilities = kfs.predict_map(fcn, canvas[..., None])
    grid = kfs.geometry(fcn, canvas.shape)
    return canvas, placed, probabilities, grid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="digits.png", help="PNG to write (default digits.png)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    canvas, placed, probabilities, grid = run(args.seed)
    found = classes_at_digits(probabilities, grid, placed)
    right = sum(f == p.label for f, p in zip(found, placed))
    print(f"geometry: {grid}")
    print(f"class at each digit's cell: {right}/{len(placed)} right")
    for p, f in zip(placed, found):
        print(f"  digit {p.label} at ({p.top}, {p.left}): map says {CLASS_NAMES[f]}")
    picture(canvas, probabilities, grid, placed).save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
