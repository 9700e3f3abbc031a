"""One slide at 10,000², 30,000² and 100,000²: peak memory and time of the region-sharded job (issue 27).

For each side, a pyramidal tiled TIFF is written tile by tile (tifffile, a
generator of tiles: nothing slide-sized in memory): bright glass with an
ellipse of textured tissue (about 20% of the slide; ``--full`` also writes a
slide that is tissue everywhere). A tiny FCN of stride 32 (five 3x3
convolutions of stride 2, four channels, a 1x1 head of two classes) runs the
`predict_images` job with ``mask="auto"`` and ``formats="zarr"``, region by
region (`batch.shards`: `plan_input`, `run_region` per region, `finish_input`),
each size in a fresh process. Each process prints its peak resident memory
(``getrusage``), the memory bound the plan states in advance, the time per
region and the total; the parent prints the growth from one size to the next
and extrapolates the 100,000² time on N workers from the per-region times.

The bound: the process after TensorFlow and the model are loaded (measured
before the job), plus the tiles in flight (a batch of float32 tiles, its
prefetched successor and the first layer's activations), plus 4 bytes per
map cell (the mask's kept cells, a region's keep mask, the tile planner's
per-row sums), plus the TIFF reader's and the zarr store's buffers (64 MiB).

``--ray`` also runs the largest slide up to 30,000² on a local Ray with 2 workers against
the local engine (the same regions), checks the maps are equal and prints the
per-region overhead.

Run (2 shared cores: about 2 minutes for 10,000², 10 for 30,000²; 100,000²
with ``--huge`` about an hour, most of it writing the TIFF)::

    python benchmarks/slide_scale.py [--sides 10000,30000] [--huge] [--full] [--ray] [--shards 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

TIFF_TILE = 512
TILE = 1024
GLASS = 236
BUFFERS = 128 << 20
MASK_BYTES_PER_PIXEL = 64  # the tissue mask of the smallest level: thumbnail, grey, Otsu, morphology
SHARD_ROWS = 64  # map rows per chunk of the store (the smallest region): 2048 pixels at stride 32


def tissue_of(ys: np.ndarray, xs: np.ndarray, full: bool) -> np.ndarray:
    """Tissue at relative positions: an ellipse of about 20% of the slide (everywhere with ``full``)."""
    if full:
        return np.ones((len(ys), len(xs)), dtype=bool)
    return ((ys[:, None] - 0.45) / 0.3) ** 2 + ((xs[None, :] - 0.5) / 0.22) ** 2 < 1


def tiles(side: int, level_side: int, full: bool, seed: int = 0):
    """The tiles of one level, row by row: glass (one constant tile) or textured tissue."""
    rng = np.random.default_rng(seed)
    glass = np.full((TIFF_TILE, TIFF_TILE, 3), GLASS, dtype=np.uint8)
    for top in range(0, level_side, TIFF_TILE):
        for left in range(0, level_side, TIFF_TILE):
            ys = (top + np.arange(TIFF_TILE)) / level_side
            xs = (left + np.arange(TIFF_TILE)) / level_side
            tissue = tissue_of(ys, xs, full)
            if not tissue.any():
                yield glass
                continue
            noise = rng.integers(-40, 40, (TIFF_TILE, TIFF_TILE, 3), dtype=np.int16)
            pink = np.clip(noise + np.array([200, 110, 160], dtype=np.int16), 0, 255).astype(np.uint8)
            yield np.where(tissue[..., None], pink, glass)


def write_slide(path: str, side: int, full: bool) -> None:
    import tifffile

    sides = [side]
    while sides[-1] // 2 >= 1024:
        sides.append(sides[-1] // 2)
    options = {"tile": (TIFF_TILE, TIFF_TILE), "photometric": "rgb", "compression": "zlib", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(side, side, full), shape=(side, side, 3), subifds=len(sides) - 1, **options)
        for level_side in sides[1:]:
            tif.write(tiles(side, level_side, full), shape=(level_side, level_side, 3), subfiletype=1, **options)


def tiny_fcn():
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = layers.Rescaling(1 / 255)(inputs)
    for _ in range(5):
        x = layers.Conv2D(4, 3, strides=2, padding="valid", activation="relu")(x)
    return keras.Model(inputs, layers.Conv2D(2, 1, activation="softmax")(x), name="tiny_stride32")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(slide: str, shards: int, out: str, full: bool = False) -> dict:
    """One job in this process, region by region; what it measured."""
    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.batch import shards as region_shards
    from keras_fcn_surgery.batch.job import BatchOptions
    from keras_fcn_surgery.batch.sources import Source
    from keras_fcn_surgery.inference.predict import plan_prediction

    fcn = tiny_fcn()
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        side = tif.pages[0].shape[0]
    size = (side, side)
    plan = plan_prediction(fcn, (TILE * 2, TILE * 2), tile=TILE)
    kfs.predict_map(fcn, np.zeros((TILE, TILE, 3), np.float32), tile=TILE, engine="tf")  # TensorFlow's start-up
    baseline = peak_rss()
    map_cells = int(np.prod(kfs.geometry(fcn).output_size(size)))
    batch = max(s.batch_size for s in plan.stages)
    tile_bytes = batch * TILE * TILE * 3 * 4 * 2 + batch * (TILE // 2) ** 2 * 4 * 4
    with tifffile.TiffFile(slide) as tif:
        smallest = min((p.shape[0] * p.shape[1] for p in [tif.pages[0], *tif.pages[0].pages]), default=side * side)
    bound = baseline + tile_bytes + MASK_BYTES_PER_PIXEL * smallest + 4 * map_cells + BUFFERS
    options = BatchOptions(
        formats=("zarr",),
        mask=None if full else "auto",
        tile=TILE,
        execution="tf",
        progress=False,
        shard_rows=SHARD_ROWS,
    )
    source = Source(slide, "slide")
    start = time.perf_counter()
    planned = region_shards.plan_input(fcn, source, out, options, shards)
    assert isinstance(planned, region_shards.InputPlan), planned
    planned_at = time.perf_counter() - start
    seconds, cells = [], []
    for region in planned.pending:
        began = time.perf_counter()
        region_shards.run_region(fcn, source, out, options, region)
        seconds.append(time.perf_counter() - began)
        cells.append(region.cells)
    began = time.perf_counter()
    result = region_shards.finish_input(fcn, planned, out, options)
    assert result.status == "done", result.message
    return {
        "side": side,
        "full": full,
        "map_cells": map_cells,
        "kept": result.computed_fraction,
        "baseline": baseline,
        "bound": bound,
        "peak": peak_rss(),
        "plan_s": planned_at,
        "region_s": seconds,
        "region_cells": cells,
        "finish_s": time.perf_counter() - began,
        "total_s": time.perf_counter() - start,
    }


def ray_child(slide: str, shards: int, out: str) -> dict:
    """The same slide by the local engine and by a local Ray with 2 workers, both by regions."""
    import ray
    import zarr

    import keras_fcn_surgery as kfs

    fcn = tiny_fcn()
    options = dict(
        formats="zarr", mask="auto", tile=TILE, execution="tf", certify=0, shards=shards, shard_rows=SHARD_ROWS
    )
    start = time.perf_counter()
    assert kfs.predict_images(fcn, [slide], os.path.join(out, "local"), **options).ok
    local = time.perf_counter() - start
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - start
    start = time.perf_counter()
    assert kfs.predict_images(fcn, [slide], os.path.join(out, "ray"), engine="ray", workers=2, **options).ok
    on_ray = time.perf_counter() - start
    ray.shutdown()
    name = os.path.splitext(os.path.basename(slide))[0] + ".zarr"
    a = zarr.open_group(os.path.join(out, "local", name), mode="r")["scores"][:]
    b = zarr.open_group(os.path.join(out, "ray", name), mode="r")["scores"][:]
    from keras_fcn_surgery.batch.job import BatchOptions, open_input
    from keras_fcn_surgery.batch.readers import open_reader
    from keras_fcn_surgery.batch.shards import cut_regions
    from keras_fcn_surgery.batch.sources import Source

    with open_reader(slide) as reader:
        job = open_input(fcn, reader, Source(slide, "slide"), BatchOptions(mask="auto"))
        regions = len(cut_regions(job.kept, job.map_size, shards, SHARD_ROWS))
    return {
        "regions": regions,
        "local_s": local,
        "ray_init_s": started,
        "ray_s": on_ray,
        "equal": bool(np.array_equal(a, b, equal_nan=True)),
    }


def run_child(command) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="10000,30000", help="slide sides, comma-separated")
    parser.add_argument("--huge", action="store_true", help="also 100,000 x 100,000")
    parser.add_argument("--full", action="store_true", help="also slides that are tissue everywhere")
    parser.add_argument(
        "--ray", action="store_true", help="Ray with 2 workers against the local engine (the largest side <= 30,000)"
    )
    parser.add_argument("--shards", type=int, default=16, help="regions per slide")
    parser.add_argument("--folder", default=None, help="where the slides go (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SLIDE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, slide, out = args.child
        if kind == "ray":
            print(json.dumps(ray_child(slide, args.shards, out)))
        else:
            print(json.dumps(child(slide, args.shards, out, full=kind == "full")))
        return
    sides = [int(s) for s in args.sides.split(",")] + ([100_000] if args.huge else [])
    folder = args.folder or tempfile.mkdtemp(prefix="kfs-slide-scale-")
    os.makedirs(folder, exist_ok=True)
    measured = []
    for full in [False, True] if args.full else [False]:
        for side in sides:
            if full and side > 30_000:
                continue
            slide = os.path.join(folder, f"slide{side}{'-full' if full else ''}.tif")
            if not os.path.exists(slide):
                start = time.perf_counter()
                write_slide(slide + ".tmp", side, full)
                os.replace(slide + ".tmp", slide)
                print(f"wrote {slide}: {os.path.getsize(slide) / 2**20:.0f} MiB in {time.perf_counter() - start:.0f} s")
            out = tempfile.mkdtemp(prefix="maps-", dir=folder)
            command = [
                sys.executable,
                __file__,
                "--shards",
                str(args.shards),
                "--child",
                "full" if full else "job",
                slide,
                out,
            ]
            found = run_child(command)
            measured.append(found)
            regions = found["region_s"]
            print(
                f"{side:,}² {'tissue everywhere' if full else 'mask'}: {found['kept']:.1%} of the work, "
                f"{len(regions)} regions, peak {mib(found['peak'])} (bound {mib(found['bound'])}; "
                f"{mib(found['baseline'])} with TensorFlow and the model), {found['total_s']:.0f} s "
                f"(plan {found['plan_s']:.1f} s, regions {sum(regions):.0f} s, largest {max(regions):.1f} s, "
                f"finish {found['finish_s']:.1f} s)",
                flush=True,
            )
    masked = [m for m in measured if not m["full"]]
    for before, after in zip(masked, masked[1:]):
        print(f"peak {before['side']:,}² -> {after['side']:,}²: {after['peak'] / before['peak'] - 1:+.1%}")
    if masked:
        largest = masked[-1]
        per_cell = sum(largest["region_s"]) / max(1, sum(largest["region_cells"]))
        huge_cells = largest["map_cells"] * (100_000 / largest["side"]) ** 2 * largest["kept"]
        for workers in (1, 2, 8, 32):
            seconds = per_cell * huge_cells / workers
            print(f"100,000² (same tissue share) on {workers} workers: about {seconds:.0f} s of regions")
    if args.ray:
        side = max(s for s in sides if s <= 30_000)
        slide = os.path.join(folder, f"slide{side}.tif")
        out = tempfile.mkdtemp(prefix="ray-", dir=folder)
        command = [sys.executable, __file__, "--shards", str(args.shards), "--child", "ray", slide, out]
        found = run_child(command)
        overhead = (found["ray_s"] - found["local_s"]) / found["regions"]
        print(
            f"{side:,}² by {found['regions']} regions: local {found['local_s']:.1f} s, Ray 2 workers "
            f"{found['ray_s']:.1f} s (+ ray.init {found['ray_init_s']:.1f} s), maps equal: {found['equal']}; "
            f"overhead per region {overhead:+.2f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
