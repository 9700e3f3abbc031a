"""GeoJSON of a classifier's map on a 6000 x 6000 slide at stride 4: one feature per cell against regions (issue 28).

The slide is tissue (tiles of scikit-image's bundled immunohistochemistry
picture, flipped and rotated at random) in an ellipse on bright glass. Its
score map is the one a small random-weight FCN with stride 4 and a 32-pixel
window computes (per-cell mean and spread of the colours over the window, a
fixed random linear layer to K logits), built here with numpy rather than run
through TensorFlow; cells on glass are NaN, as ``--mask auto`` leaves them.
That map goes through the real writer (`batch.writers.write_geojson`) twice:
``geojson="cells"`` (one detection per cell, the output before issue 28) and
``geojson="regions"`` (one polygon per connected region of neighbouring cells
with the same top class, the default). With ``--noise S`` the logits get
Gaussian noise of S (in logit units, their spread is about 1): a speckled map,
the hard case for regions. Prints file size, feature count and write time
side by side.

Run (about a minute on 2 CPU cores)::

    python benchmarks/geojson_size.py [--side 6000] [--stride 4] [--classes 4] [--noise 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

WINDOW = 32


def slide_pixels(side: int, seed: int = 0) -> np.ndarray:
    """Tiles of the bundled immunohistochemistry picture inside an ellipse covering about 30%; glass elsewhere."""
    from skimage import data

    rng = np.random.default_rng(seed)
    tile = data.immunohistochemistry()  # 512 x 512 RGB, bundled with scikit-image
    size = tile.shape[0]
    count = -(-side // size)
    rows = []
    for _ in range(count):
        row = [np.rot90(tile[:, :: rng.choice([-1, 1])], int(rng.integers(4))) for _ in range(count)]
        rows.append(np.concatenate(row, axis=1))
    pixels = np.concatenate(rows, axis=0)[:side, :side]
    ys = (np.arange(side) / side)[:, None]
    xs = (np.arange(side) / side)[None, :]
    tissue = ((ys - 0.45) / 0.33) ** 2 + ((xs - 0.5) / 0.29) ** 2 < 1
    glass = np.full(3, 236, np.uint8)
    return np.where(tissue[..., None], pixels, glass)


def score_map(pixels: np.ndarray, stride: int, classes: int, noise: float, seed: int = 0) -> np.ndarray:
    """``(H', W', K)`` logits of windows of WINDOW pixels every ``stride`` pixels; NaN where the window is glass."""
    rng = np.random.default_rng(seed)
    side = pixels.shape[0] // stride * stride
    values = pixels[:side, :side].astype(np.float32) / 255
    features = np.concatenate([values, values**2], axis=-1)
    pooled = features.reshape(side // stride, stride, side // stride, stride, -1).mean(axis=(1, 3))
    cells = WINDOW // stride
    summed = pooled.cumsum(0).cumsum(1)
    summed = np.pad(summed, ((1, 0), (1, 0), (0, 0)))
    window = (summed[cells:, cells:] - summed[:-cells, cells:] - summed[cells:, :-cells] + summed[:-cells, :-cells]) / (
        cells * cells
    )
    means, squares = window[..., :3], window[..., 3:]
    spread = np.sqrt(np.maximum(squares - means**2, 0))
    feature = np.concatenate([means, spread], axis=-1)
    feature = (feature - feature.mean(axis=(0, 1))) / (feature.std(axis=(0, 1)) + 1e-6)
    logits = feature @ rng.normal(0, 1, (feature.shape[-1], classes)).astype(np.float32)
    logits /= logits.std()
    if noise:
        logits += rng.normal(0, noise, logits.shape).astype(np.float32)
    glass = means.min(axis=-1) > 0.9
    logits[glass] = np.nan
    return logits.astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.0)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from keras_fcn_surgery.batch.writers import MapInfo, write_geojson

    start = time.perf_counter()
    scores = score_map(slide_pixels(args.side), args.stride, args.classes, args.noise)
    kept = int((~np.isnan(scores).any(axis=-1)).sum())
    print(
        f"slide {args.side} x {args.side}, stride {args.stride}, window {WINDOW}: map {scores.shape[0]} x "
        f"{scores.shape[1]} x {scores.shape[2]}, {kept} kept cells ({time.perf_counter() - start:.1f} s to make)"
    )
    info = MapInfo(
        source="slide.tif",
        level=0,
        downsample=(1.0, 1.0),
        level_size=(args.side, args.side),
        stride=(args.stride, args.stride),
        offset=(0, 0),
        receptive_field=(WINDOW, WINDOW),
        computed_fraction=1.0,
    )
    print(f"{'geojson':>8} {'MB':>9} {'features':>9} {'write s':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for choice in ("cells", "regions"):
            path = os.path.join(folder, f"{choice}.geojson")
            start = time.perf_counter()
            write_geojson(path, scores, info, geojson=choice)
            seconds = time.perf_counter() - start
            with open(path, encoding="utf-8") as handle:
                features = sum(1 for line in handle if line.startswith('{"type": "Feature"'))
            print(f"{choice:>8} {os.path.getsize(path) / 1e6:9.1f} {features:9d} {seconds:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
