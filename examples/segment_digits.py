"""Segment handwritten digits with FCN-32s and FCN-8s built from a small digits classifier, offline.

scikit-learn's bundled 8x8 digits are placed on larger noisy canvases: every
stroke pixel carries its digit's class, every other pixel is background, so
the per-pixel labels are exact. A small classifier (three 2x2 poolings: stride
8) is trained on single digits and background patches, converted, and turned
into two segmenters: FCN-32s-like (no skips: one 8x upsampling) and FCN-8s-like
(skips from pool2 and pool1). Both are fine-tuned with the same short schedule
and scored by mean IU (intersection over union, averaged over the 11 classes)
on held-out canvases. The picture shows input, ground truth and both
predictions.

Run::

    python examples/segment_digits.py -o segment_digits.png
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402
from keras_fcn_surgery.inference.pictures import label_colors  # noqa: E402

SIDE = 8
BACKGROUND = 10
CLASS_NAMES = [str(d) for d in range(10)] + ["background"]
NOISE = 0.1
STROKE = 0.3  # a digit pixel at least this bright (of 1) is stroke


@dataclass(frozen=True)
class Schedule:
    """How much data and training: the full example, or a short one for tests."""

    classifier_epochs: int = 10
    train_canvases: int = 600
    test_canvases: int = 150
    epochs: int = 8
    canvas: int = 40
    learning_rate: float = 5e-3


SHORT = Schedule(classifier_epochs=2, train_canvases=48, test_canvases=16, epochs=1, canvas=32)


def load_digits(seed: int = 0, held_out: int = 400):
    """scikit-learn's 8x8 digits in [0, 1], split into training and held-out digits."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = (data.images / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:held_out], order[held_out:]
    return (images[train], data.target[train]), (images[test], data.target[test])


def build_classifier() -> keras.Sequential:
    """Three conv + 2x2 pooling stages on an 8x8 digit (stride 8), then Flatten and two Dense layers."""
    layers = keras.layers
    stack: list = [keras.Input((SIDE, SIDE, 1), name="digit")]
    for stage, filters in enumerate((16, 32, 32), start=1):
        stack.append(layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{stage}"))
        stack.append(layers.MaxPooling2D(2, name=f"pool{stage}"))
    stack += [
        layers.Flatten(name="flatten"),
        layers.Dense(64, activation="relu", name="fc"),
        layers.Dense(len(CLASS_NAMES), activation="softmax", name="classes"),
    ]
    return keras.Sequential(stack, name="digits_classifier")


def train_classifier(train, schedule: Schedule, seed: int = 0) -> keras.Sequential:
    """Digits (with noise) and as many background patches (noise, or a digit shifted half out)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels = train
    noisy = np.maximum(images, rng.uniform(0, NOISE, images.shape).astype(np.float32))
    background = rng.uniform(0, NOISE, images.shape).astype(np.float32)
    for patch in background[len(background) // 2 :]:
        shift = rng.integers(4, 8) * rng.choice([-1, 1], 2)
        patch[:] = np.maximum(patch, np.roll(images[rng.integers(len(images))], shift, axis=(0, 1)))
    x = np.concatenate([noisy, background])[..., None]
    y = np.concatenate([labels, np.full(len(background), BACKGROUND)])
    model = build_classifier()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=schedule.classifier_epochs, shuffle=True, verbose=0)
    return model


def make_canvases(digits, count: int, size: int, seed: int, per_canvas: int = 3):
    """Noisy canvases with non-overlapping digits anywhere; labels: digit class on stroke pixels, else background."""
    rng = np.random.default_rng(seed)
    images, classes = digits
    x = rng.uniform(0, NOISE, (count, size, size)).astype(np.float32)
    y = np.full((count, size, size), BACKGROUND, np.int32)
    for canvas, labels in zip(x, y):
        taken: list[tuple[int, int]] = []
        for _ in range(50 * per_canvas):
            if len(taken) == per_canvas:
                break
            top, left = (int(v) for v in rng.integers(0, size - SIDE + 1, 2))
            if any(abs(top - t) < SIDE and abs(left - c) < SIDE for t, c in taken):
                continue
            index = int(rng.integers(len(images)))
            window = (slice(top, top + SIDE), slice(left, left + SIDE))
            canvas[window] = np.maximum(canvas[window], images[index])
            labels[window][images[index] >= STROKE] = classes[index]
            taken.append((top, left))
    return x[..., None], y


def fine_tune(classifier, skips, train, schedule: Schedule, seed: int = 0) -> keras.Model:
    """The classifier's own 11 classes as logits, upsampled to pixels; backbone and skips trained."""
    keras.utils.set_random_seed(seed)
    model = kfs.segmenter(classifier, skips=skips)
    model.compile(keras.optimizers.Adam(schedule.learning_rate), kfs.segmentation_loss(), jit_compile=False)
    x, y = train
    model.fit(x, y, batch_size=16, epochs=schedule.epochs, shuffle=True, verbose=0)
    return model


def mean_iu(model, test) -> float:
    """Mean intersection over union over the classes present, as `keras.metrics.MeanIoU`."""
    x, y = test
    metric = keras.metrics.MeanIoU(num_classes=len(CLASS_NAMES), sparse_y_pred=False, ignore_class=255)
    metric.update_state(y, model.predict(x, batch_size=32, verbose=0))
    return float(metric.result())


def picture(test, predictions: dict, rows: int = 3, scale: int = 4) -> Image.Image:
    """One row per canvas: input, ground truth, then each model's argmax labels."""
    x, y = test
    titles = ["input", "ground truth", *predictions]
    size = x.shape[1] * scale
    header = 18
    figure = Image.new("RGB", (len(titles) * (size + 4), header + rows * (size + 4)), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default(size=12)
    for column, title in enumerate(titles):
        draw.text((column * (size + 4) + 2, 2), title, fill="black", font=font)
    for row in range(rows):
        panels = [np.repeat((x[row, ..., 0] * 255).round().astype(np.uint8)[..., None], 3, axis=-1)]
        panels.append(label_colors(y[row]))
        panels += [label_colors(p[row]) for p in predictions.values()]
        for column, panel in enumerate(panels):
            shown = Image.fromarray(panel).resize((size, size), Image.Resampling.NEAREST)
            figure.paste(shown, (column * (size + 4), header + row * (size + 4)))
    return figure


def run(schedule: Schedule = Schedule(), seed: int = 0) -> dict:
    """Train, convert, fine-tune both segmenters; returns their mean IU, the models and the test canvases."""
    train_digits, test_digits = load_digits(seed)
    classifier = train_classifier(train_digits, schedule, seed)
    train = make_canvases(train_digits, schedule.train_canvases, schedule.canvas, seed + 1)
    test = make_canvases(test_digits, schedule.test_canvases, schedule.canvas, seed + 2)
    results: dict = {"test": test, "models": {}, "mean_iu": {}, "seconds": {}}
    for name, skips in (("FCN-32s", ()), ("FCN-8s", "auto")):
        start = time.perf_counter()
        model = fine_tune(classifier, skips, train, schedule, seed)
        results["seconds"][name] = time.perf_counter() - start
        results["models"][name] = model
        results["mean_iu"][name] = mean_iu(model, test)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="segment_digits.png", help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short", action="store_true", help="the shortened schedule the tests run")
    args = parser.parse_args(argv)
    results = run(SHORT if args.short else Schedule(), args.seed)
    for name, value in results["mean_iu"].items():
        print(f"{name}: mean IU {value:.3f} (fine-tuned in {results['seconds'][name]:.1f} s)")
    x, _ = results["test"]
    predictions = {name: model.predict(x[:3], verbose=0).argmax(-1) for name, model in results["models"].items()}
    picture(results["test"], predictions).save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
