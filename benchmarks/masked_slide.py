"""A masked slide runs on the staged core: work and time follow the tissue (issue 22).

VGG16 (random weights, converted) over a pyramidal tiled TIFF of SIDE x SIDE
pixels (default 4096) whose tissue, an ellipse of textured pink on bright
glass, covers about 30% of the slide; tiles of 1024. Prints:

1. the planned work of the masked pass per kept map cell against the staged
   whole pass (``plan_prediction`` with and without ``keep``): target <= 1.05;
2. the time of ``predict_images(..., mask="auto")`` against
   ``predict_images`` without a mask: target <= 0.40;
3. the time of ``predict_images`` without a mask against ``predict_map`` on
   the same pixels held in memory: target <= 1.05.

The three runs take turns, round after round (machines are noisy); the first
round also traces the model's graphs and is shown but not used; the figures
are the best of the later rounds.

Run (about 4 minutes a round on 2 CPU cores)::

    python benchmarks/masked_slide.py [--side 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

TILE = 1024
TIFF_TILE = 512


def slide_pixels(side: int, seed: int = 0) -> np.ndarray:
    """Bright glass with an ellipse of textured tissue covering about 30% of the area."""
    rng = np.random.default_rng(seed)
    ys = (np.arange(side) / side)[:, None]
    xs = (np.arange(side) / side)[None, :]
    tissue = ((ys - 0.45) / 0.33) ** 2 + ((xs - 0.5) / 0.29) ** 2 < 1
    noise = rng.normal(0, 20, (side, side, 3)).astype(np.float32)
    pixels = np.where(tissue[..., None], noise + [200, 110, 160], noise * 0.2 + 236)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_pyramid(path: str, pixels: np.ndarray) -> None:
    import tifffile

    levels = 1
    while pixels.shape[0] // 2**levels >= 512:
        levels += 1
    options = {"tile": (TIFF_TILE, TIFF_TILE), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(pixels, subifds=levels - 1, **options)
        for level in range(1, levels):
            tif.write(pixels[:: 2**level, :: 2**level], subfiletype=1, **options)


def kept_cells(fcn, path: str, size) -> np.ndarray:
    """The map cells `predict_images(mask="auto")` keeps (the same functions it calls)."""
    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.batch.masks import cell_mask, thumbnail, tissue_mask
    from keras_fcn_surgery.batch.readers import open_reader

    grid = kfs.geometry(fcn).at(size)
    with open_reader(path) as reader:
        picture = tissue_mask(thumbnail(reader))
    return cell_mask(picture, size, grid, grid.output_size(size))


def old_path_macs(fcn, size, keep) -> int:
    """What the path before issue 22 computed: a plain exact pass over each 1024 tile holding a kept cell."""
    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.grid import tiling
    from keras_fcn_surgery.inference import runner
    from keras_fcn_surgery.inference.cost import pass_cost

    rows, cols = runner.plan_tiles(size, kfs.geometry(fcn), TILE)
    touched = int(tiling.tiles_touching(keep, rows, cols).sum())
    return touched * pass_cost(fcn, (1, rows[0].stop - rows[0].start, cols[0].stop - cols[0].start, 3)).macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs; the first is a warm-up")
    args = parser.parse_args()

    import keras

    import keras_fcn_surgery as kfs

    keras.utils.set_random_seed(0)
    fcn = kfs.convert(keras.applications.VGG16(weights=None), verify=False)
    pixels = slide_pixels(args.side)
    size = pixels.shape[:2]
    with tempfile.TemporaryDirectory() as folder:
        slide = os.path.join(folder, "slide.tif")
        write_pyramid(slide, pixels)
        keep = kept_cells(fcn, slide, size)
        whole = kfs.plan_prediction(fcn, size, tile=TILE)
        masked = kfs.plan_prediction(fcn, size, tile=TILE, keep=keep)
        print(f"VGG16, {size[0]}x{size[1]} pyramidal TIFF, tiles of {TILE}, {keep.mean():.1%} of the cells kept")
        print(whole)
        print(masked)
        per_kept = masked.macs / keep.mean() / whole.macs
        print(
            f"planned work per kept cell / staged whole pass: {per_kept:.3f} (target <= 1.05; the old path, "
            f"each kept tile a plain pass: {old_path_macs(fcn, size, keep) / keep.mean() / whole.macs:.3f}); "
            f"masked work / whole: {masked.macs / whole.macs:.3f}"
        )
        runs = {
            "predict_map": lambda out: kfs.predict_map(fcn, pixels.astype(np.float32), tile=TILE, progress=False),
            "predict": lambda out: kfs.predict_images(fcn, [slide], out, tile=TILE, progress=False, overwrite=True),
            "predict --mask auto": lambda out: kfs.predict_images(
                fcn, [slide], out, tile=TILE, mask="auto", progress=False, overwrite=True
            ),
        }
        best: dict[str, float] = {}
        for round_index in range(args.rounds):
            times = {}
            for name, run in runs.items():
                start = time.perf_counter()
                run(os.path.join(folder, "maps"))
                times[name] = time.perf_counter() - start
            shown = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items())
            print(f"round {round_index + 1}{' (warm-up)' if round_index == 0 else ''}: {shown}", flush=True)
            if round_index or args.rounds == 1:
                for name, seconds in times.items():
                    best[name] = min(best.get(name, seconds), seconds)
        print(
            f"predict --mask / predict: {best['predict --mask auto'] / best['predict']:.2f} (target <= 0.40); "
            f"predict / predict_map: {best['predict'] / best['predict_map']:.2f} (target <= 1.05)"
        )


if __name__ == "__main__":
    sys.exit(main())
