"""Resident memory of ``predict_images(..., formats="ome-zarr")`` on a slide whose map exceeds the budget (issue 25).

A pyramidal tiled TIFF of SIDE x SIDE pixels (default 8192, random texture)
goes through a small FCN of stride 2 with CLASSES score channels (default 8),
so the map alone is (SIDE / 2)^2 x CLASSES float32 (512 MiB at the defaults)
and the slide's pixels 192 MiB as uint8 (768 MiB as float32). Each format runs
in a fresh process that first computes a small slide with the same tiles (so
TensorFlow's graphs are traced), then the large one; the figure is the growth
of the process's peak resident memory (``ru_maxrss``) over the large run.
``npz`` holds the whole map by nature and is shown for contrast.

Target: the OME-Zarr run's growth is a small fraction of the map and of the
slide (a few chunks of 2 MiB and the tiles in flight), whatever SIDE is.

Measured on 2 shared CPU cores (2026-12-02): SIDE 8192 (a 512 MiB map): the
OME-Zarr run's peak grew 16 MiB (3% of the map) in 23 s, npz's 484 MiB in 13 s;
SIDE 16384 (a 2 GiB map, 768 MiB of pixels): OME-Zarr grew 32 MiB in 128 s.

Run (about a minute on 2 CPU cores)::

    python benchmarks/ome_zarr_memory.py [--side 8192] [--classes 8] [--tile 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

_RUN = textwrap.dedent(
    """
    import json, os, resource, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras
    import keras_fcn_surgery as kfs

    model, small, large, out, fmt, tile = sys.argv[1:7]
    fcn = keras.models.load_model(model)

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    kfs.predict_images(fcn, [small], out + "/warm", formats=fmt, tile=int(tile))
    before = peak_mib()
    start = time.perf_counter()
    summary = kfs.predict_images(fcn, [large], out + "/large", formats=fmt, tile=int(tile))
    assert summary.ok, summary.failed
    print(json.dumps({"before": before, "after": peak_mib(), "seconds": time.perf_counter() - start}))
    """
)


def write_slide(path: str, side: int, seed: int = 0) -> None:
    """A tiled pyramidal BigTIFF of random texture, written a band of rows at a time."""
    import tifffile

    rng = np.random.default_rng(seed)

    def tiles(factor):
        size = side // factor
        for top in range(0, size, 512):
            rows = rng.integers(0, 256, (min(512, size - top), size, 3), dtype=np.uint8)
            for left in range(0, size, 512):
                yield rows[:, left : left + 512]

    options = {"tile": (512, 512), "photometric": "rgb", "compression": "zlib", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(1), shape=(side, side, 3), subifds=2, **options)
        for level in (1, 2):
            tif.write(tiles(2**level), shape=(side // 2**level, side // 2**level, 3), subfiletype=1, **options)


def build_fcn(path: str, classes: int) -> None:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(classes, 1)(x)
    keras.Model(inputs, x).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--formats", default="ome-zarr,npz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = os.path.join(folder, "fcn.keras")
        build_fcn(model, args.classes)
        small, large = os.path.join(folder, "small.tif"), os.path.join(folder, "large.tif")
        write_slide(small, 2048, seed=1)
        write_slide(large, args.side)
        map_mib = (args.side // 2) ** 2 * args.classes * 4 / 2**20
        print(
            f"slide {args.side} x {args.side} ({args.side**2 * 3 / 2**20:.0f} MiB as uint8), "
            f"map {args.side // 2} x {args.side // 2} x {args.classes} float32 ({map_mib:.0f} MiB), tile {args.tile}"
        )
        for fmt in args.formats.split(","):
            out = os.path.join(folder, fmt)
            done = subprocess.run(
                [sys.executable, "-c", _RUN, model, small, large, out, fmt, str(args.tile)],
                capture_output=True,
                text=True,
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
            )
            if done.returncode != 0:
                print(f"{fmt}: failed\n{done.stderr[-3000:]}")
                continue
            peaks = json.loads(done.stdout.strip().splitlines()[-1])
            growth = peaks["after"] - peaks["before"]
            print(
                f"{fmt:>9}: peak RSS grew {growth:7.0f} MiB over the large slide "
                f"({100 * growth / map_mib:.0f}% of the map; peak {peaks['after']:.0f} MiB) in {peaks['seconds']:.1f} s"
            )


if __name__ == "__main__":
    main()
