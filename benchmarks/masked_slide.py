"""A masked slide runs on the staged core: work and time follow the tissue (issue 22).

VGG16 (random weights, converted) over a pyramidal tiled TIFF of SIDE x SIDE
pixels (default 4096) whose tissue, an ellipse of textured pink on bright
glass, covers about 30% of the slide; tiles of 1024. Prints:

1. the planned work of the masked pass per kept map cell against the staged
   whole pass (``plan_prediction`` with and without ``keep``), counted in
   multiply-accumulates: target <= 1.3 (issue 39; the receptive field's floor,
   each stage computing exactly the windows of the kept cells, is printed too);
2. the time of ``predict_images(..., mask="auto")`` against
   ``predict_images`` without a mask: target <= 0.45;
3. the time of ``predict_images`` without a mask against ``predict_map`` on
   the same pixels held in memory: target <= 1.05.

The three runs take turns, round after round (machines are noisy); the first
round also traces the model's graphs and is shown but not used; the figures
are the best of the later rounds.

Run (about 3 minutes a round on 2 CPU cores at 4096, 12 at 8192; ``--counted`` prints the
counted work alone, without timing, for sides too long to time)::

    python benchmarks/masked_slide.py [--side 4096] [--rounds 3] [--counted]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from slides import slide_pixels, write_pyramid  # noqa: E402

TILE = 1024
TIFF_TILE = 512


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
    from keras_fcn_surgery.cost import pass_cost
    from keras_fcn_surgery.grid import tiling
    from keras_fcn_surgery.inference import runner

    rows, cols = runner.plan_tiles(size, kfs.geometry(fcn), TILE)
    touched = int(tiling.tiles_touching(keep, rows, cols).sum())
    return touched * pass_cost(fcn, (1, rows[0].stop - rows[0].start, cols[0].stop - cols[0].start, 3)).macs


def floor_macs(whole, keep) -> float:
    """Work with no tile overheads: each stage of the unmasked plan computing its whole-pass work times the share
    of its output cells that the kept cells need (their windows, stage by stage back from the map)."""
    import keras_fcn_surgery as kfs

    needed, total = keep, 0.0
    for stage, run in zip(reversed(whole.stages), reversed(whole._runs)):
        total += stage.macs * needed.mean()
        grid = kfs.geometry(run.model).at(stage.input_size)
        needed = grid_windows(grid, stage.input_size, needed)
    return total


def grid_windows(grid, size, needed) -> np.ndarray:
    """The input cells in the windows of the ``needed`` output cells of a stage of geometry ``grid``."""
    marks = np.zeros((size[0] + 1, size[1] + 1), dtype=np.int32)
    rows, cols = np.nonzero(needed)
    r0 = np.clip(grid.offset[0] + rows * grid.stride[0], 0, size[0])
    c0 = np.clip(grid.offset[1] + cols * grid.stride[1], 0, size[1])
    r1 = np.clip(r0 + grid.receptive_field[0], 0, size[0])
    c1 = np.clip(c0 + grid.receptive_field[1], 0, size[1])
    for r, c, sign in ((r0, c0, 1), (r0, c1, -1), (r1, c0, -1), (r1, c1, 1)):
        np.add.at(marks, (r, c), sign)
    return np.cumsum(np.cumsum(marks, axis=0), axis=1)[: size[0], : size[1]] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs; the first is a warm-up")
    parser.add_argument("--counted", action="store_true", help="the counted work only: plans, no timed runs")
    args = parser.parse_args()

    import keras

    import keras_fcn_surgery as kfs

    keras.utils.set_random_seed(0)
    fcn = kfs.convert(keras.applications.VGG16(weights=None), verify=False)
    pixels = slide_pixels(args.side)
    size = pixels.shape[:2]
    with tempfile.TemporaryDirectory() as folder:
        slide = os.path.join(folder, "slide.tif")
        write_pyramid(slide, pixels, TIFF_TILE)
        keep = kept_cells(fcn, slide, size)
        whole = kfs.plan_prediction(fcn, size, tile=TILE)
        masked = kfs.plan_prediction(fcn, size, tile=TILE, keep=keep)
        print(f"VGG16, {size[0]}x{size[1]} pyramidal TIFF, tiles of {TILE}, {keep.mean():.1%} of the cells kept")
        print(whole)
        print(masked)
        per_kept = masked.macs / keep.mean() / whole.macs
        print(
            f"planned work per kept cell / staged whole pass: {per_kept:.3f} (target <= 1.3; the receptive "
            f"field's floor: {floor_macs(whole, keep) / keep.mean() / whole.macs:.3f}; the path before issue 22, "
            f"each kept tile a plain pass: {old_path_macs(fcn, size, keep) / keep.mean() / whole.macs:.3f}); "
            f"masked work / whole: {masked.macs / whole.macs:.3f} ({masked.macs / 1e9:.0f} of "
            f"{whole.macs / 1e9:.0f} GMAC)",
            flush=True,
        )
        if args.counted:
            return
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
            f"predict --mask / predict: {best['predict --mask auto'] / best['predict']:.2f} (target <= 0.45); "
            f"predict / predict_map: {best['predict'] / best['predict_map']:.2f} (target <= 1.05)"
        )


if __name__ == "__main__":
    sys.exit(main())
