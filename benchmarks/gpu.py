"""Maps on a GPU: images per second and slide time at float32, float16 and bfloat16, with and without XLA (issue 39).

For VGG16, ResNet50 and EfficientNetB0 (``weights=None``: random weights,
nothing downloaded), at each precision and execution (``tf``: a
`tf.function`; ``xla``: compiled with XLA):

- images/s: `predict_maps` of a batch of images of one size (the FCN's map,
  or for EfficientNetB0, whose squeeze-and-excitation blocks have no exact
  FCN, its windowed map at stride 32), best of ``--rounds``;
- slide: `predict_images` of a synthetic pyramidal TIFF written here (tissue-like
  texture, 3 levels), whole, to npz, best of ``--rounds``;
- the WSInfer-style baseline on the same slide: non-overlapping patches of the
  classifier's input size read from the TIFF and run through the classifier
  itself in batches (one score per patch, not a map), at the same precision
  and execution.

On a machine without a GPU (or with ``--small``) it runs the same code at
small sizes (128-pixel images, or the classifier's input size where larger; a
512-pixel slide; one round) so that it keeps working; the figures then say
nothing about a GPU. ``--models tiny`` adds a
small CNN of 32x32 inputs: the smallest run (what the test suite runs) is
``--small --models tiny --precisions float32,bfloat16 --executions tf``.

Run (on an NVIDIA GPU, minutes)::

    python benchmarks/gpu.py [--models vgg16,resnet50,efficientnetb0] [--precisions float32,float16,bfloat16]
        [--executions tf,xla] [--image 1024] [--batch 8] [--slide 8192] [--rounds 3] [--small] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402
from keras_fcn_surgery.inference import engines  # noqa: E402

PRECISIONS = ("float32", "float16", "bfloat16")
EXECUTIONS = ("tf", "xla")
# Map stride of the applications' FCNs (and the windowed map's stride of EfficientNetB0).
STRIDE = 32


def tiny():
    """A small CNN of 32x32 inputs (stride 4): the suite's smallest run."""
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ],
        name="tiny",
    )


MODELS = {
    "vgg16": lambda: keras.applications.VGG16(weights=None),
    "resnet50": lambda: keras.applications.ResNet50(weights=None),
    "efficientnetb0": lambda: keras.applications.EfficientNetB0(weights=None),
    "tiny": tiny,
}


@dataclass
class Row:
    """One configuration's figures (seconds are the best of the rounds; NaN: not run, or failed)."""

    model: str
    precision: str
    execution: str
    method: str
    images_per_second: float
    slide_seconds: float
    patch_seconds: float
    patches: int
    note: str = ""


def write_slide(path: str, side: int, seed: int = 0) -> None:
    """A pyramidal BigTIFF of ``side`` x ``side`` pixels: pink, textured tissue on bright glass, 3 levels."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    tissue = ((yy - 0.5) ** 2 + (xx - 0.45) ** 2) < 0.12
    picture = np.clip(rng.normal(235, 4, (side, side, 3)), 0, 255)
    texture = rng.normal(0, 25, (side, side, 1)) + np.array([200, 120, 170])
    picture[tissue] = np.clip(texture[tissue], 0, 255)
    picture = picture.astype(np.uint8)
    tile = 256 if side >= 1024 else 64
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
        tif.write(picture, subifds=2, **options)
        for level in (1, 2):
            factor = 2**level
            reduced = picture[: side // factor * factor, : side // factor * factor]
            reduced = reduced.reshape(side // factor, factor, side // factor, factor, 3).mean((1, 3))
            tif.write(reduced.astype(np.uint8), subfiletype=1, **options)


def best_of(rounds: int, run) -> float:
    """Best seconds of ``rounds`` calls of ``run`` after one untimed call (tracing, compiling)."""
    run()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def patch_baseline(classifier, slide: str, execution: str, precision: str, batch: int, rounds: int):
    """Seconds to score the slide's non-overlapping patches with the classifier (WSInfer's way), and their count."""
    import tifffile

    height, width = (int(d) for d in classifier.inputs[0].shape[1:3])
    forward = engines.forward(classifier, execution, precision)

    def run():
        pixels = tifffile.imread(slide, level=0)  # read every time, as a map's pass reads the slide
        rows, cols = pixels.shape[0] // height, pixels.shape[1] // width
        patches = pixels[: rows * height, : cols * width].reshape(rows, height, cols, width, 3)
        patches = patches.transpose(0, 2, 1, 3, 4).reshape(-1, height, width, 3).astype(np.float32)
        for start in range(0, len(patches), batch):
            forward(patches[start : start + batch])
        return len(patches)

    count = run()
    return best_of(rounds, run), count


def run_model(name: str, args, slide: str, out_dir: str) -> list[Row]:
    classifier = MODELS[name]()
    stride = None if name == "tiny" else STRIDE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: "the check proves little"
        mapper = kfs.prepare(classifier, stride=stride)
    model = mapper.runnable if mapper.method == "fcn" else classifier  # an FCN converted once
    options = {} if mapper.method == "fcn" else {"method": "windowed", "stride": stride}
    rng = np.random.default_rng(0)
    side = max(args.image, *(int(d) for d in classifier.inputs[0].shape[1:3]))  # at least one window
    images = [rng.uniform(0, 255, (side, side, 3)).astype(np.float32) for _ in range(args.batch)]
    rows = []
    for precision in args.precisions:
        for execution in args.executions:
            row = Row(name, precision, execution, mapper.method, math.nan, math.nan, math.nan, 0)
            try:
                seconds = best_of(
                    args.rounds,
                    lambda: kfs.predict_maps(model, images, engine=execution, precision=precision, **options),
                )
                row.images_per_second = len(images) / seconds
                row.slide_seconds = best_of(
                    args.rounds,
                    lambda: kfs.predict_images(
                        model,
                        [slide],
                        out_dir,
                        formats="npz",
                        certify=0,
                        overwrite=True,
                        execution=execution,
                        precision=precision,
                        **options,
                    ),
                )
                row.patch_seconds, row.patches = patch_baseline(
                    classifier, slide, execution, precision, args.batch, args.rounds
                )
            except Exception as error:  # one configuration's failure (an XLA compile error) must not stop the others
                row.note = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            rows.append(row)
            print(
                f"{name:15s} {precision:9s} {execution:4s} {row.method:8s} {row.images_per_second:10.2f} "
                f"{row.slide_seconds:9.2f} {row.patch_seconds:9.2f} {row.patches:8d} {row.note}",
                flush=True,
            )
    return rows


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg16,resnet50,efficientnetb0")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--executions", default=",".join(EXECUTIONS))
    parser.add_argument("--image", type=int, help="image side for images/s (default 1024 on a GPU, else 128)")
    parser.add_argument("--batch", type=int, default=8, help="images per predict_maps call, patches per batch")
    parser.add_argument("--slide", type=int, help="slide side in pixels (default 8192 on a GPU, else 512)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3 on a GPU, else 1)")
    parser.add_argument("--small", action="store_true", help="the CPU sizes, even on a GPU")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    gpus = engines.accelerators()
    small = args.small or not gpus
    args.image = args.image or (128 if small else 1024)
    args.slide = args.slide or (512 if small else 8192)
    args.rounds = args.rounds or (1 if small else 3)
    if small:
        args.batch = min(args.batch, 2)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.executions = [e.strip() for e in args.executions.split(",") if e.strip()]
    unknown = sorted(set(args.precisions) - set(PRECISIONS)) + sorted(set(args.executions) - set(EXECUTIONS))
    unknown += sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}: models {sorted(MODELS)}, {PRECISIONS}, {EXECUTIONS}")
    where = f"GPU {', '.join(gpus)}" if gpus else "no GPU: CPU, small sizes (the figures say nothing about a GPU)"
    print(
        f"{where}; backend {keras.backend.backend()}; images {args.batch} x {args.image}^2; slide {args.slide}^2; "
        f"rounds {args.rounds}"
    )
    print(
        f"{'model':15s} {'precision':9s} {'exec':4s} {'method':8s} {'images/s':>10s} {'slide s':>9s} "
        f"{'patches s':>9s} {'patches':>8s}"
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kfs-gpu-") as folder:
        slide = os.path.join(folder, "slide.tif")
        write_slide(slide, args.slide)
        for name in args.models.split(","):
            rows += run_model(name, args, slide, os.path.join(folder, "maps"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": where, "rows": [asdict(row) for row in rows]}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
