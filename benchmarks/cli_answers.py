"""How long the command line takes to answer simple mistakes and a rerun with nothing to do (issue 28).

Prints, for each command, the best of a few runs (a fresh process each):

- ``convert missing.keras out.keras`` (a missing model file: exit 2);
- ``heatmap`` with an output that exists (exit 2);
- ``predict`` on a folder whose outputs all exist (exit 0, "0 done, N skipped").

Target: under 1 s for the mistakes. Run::

    python benchmarks/cli_answers.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def _time(argv, cwd, runs: int) -> tuple[float, int]:
    best, code = float("inf"), -1
    for _ in range(runs):
        start = time.perf_counter()
        code = subprocess.run(
            [sys.executable, "-m", "keras_fcn_surgery.cli", *argv], cwd=cwd, capture_output=True
        ).returncode
        best = min(best, time.perf_counter() - start)
    return best, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        import keras

        keras.Sequential(
            [keras.Input((16, 16, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(), keras.layers.Dense(2)]
        ).save(os.path.join(folder, "model.keras"))
        os.makedirs(os.path.join(folder, "images"))
        for n in range(3):
            pixels = np.random.default_rng(n).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, "images", f"image{n}.png"))
        Image.new("RGB", (8, 8)).save(os.path.join(folder, "map.png"))
        predict = ["predict", "model.keras", "images", "--out", "maps"]
        subprocess.run([sys.executable, "-m", "keras_fcn_surgery.cli", *predict], cwd=folder, capture_output=True)
        cases = {
            "convert missing.keras out.keras": ["convert", "missing.keras", "out.keras"],
            "heatmap ... -o map.png (exists)": [
                "heatmap",
                "model.keras",
                "images/image0.png",
                "--class",
                "0",
                "-o",
                "map.png",
            ],
            "predict (every output exists)": predict,
        }
        for label, argv in cases.items():
            seconds, code = _time(argv, folder, args.runs)
            print(f"{label}: {seconds:.2f} s (exit {code})")


if __name__ == "__main__":
    main()
