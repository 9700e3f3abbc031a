"""Resident memory of a windowed map on a large image: bands of window rows against one whole shared map (issue 24).

A small squeeze-and-excitation classifier of 64 x 64 pixels whose shared
prefix (two convolutions, 32 channels, stride 2) makes a large map: on a SIDE
x SIDE image (default 4096, float32, read from a ``.npy`` memory map, never
whole) the prefix's map of the whole image is (SIDE / 2)^2 x 32 float32 (512
MiB at the default). Each case runs in a fresh process that first computes a
small image (tracing), then ``predict_map(model, image, stride=STRIDE,
tile=1024, memory_budget=...)`` on the large one; the figure is the growth of
the process's peak resident memory (``ru_maxrss``) over the large run, with
the plan's bands and the bytes of a band's shared map, and the largest
difference between the two maps.

- ``bands``: the default budget (64 MiB): bands of window rows, the prefix
  over each band's rows only;
- ``whole``: a budget above the whole map: one band, the whole shared map in
  memory (what every pass held before bands, or wrote to a temporary file of
  its full size past the budget).

Measured on 2 shared CPU cores (2026-12-02), stride 32, maps equal bit for bit:

| SIDE (whole shared map) | case | bands x rows | band map | peak RSS growth | time |
|---|---|---|---|---|---|
| 2048 (128 MiB) | bands | 3 x 31 | 63 MiB | 197 MiB | 1.1 s |
| 2048 (128 MiB) | whole | 1 x 63 | 127 MiB | 281 MiB | 1.9 s |
| 4096 (511 MiB) | bands | 9 x 15 | 63 MiB | 223 MiB | 4.4 s |
| 4096 (511 MiB) | whole | 1 x 127 | 511 MiB | 642 MiB | 9.3 s |

The banded run's growth stays near the budget plus the prefix's tiles in
flight (and TensorFlow's first large pass) as the image grows 4x.

Run (a few minutes on 2 CPU cores)::

    python benchmarks/windowed_memory.py [--side 4096] [--stride 32]
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
    import numpy as np
    import keras_fcn_surgery as kfs

    path, stride, budget, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    L = keras.layers
    keras.utils.set_random_seed(0)
    x = keras.Input((64, 64, 3))
    y = L.Conv2D(32, 3, strides=2, activation="relu")(x)
    y = L.Conv2D(32, 3, activation="relu")(y)
    s = L.GlobalAveragePooling2D(keepdims=True)(y)
    y = L.Multiply()([y, L.Conv2D(32, 1, activation="sigmoid")(s)])
    y = L.Conv2D(16, 3, strides=2, activation="relu")(y)
    model = keras.Model(x, L.Dense(4)(L.GlobalAveragePooling2D()(y)))
    options = dict(stride=stride, tile=1024, memory_budget=budget)
    small = np.random.default_rng(1).standard_normal((256, 256, 3)).astype("float32")
    kfs.predict_map(model, small, **options)  # traces the graphs
    image = np.load(path, mmap_mode="r")
    plan = kfs.plan_prediction(model, image.shape[:2], **options)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    scores = kfs.predict_map(model, image, **options)
    seconds = time.perf_counter() - started
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    np.save(out, scores)
    print(json.dumps({"grown_mib": grown / 1024, "seconds": seconds, "bands": plan.bands,
                      "band_rows": plan.band_rows, "band_mib": plan.band_bytes / 2**20, "store": plan.band_store,
                      "windows": plan.windows, "split": plan.split}))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--stride", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "image.npy")
        image = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.side, args.side, 3))
        rng = np.random.default_rng(0)
        for first in range(0, args.side, 512):
            image[first : first + 512] = rng.standard_normal(image[first : first + 512].shape)
        image.flush()
        del image
        results, maps = {}, {}
        for name, budget in (("bands", 64 << 20), ("whole", 1 << 40)):
            out = os.path.join(folder, f"{name}.npy")
            done = subprocess.run(
                [sys.executable, "-c", _RUN, path, str(args.stride), str(budget), out],
                check=True,
                capture_output=True,
                text=True,
            )
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            maps[name] = np.load(out)
    whole_map = (args.side // 2 - 2) ** 2 * 32 * 4 / 2**20
    print(f"{args.side} x {args.side} image, stride {args.stride}: shared map of the whole image {whole_map:.0f} MiB")
    print("| case | bands | rows a band | band map | peak RSS growth | time |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['bands']} | {r['band_rows']} | {r['band_mib']:.0f} MiB ({r['store']}) | "
            f"{r['grown_mib']:.0f} MiB | {r['seconds']:.1f} s |"
        )
    scale = float(np.abs(maps["whole"]).max())
    print(f"max |bands - whole| / scale: {float(np.abs(maps['bands'] - maps['whole']).max()) / scale:.2g}")


if __name__ == "__main__":
    main()
