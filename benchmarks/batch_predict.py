"""Throughput of `predict_images`: a folder of images (local engine vs Ray) and one large pyramidal slide.

Part 1: a folder of N JPEG images of 1024 x 1024 (default 200), through a
small patch classifier converted to an FCN (random weights): images/s and
megapixels/s of the local engine, and of the Ray engine with 2 workers on a
local Ray (started before timing; its start-up time is printed apart).

Part 2: one pyramidal tiled TIFF of 20,000 x 20,000 pixels (JPEG tiles,
SubIFD levels down to 1,250), written tile by tile (never held in memory):
slide-like, bright glass with about a quarter of the area covered by
textured tissue. It is predicted without a mask and with ``mask="auto"``,
each in a fresh process: seconds, MP/s, the fraction of tiles computed, and
peak resident memory (``ru_maxrss``) against the process's resident memory
with TensorFlow and the model loaded but no slide read.

Run (about 5-10 minutes on 2 CPU cores; --quick: 20 images, a 6,000 pixel slide)::

    python benchmarks/batch_predict.py [--quick] [--images 200] [--side 20000] [--skip-ray]
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

TILE = 512


def patch_classifier():
    """A small patch classifier (64 x 64 RGB, stride 16 once converted), random weights."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64, 64, 3)),
            layers.Rescaling(1 / 255),
            layers.Conv2D(8, 4, strides=4, activation="relu"),
            layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
            layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dense(2, activation="softmax"),
        ],
        name="patch_classifier",
    )


def write_folder(folder: str, count: int, side: int = 1024) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
    for n in range(count):
        picture = Image.fromarray(np.roll(base, n, axis=0)).resize((side, side), Image.BILINEAR)
        picture.save(os.path.join(folder, f"image{n:04d}.jpg"), quality=90)


def _slide_tiles(side: int, factor: int, seed: int = 0):
    """Tiles of a slide-like picture at one pyramid level, computed from coordinates (never the whole level)."""
    level_side = side // factor
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 20, (TILE, TILE, 3)).astype(np.float32)
    for top in range(0, level_side, TILE):
        for left in range(0, level_side, TILE):
            ys = (np.arange(top, top + TILE) * factor / side)[:, None]
            xs = (np.arange(left, left + TILE) * factor / side)[None, :]
            tissue = ((ys - 0.35) / 0.28) ** 2 + ((xs - 0.4) / 0.3) ** 2 < 1  # about a quarter of the area
            pixels = np.where(tissue[..., None], noise + [200, 110, 160], noise * 0.2 + 236)
            yield np.clip(pixels, 0, 255).astype(np.uint8)


def write_slide(path: str, side: int) -> None:
    import tifffile

    levels = []
    while side // 2 ** len(levels) >= 1000:
        levels.append(2 ** len(levels))
    options = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for n, factor in enumerate(levels):
            shape = (side // factor, side // factor, 3)
            extra = {"subifds": len(levels) - 1} if n == 0 else {"subfiletype": 1}
            tif.write(_slide_tiles(side, factor), shape=shape, **options, **extra)


def run_folder(model_path: str, folder: str, skip_ray: bool) -> None:
    import keras_fcn_surgery as kfs
    fcn = kfs.as_fcn(model_path)
    count = len(os.listdir(folder))
    with tempfile.TemporaryDirectory() as out:
        kfs.predict_images(fcn, [os.path.join(folder, "image0000.jpg")], os.path.join(out, "warm"))  # trace once
        summary = kfs.predict_images(fcn, [folder], os.path.join(out, "local"))
        _report(f"local engine, {count} images", summary)
        if skip_ray:
            return
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
        print(f"  (ray.init of a local Ray: {time.perf_counter() - start:.1f} s, not counted below)")
        try:
            summary = kfs.predict_images(fcn, [folder], os.path.join(out, "ray"), engine="ray", workers=2)
        finally:
            ray.shutdown()
        _report(f"ray engine, 2 workers, {count} images (incl. worker start and model load)", summary)


def _report(label: str, summary) -> None:
    done = [r for r in summary.results if r.status == "done"]
    megapixels = sum(r.megapixels for r in done)
    print(
        f"{label}: {summary.seconds:.1f} s, {len(done) / summary.seconds:.2f} images/s, "
        f"{megapixels / summary.seconds:.2f} MP/s ({summary.line()})"
    )


def run_slide_child(model_path: str, slide: str, mask: str) -> None:
    """In a fresh process: load the model, note resident memory, predict the slide, print JSON."""
    from keras_fcn_surgery.batch.run import predict_images
    from keras_fcn_surgery.surgery.fcn import as_fcn

    fcn = as_fcn(model_path)
    with tempfile.TemporaryDirectory() as out:
        predict_images(fcn, [slide], os.path.join(out, "warm"), level=len(_levels(slide)) - 1)  # trace once
        before = _rss_mb()
        summary = predict_images(fcn, [slide], os.path.join(out, "maps"), mask=mask)
    result = summary.results[0]
    print(
        json.dumps(
            {
                "status": result.status,
                "message": result.message,
                "seconds": summary.seconds,
                "megapixels": result.megapixels,
                "computed_fraction": result.computed_fraction,
                "rss_before_mb": before,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def _levels(slide: str):
    from keras_fcn_surgery.batch.readers import open_reader

    with open_reader(slide) as reader:
        return reader.levels


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int)
    parser.add_argument("--side", type=int)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-folder", action="store_true")
    parser.add_argument("--skip-slide", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SLIDE", "MASK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_slide_child(*args.child)
        return
    images = args.images or (20 if args.quick else 200)
    side = args.side or (6000 if args.quick else 20000)
    with tempfile.TemporaryDirectory(prefix="kfs-batch-bench-") as work:
        model_path = os.path.join(work, "patch_classifier.keras")
        patch_classifier().save(model_path)
        if not args.skip_folder:
            folder = os.path.join(work, "images")
            os.makedirs(folder)
            write_folder(folder, images)
            print(f"Part 1: a folder of {images} JPEG images of 1024 x 1024")
            run_folder(model_path, folder, args.skip_ray)
        if not args.skip_slide:
            slide = os.path.join(work, "slide.tif")
            start = time.perf_counter()
            write_slide(slide, side)
            size_mb = os.path.getsize(slide) / 2**20
            print(
                f"Part 2: one pyramidal TIFF of {side} x {side} ({size_mb:.0f} MiB, JPEG tiles, "
                f"written in {time.perf_counter() - start:.0f} s), default tiles (1024)"
            )
            for mask in ("none", "auto"):
                child = subprocess.run(
                    [sys.executable, __file__, "--child", model_path, slide, mask],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
                if child.returncode or not lines:
                    print(f"  mask={mask}: failed\n{child.stderr[-2000:]}")
                    continue
                r = json.loads(lines[-1])
                print(
                    f"  mask={mask}: {r['status']} in {r['seconds']:.1f} s, {r['megapixels'] / r['seconds']:.1f} MP/s "
                    f"of slide, {100 * r['computed_fraction']:.0f}% of tiles computed; peak RSS "
                    f"{r['peak_rss_mb']:.0f} MB (model loaded: {r['rss_before_mb']:.0f} MB) {r['message']}"
                )


if __name__ == "__main__":
    main()
