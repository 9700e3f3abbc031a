"""`predict_images` against `predict_map` on the same slide pixels: the batch job's overhead.

VGG16 with random weights (``keras.applications.VGG16(weights=None)``), a
pyramidal tiled TIFF of 2048 x 2048 pixels (and 4096 x 4096 with
``--large``) written with tifffile. Each round times, in this one process and
alternating, ``predict_images(model, slide, out, tile=1024)`` (npz output) and
``predict_map(model, pixels, tile=1024)`` on the level-0 pixels read from the
same file, without a certificate and with the default one
(``certify=DEFAULT_CELLS``, which `predict_images` makes by default). The
first round is a warm-up (conversion, compiled forwards, the execution
timings); the best of the other rounds is reported, and the ratio
``predict_images / predict_map`` (target: at most 1.05). Beside wall time it
reports the process's CPU time (all its threads: less moved by other
processes on a shared machine) and the median of the rounds' own ratios.

On a busy machine the wall times swing far more than 5%. The job's own cost
does not: with ``--profile`` each call runs under `cProfile`, and the time
spent outside TensorFlow's executions (reading, planning, cropping,
writing: what the batch job adds) is reported per call; the ratio the job's
own cost allows is ``(map + images' time outside TF - map's outside TF) /
map``, with the best map time.

Run (about 5 minutes on 2 CPU cores at 2048; ``--large`` adds 4096)::

    python benchmarks/batch_vs_map.py [--rounds 3] [--large] [--execution tf] [--sides 4096] [--certify 0,8]

Measured on the quiet 2-core AMD EPYC, 4096², ``--execution tf``, after the
npz output stopped deflating computed scores (issue 35; it spent 4.85 s of the
job deflating the 65 MB map to 0.82-0.96 of its size): with the default
certificate (``--rounds 2``) 81.45 s against 82.70 s, 0.985x (CPU 0.996x);
without (``--certify 0 --rounds 3``) 78.39 s against 77.14 s, 1.016x (CPU
1.013x, median of the rounds 1.016x). A first ``--rounds 2`` run gave 1.077x
without the certificate, its rounds 1.118x and 1.049x: single runs here swing
by 5-10%, so take several rounds. 2048² (stop 44): 1.021x / 1.011x.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from slides import slide_pixels, write_pyramid  # noqa: E402

TILE = 1024


def in_tensorflow(profile: cProfile.Profile) -> float:
    """Seconds a profile spent inside TensorFlow's executions of compiled and eager operations."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return sum(
        entry[2]
        for (_, _, name), entry in stats.items()
        if name.startswith("<built-in method tensorflow.") and "Execute" in name
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--large", action="store_true", help="also 4096 x 4096")
    parser.add_argument("--execution", default="tf", help="`engine` of every pass (default tf: no timing runs)")
    parser.add_argument("--profile", action="store_true", help="also the time each call spends outside TensorFlow")
    parser.add_argument("--sides", default=None, help="comma-separated slide sides (default 2048[,4096])")
    parser.add_argument(
        "--certify", default=None, help="comma-separated certificate cells to time (default: 0 and the default's)"
    )
    args = parser.parse_args()

    import keras
    import tifffile

    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.inference.certificate import DEFAULT_CELLS

    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None)
    sides = [int(s) for s in args.sides.split(",")] if args.sides else [2048] + ([4096] if args.large else [])
    certified = [int(c) for c in args.certify.split(",")] if args.certify else [0, DEFAULT_CELLS]
    folder = tempfile.mkdtemp(prefix="kfs-batch-vs-map-")
    try:
        for side in sides:
            slide = os.path.join(folder, f"slide{side}.tif")
            write_pyramid(slide, slide_pixels(side))
            pixels = tifffile.imread(slide)  # the same pixels predict_images reads

            def images(out, c):
                return kfs.predict_images(
                    model, [slide], out, tile=TILE, certify=c, execution=args.execution, progress=False
                )

            def single(out, c):
                return kfs.predict_map(
                    model, pixels, tile=TILE, certify=c or None, engine=args.execution, progress=False
                )

            runs = {}
            for cells in certified:
                runs[("images", cells)] = lambda out, c=cells: images(out, c)
                runs[("map", cells)] = lambda out, c=cells: single(out, c)
            best: dict = {}
            seconds_of: dict = {}
            for round_ in range(args.rounds + 1):
                order = list(runs) if round_ % 2 == 0 else list(reversed(list(runs)))  # alternate the order too
                for key in order:
                    out = os.path.join(folder, f"out{side}")
                    shutil.rmtree(out, ignore_errors=True)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    profile = cProfile.Profile() if args.profile else None
                    if profile is not None:
                        profile.enable()
                    result = runs[key](out)
                    if profile is not None:
                        profile.disable()
                        outside = time.perf_counter() - start - in_tensorflow(profile)
                        if round_ > 0:
                            best[key + ("outside",)] = min(best.get(key + ("outside",), np.inf), outside)
                    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                    if key[0] == "images" and not result.ok:
                        raise SystemExit(f"predict_images failed: {result.failed[0].message}")
                    label = "warm-up" if round_ == 0 else f"round {round_}"
                    print(
                        f"{side}² {label}: {key[0]:6s} certify={key[1]:<3d} {seconds:7.2f} s (CPU {cpu:7.2f} s)",
                        flush=True,
                    )
                    if round_ > 0:
                        best[key] = min(best.get(key, np.inf), seconds)
                        best[key + ("cpu",)] = min(best.get(key + ("cpu",), np.inf), cpu)
                        seconds_of[key + (round_,)] = seconds
            for certify in certified:
                images_time, map_time = best[("images", certify)], best[("map", certify)]
                cpu_ratio = best[("images", certify, "cpu")] / best[("map", certify, "cpu")]
                rounds = range(1, args.rounds + 1)
                median = float(
                    np.median([seconds_of[("images", certify, r)] / seconds_of[("map", certify, r)] for r in rounds])
                )
                print(
                    f"{side}² tile {TILE}, certify={certify}: predict_images {images_time:.2f} s, predict_map "
                    f"{map_time:.2f} s: ratio {images_time / map_time:.3f}x (best of {args.rounds}); CPU time ratio "
                    f"{cpu_ratio:.3f}x; median of the rounds' ratios {median:.3f}x",
                    flush=True,
                )
                if args.profile:
                    extra = best[("images", certify, "outside")] - best[("map", certify, "outside")]
                    print(
                        f"{side}² certify={certify}: outside TensorFlow's executions predict_images "
                        f"{best[('images', certify, 'outside')]:.2f} s, predict_map "
                        f"{best[('map', certify, 'outside')]:.2f} s: the job's own cost allows "
                        f"{(map_time + extra) / map_time:.3f}x",
                        flush=True,
                    )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
