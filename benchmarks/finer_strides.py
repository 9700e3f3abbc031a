"""Maps finer than the network's stride (issue 37): à trous against the sliding window and shift-and-stitch.

For CaffeNet at 451 x 451 and VGG16 (``weights=None``) at ``--vgg-size``
(random weights, nothing downloaded), at strides S/2 and S/4 (S = 32; add
``--strides 16,8,4`` for S/8): the time of

- ``predict_map(classifier, image, stride=s)``: the FCN à trous (strides past
  the cut removed, later windows dilated), one pass;
- ``sliding_window_predict(classifier, image, s)``: the classifier on every
  crop, batched;
- naive shift-and-stitch: the stride-S FCN on each of the (S/s)^2 shifted
  images ``image[dy:, dx:]``, interleaved;

each with its multiply-accumulates (`PredictionPlan.finer`: the ideal of
each), the time per GMAC, and the largest difference of its map from the à
trous map relative to the map's scale (on the cells both have; CaffeNet and
VGG16 pad inside, so shift-and-stitch and crops differ at the borders: the
numbers say how much).

Run::

    python benchmarks/finer_strides.py [--vgg-size 256] [--strides 16,8] [--repeats 1] [--skip-sliding]

Measured (2026-12-06, 2 CPU cores shared with 5 other jobs, TensorFlow CPU,
``--repeats 1``, defaults; times in seconds, GMAC in parentheses;
"s/GMAC÷FCN": the à trous pass's time per GMAC over the stride-32 FCN's, 1.0
being its multiply-accumulate ideal; "÷sliding", "÷stitch": their time over
à trous'; diffs relative to the map's scale). With ``--engine auto`` (the
default: each pass's fastest execution, XLA here):

| case | s | cells | à trous (diff at FCN cells) | s/GMAC÷FCN | stitch (diff) | sliding (diff) | ÷sliding | ÷stitch |
|---|---|---|---|---|---|---|---|---|
| CaffeNet 451^2 | 16 | 225 | 1.46 (16.0, 0.0e+00) | 1.04x | 3.96 (26.2, 3.2e-01) | 14.15 (163, 9.8e-01) | 9.7x | 2.7x |
| CaffeNet 451^2 | 8 | 841 | 4.39 (56.3, 0.0e+00) | 0.88x | 16.91 (105, 3.6e-01) | 39.34 (609, 9.9e-01) | 9.0x | 3.8x |
| VGG16 256^2 | 16 | 9 | 1.09 (21.2, 5.3e-07) | 0.58x | 5.32 (82.2, 1.4e-01) | 5.60 (139, 3.0e-01) | 5.1x | 4.9x |
| VGG16 256^2 | 8 | 25 | 1.75 (28.1, 6.7e-07) | 0.70x | 20.00 (329, 1.9e-01) | 14.86 (387, 2.9e-01) | 8.5x | 11.4x |

With ``--engine tf`` (an earlier run, same machine):

| case | s | cells | à trous (diff at FCN cells) | s/GMAC÷FCN | stitch (diff) | sliding (diff) | ÷sliding | ÷stitch |
|---|---|---|---|---|---|---|---|---|
| CaffeNet 451^2 | 16 | 225 | 1.35 (16.0, 2.9e-06) | 2.21x | 2.86 (26.2, 3.2e-01) | 8.44 (163, 9.8e-01) | 6.2x | 2.1x |
| CaffeNet 451^2 | 8 | 841 | 3.35 (56.3, 2.9e-06) | 1.56x | 11.72 (105, 3.6e-01) | 32.84 (609, 9.9e-01) | 9.8x | 3.5x |
| VGG16 256^2 | 16 | 9 | 1.25 (21.2, 9.3e-07) | 1.52x | 3.41 (82.2, 1.4e-01) | 5.24 (139, 3.0e-01) | 4.2x | 2.7x |
| VGG16 256^2 | 8 | 25 | 4.19 (28.1, 9.3e-07) | 3.82x | 21.25 (329, 1.9e-01) | 14.71 (387, 2.9e-01) | 3.5x | 5.1x |

VGG16 (random weights) at 1024^2, S/2, S/4, S/8, with the fragments way (multi-pooling, engine
``fragments``: space to batch at each removed stride, the tail undilated, batch to space at the end; its
models under XLA) (2026-12-06, 2 CPU cores shared with 3 other agents' jobs, load average 5-7, other tests of
this branch running during the S/2 and S/4 rows; one run: ``--cases vgg16 --vgg-size 1024 --strides 16,8,4
--sample-crops 64 --stitch-passes 2 --repeats 1``, ``KFS_ENGINE_CACHE=off``; à trous under ``xla``, the FCN
at S under ``auto``: 19.6 s for 404 GMAC; * extrapolated: the sliding window from a band of 51, 101 and 201
of its 2601, 10201 and 40401 crops, naive shift-and-stitch from 2 of its 4, 16 and 64 shifted passes):

| s | cells | à trous (GMAC) | tail stitch | fragments | ÷ideal | naive stitch | sliding | ÷sliding | ÷stitch |
|---|---|---|---|---|---|---|---|---|---|
| 16 | 2601 | 21.76 (642) | 30.83 (642) | 31.73 (655) | 0.70x | 128* (1617) | 1940* (40238) | 89.1x | 5.9x |
| 8 | 10201 | 72.33 (1667) | - | 79.89 (1745) | 0.89x | 339* (6469) | 6244* (157812) | 86.3x | 4.7x |
| 4 | 40401 | 159.25 (6027) | - | 181.55 (6394) | 0.54x | 895* (25875) | 14473* (625014) | 90.9x | 5.6x |

(diffs: à trous 3.3e-06 at the FCN's cells, the tail stitch 3.5e-06 and fragments 0.0 against à trous; à
trous is the chosen way in every row, the fastest of the three where they run.)

"÷ideal" is the chosen way's seconds per GMAC over the FCN's: under 1.0 here only because the one FCN pass
(19.6 s) fell in a slower spell of the shared machine than the rows. So the S/4 pair was timed again alone,
each pass in turn with the FCN, twice, in alternating order (the same day and machine, load average 4-6;
``xla``; seconds of each call after a warm-up call):

| pass | GMAC | calls (s) | best ÷ its MAC ideal | ÷ à trous' MACs |
|---|---|---|---|---|
| FCN at 32 | 404 | 13.20, 13.13 | 1.00x | - |
| à trous at 8 | 1667 | 56.18, 57.85 | 1.04x | 1.04x |
| fragments at 8 | 1745 | 59.18, 56.96 | 1.01x | 1.05x |

At S/4 the cheapest exact way (à trous, chosen; fragments within 2% of it) is 1.04x its MAC ideal (the goal:
1.2x; an earlier run on the same shared cores measured 1.30x against a single FCN pass) and 86x faster than the
batched sliding window (the goal: 10x). The fragments map equals the à trous map (diff 0.0 here). It
computes 5% more multiply-accumulates at S/4 (fragments are padded to one length where a side is not a
multiple of the removed stride) and rearranges the map once per removed stride; under XLA on this CPU the
two ways cost the same per multiply-accumulate (XLA's CPU convolutions seem to take the dilation without a
rearrangement around each), so the rearrangement buys nothing here. Traced without XLA it does: VGG16 256^2
at stride 8 (the same machine), à trous 3.43 s, fragments 3.28 s for 19% more MACs (1.95x against 2.42x of
the MAC ideal); both under XLA, 1.56 s and 1.64 s. ``auto`` keeps whichever measures faster where it runs
(a GPU, another backend).
Shift-and-stitch of the tail runs at S/2 only: deeper cuts leave VGG16's `same` convolutions in the tail,
which it refuses.

The shared machine makes single FCN passes noisy (ratios under 1.0 above are
that noise: VGG16's FCN pass took 1.83 s here, 1.0-1.1 s alone). Measured
alone, back to back (VGG16, 256^2, stride 8, second run): ``tf`` FCN 1.08 s,
à trous 2.47 s (1.66x its MAC ideal: TensorFlow's CPU dilated convolutions
are slower per MAC); ``xla`` FCN 1.00 s, à trous 1.64 s (about 1.2x). À trous
is the cheapest exact way in MACs and in time in every case. The large diffs
of shift-and-stitch and of the sliding window are the networks' internal
padding (CaffeNet's ZeroPadding, VGG16's `same`): cells whose window reaches
a border differ between a crop, a shifted image and the whole image; the
tests show equality where no padding enters. The sliding window of VGG16 at 1024^2 (S/4:
10201 windows, ~158 TMAC) is out of reach of 2 shared cores: it is timed on a
band of crops and extrapolated (``--sample-crops``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402
from keras_fcn_surgery.zoo import caffenet  # noqa: E402

STRIDE = 32


def best_time(function, repeats: int):
    """The result and best wall-clock seconds of ``repeats`` runs after one warm-up run (the warm-up's own
    time when ``repeats`` is 0)."""
    start = time.perf_counter()
    result = function()
    best = time.perf_counter() - start if repeats == 0 else float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def shift_and_stitch(fcn, image, stride: int, passes: int | None = None):
    """The stride-S FCN on every shifted image, interleaved into the map at ``stride`` (naive).

    Returns ``(map, seconds)``; with ``passes`` below the (S/s)^2 shifts, only that many run and ``map`` is None:
    the seconds are extrapolated from them (each shifted pass costs about the same).
    """
    factor = STRIDE // stride
    shifts = [(dy, dx) for dy in range(factor) for dx in range(factor)]
    run = shifts if passes is None or passes >= len(shifts) else shifts[:passes]
    maps = {}
    start = time.perf_counter()
    for dy, dx in run:
        maps[dy, dx] = np.asarray(fcn.predict(image[None, dy * stride :, dx * stride :], verbose=0)[0])
    seconds = time.perf_counter() - start
    if len(run) < len(shifts):
        return None, seconds * len(shifts) / len(run)
    rows = min(m.shape[0] for m in maps.values()) * factor
    cols = min(m.shape[1] for m in maps.values()) * factor
    out = np.zeros((rows, cols, maps[0, 0].shape[-1]), np.float32)
    for (dy, dx), m in maps.items():
        out[dy::factor, dx::factor] = m[: rows // factor, : cols // factor]
    return out, seconds


def sampled_sliding(classifier, image, stride: int, crops: int):
    """``(map or None, seconds, crops run, crops in all)``: the batched sliding window, or, past ``crops``
    windows, `sliding_window_predict` on a band of whole window rows holding about that many, its time
    extrapolated to every window (each batch of crops costs the same)."""
    window = int(classifier.inputs[0].shape[1])
    counts = [(n - window) // stride + 1 for n in image.shape[:2]]
    total = counts[0] * counts[1]
    if total <= crops:
        start = time.perf_counter()
        result = np.asarray(kfs.sliding_window_predict(classifier, image, stride))
        return result, time.perf_counter() - start, total, total
    rows = max(1, crops // counts[1])
    band = image[: (rows - 1) * stride + window]
    kfs.sliding_window_predict(classifier, band[:window, : window + stride], stride)  # warm-up: tracing
    start = time.perf_counter()
    kfs.sliding_window_predict(classifier, band, stride)
    seconds = time.perf_counter() - start
    return None, seconds * total / (rows * counts[1]), rows * counts[1], total


def relative(a, b) -> float:
    rows, cols = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    a, b = a[:rows, :cols], b[:rows, :cols]
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def run_case(name, classifier, size, strides, options) -> list[dict]:
    image = np.random.default_rng(0).random((size, size, 3), dtype=np.float32) * 255
    fcn = kfs.convert(classifier)
    engine, repeats = options.engine, options.repeats
    own, fcn_time = best_time(lambda: kfs.predict_map(fcn, image, engine=engine), max(repeats, 1))
    rows = []
    for stride in strides:
        plan = kfs.plan_prediction(classifier, (size, size), stride=stride)
        finer = plan.finer
        atrous_engine = "xla" if engine == "auto" else engine  # the à trous pass itself (auto may pick "stitch")
        atrous, atrous_time = best_time(
            lambda: kfs.predict_map(classifier, image, stride=stride, engine=atrous_engine), max(repeats, 1)
        )
        tail = None
        if not options.skip_tail_stitch and finer.tail_stitch_macs is not None:
            tail_map, tail_time = best_time(
                lambda: kfs.predict_map(classifier, image, stride=stride, engine="stitch"), max(repeats, 1)
            )
            tail = (tail_time, finer.tail_stitch_macs, relative(np.asarray(tail_map), np.asarray(atrous)))
        fragments = None
        if not options.skip_fragments and finer.fragments_macs is not None:
            fragments_map, fragments_time = best_time(
                lambda: kfs.predict_map(classifier, image, stride=stride, engine="fragments"), max(repeats, 1)
            )
            fragments = (fragments_time, finer.fragments_macs, relative(np.asarray(fragments_map), np.asarray(atrous)))
        factor = STRIDE // stride
        passes = None if factor**2 <= options.stitch_passes else options.stitch_passes
        stitched, stitch_time = shift_and_stitch(fcn, image, stride, passes)
        row = {
            "case": f"{name} {size}^2",
            "stride": stride,
            "cells": atrous.shape[0] * atrous.shape[1],
            "atrous": (atrous_time, finer.macs, relative(atrous[::factor, ::factor], np.asarray(own))),
            "stitch": (stitch_time, finer.stitch_macs, None if stitched is None else relative(stitched, atrous)),
            "stitch_note": "" if passes is None else f" (extrapolated from {passes} of {factor**2} passes)",
            "fcn": (fcn_time, finer.fcn_macs),
            "tail": tail,
            "fragments": fragments,
            "plan": str(finer),
        }
        if not options.skip_sliding:
            sliding, sliding_time, run, total = sampled_sliding(classifier, image, stride, options.sample_crops)
            diff = None if sliding is None else relative(sliding, atrous)
            row["sliding"] = (sliding_time, finer.sliding_macs, diff)
            row["sliding_note"] = "" if run == total else f" (extrapolated from {run} of {total} crops)"
        rows.append(row)
        print(row, flush=True)
    return rows


def _diff(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def print_table(rows) -> None:
    print(
        "\n| case | stride | cells | à trous s (GMAC, diff at the FCN's cells) | tail stitch s (GMAC, diff) "
        "| fragments s (GMAC, diff) | chosen ÷ its MAC ideal (÷ à trous' MACs) | naive shift-and-stitch s (GMAC, diff) "
        "| sliding window s (GMAC, diff) | chosen vs sliding | vs naive stitch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for r in rows:
        t, m, d = r["atrous"]
        ft, fm = r["fcn"]
        chosen, ct, cm = "à trous", t, m
        tail = "-"
        if r["tail"] is not None:
            tt, tm, td = r["tail"]
            tail = f"{tt:.2f} ({tm / 1e9:.1f}, {_diff(td)})"
            if tt < ct:
                chosen, ct, cm = "tail stitch", tt, tm
        fragments = "-"
        if r.get("fragments") is not None:
            gt, gm, gd = r["fragments"]
            fragments = f"{gt:.2f} ({gm / 1e9:.1f}, {_diff(gd)})"
            if gt < ct:
                chosen, ct, cm = "fragments", gt, gm
        efficiency = (ct / cm) / (ft / fm)  # seconds per MAC over the stride-S FCN pass's: 1.0 is the MAC ideal
        least = (ct / m) / (ft / fm)  # the same against à trous' MACs, the fewest any exact way computes
        st, sm, sd = r["stitch"]
        sliding = "skipped"
        speedup = "-"
        if "sliding" in r:
            wt, wm, wd = r["sliding"]
            sliding = f"{wt:.1f}{'*' if r['sliding_note'] else ''} ({wm / 1e9:.0f}, {_diff(wd)})"
            speedup = f"{wt / ct:.1f}x"
        stitch = f"{st:.1f}{'*' if r['stitch_note'] else ''} ({sm / 1e9:.0f}, {_diff(sd)})"
        print(
            f"| {r['case']} | {r['stride']} | {r['cells']} | {t:.2f} ({m / 1e9:.1f}, {_diff(d)}) | {tail} "
            f"| {fragments} | {chosen} {efficiency:.2f}x ({least:.2f}x) | {stitch} | {sliding} | {speedup} "
            f"| {st / ct:.1f}x |"
        )
        for key in ("stitch_note", "sliding_note"):
            if r.get(key):
                notes.append(f"{r['case']} s={r['stride']}: {key.split('_')[0]}{r[key]}")
    for note in notes:
        print(f"* {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg-size", type=int, default=256)
    parser.add_argument("--caffenet-size", type=int, default=451)
    parser.add_argument("--strides", default="16,8")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-sliding", action="store_true")
    parser.add_argument("--cases", default="caffenet,vgg16")
    parser.add_argument("--engine", default="auto", help="predict_map's engine for the FCN and à trous passes")
    parser.add_argument(
        "--sample-crops", type=int, default=512, help="past this many windows, time a band of them and extrapolate"
    )
    parser.add_argument("--skip-tail-stitch", action="store_true", help="do not time engine='stitch'")
    parser.add_argument("--skip-fragments", action="store_true", help="do not time engine='fragments'")
    parser.add_argument(
        "--stitch-passes", type=int, default=64, help="past this many shifted passes, time that many and extrapolate"
    )
    args = parser.parse_args(argv)
    strides = [int(s) for s in args.strides.split(",")]
    rows = []
    if "caffenet" in args.cases:
        rows += run_case("CaffeNet", caffenet(), args.caffenet_size, strides, args)
    if "vgg16" in args.cases:
        keras.utils.set_random_seed(0)
        vgg = keras.applications.VGG16(weights=None)
        rows += run_case("VGG16", vgg, args.vgg_size, strides, args)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
