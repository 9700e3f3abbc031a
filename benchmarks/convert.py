"""Conversion cost for VGG16: time over the clone floor, and peak extra memory.

The floor is what any conversion must do: `keras.models.clone_model` (new
layers, new variables) plus copying the weights. Targets: time ratio <= 1.5;
peak extra memory during conversion <= 1.3 x the model's weight bytes.
Each measurement runs in a fresh process so memory high-water marks don't mix.

    python benchmarks/convert.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CASES = ("floor", "convert", "convert_verified")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples this process's RSS every millisecond in a thread."""

    def __init__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _measure(case: str) -> dict:
    import gc

    import keras

    import keras_fcn_surgery as kfs

    model = keras.applications.VGG16(weights=None)
    weight_bytes = sum(int(w.numpy().nbytes) for w in model.weights)
    # Warm up code paths (imports, first graph build) on a tiny model.
    tiny = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    kfs.convert(tiny)
    keras.models.clone_model(tiny).set_weights(tiny.get_weights())
    gc.collect()
    baseline = _rss_bytes()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        if case == "floor":
            clone = keras.models.clone_model(model)
            for old, new in zip(model.weights, clone.weights):
                new.assign(old.value)
        else:
            clone = kfs.convert(model, verify=case == "convert_verified")
        seconds = time.perf_counter() - start
    return {"case": case, "seconds": seconds, "peak_extra": sampler.peak - baseline, "weight_bytes": weight_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_measure(args.case)))
        return
    results: dict[str, list[dict]] = {case: [] for case in CASES}
    for _ in range(args.repeats):
        for case in CASES:
            out = subprocess.run(
                [sys.executable, __file__, "--case", case], check=True, capture_output=True, text=True
            ).stdout
            results[case].append(json.loads(out.strip().splitlines()[-1]))
    weight_mb = results["floor"][0]["weight_bytes"] / 2**20
    print(f"VGG16, {weight_mb:.0f} MiB of weights, best of {args.repeats} fresh processes")
    best = {case: min(r["seconds"] for r in runs) for case, runs in results.items()}
    peak = {case: min(r["peak_extra"] for r in runs) / 2**20 for case, runs in results.items()}
    for case in CASES:
        ratio = peak[case] / weight_mb
        print(f"  {case:17s} {best[case]:6.2f} s   peak extra memory {peak[case]:7.0f} MiB = {ratio:.2f} x weights")
    print(f"time ratio convert / floor: {best['convert'] / best['floor']:.2f} (target <= 1.5)")
    print(f"time ratio convert(verify=True) / floor: {best['convert_verified'] / best['floor']:.2f}")
    print(f"peak extra memory of convert: {peak['convert'] / weight_mb:.2f} x weights (target <= 1.3)")


if __name__ == "__main__":
    main()
