"""The time of each execution of `predict_map` (tf, xla, blas) and of the default ("auto"), on this machine.

For CaffeNet at 451x451 and VGG16 at 512x512 and 1024x1024 (random weights,
nothing downloaded; converted with `kfs.convert(..., verify=False)`), one
whole-image `predict_map` per call. The default's first call measures the
candidates (`inference.engines`; its cost, "first use", is printed apart,
with the cache file in a temporary folder so that it does measure); then
every engine and the default run in turn, round after round in a new random
order (machines are noisy: a slow spell falls on all of them, and no engine
always follows the same one), and the best
round of each is kept. Target: the default within 5% of the fastest, for
each model.

Run (several minutes on 2 CPU cores)::

    python benchmarks/engines.py [--rounds 3] [--only vgg16@512] [--keep-cache]

On a loaded machine, raise ``--rounds``: "auto" runs the very function of the
engine it chose, so a gap between the two is the machine's noise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402
from keras_fcn_surgery.inference import engines  # noqa: E402
from keras_fcn_surgery.zoo import caffenet  # noqa: E402

CASES = {
    "caffenet@451": (lambda: caffenet(), 451),
    "vgg16@512": (lambda: keras.applications.VGG16(weights=None), 512),
    "vgg16@1024": (lambda: keras.applications.VGG16(weights=None), 1024),
}


def run_case(name: str, rounds: int) -> dict:
    build, size = CASES[name]
    fcn = kfs.convert(build(), verify=False)
    image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype("float32")
    names = list(engines.candidates(fcn))
    for engine in names:  # warm-up: tracing and compiling are not counted
        kfs.predict_map(fcn, image, engine=engine)
    start = time.perf_counter()
    kfs.predict_map(fcn, image)  # the default's first use: it measures (or reads the cache file)
    first_use = time.perf_counter() - start
    plan = kfs.plan_prediction(fcn, (size, size), engine="auto")
    order = [*names, "auto"]
    best = {engine: float("inf") for engine in order}
    shuffle = np.random.default_rng(0)
    for _ in range(rounds):
        # A new random order each round: numpy's BLAS threads spin a while after a call, so whatever runs
        # right after "blas" is slowed; a fixed rotation would always put the same engine there.
        for engine in shuffle.permutation(order):
            start = time.perf_counter()
            kfs.predict_map(fcn, image, engine=engine)
            best[engine] = min(best[engine], time.perf_counter() - start)
    return {"best": best, "first_use": first_use, "choice": plan.engine, "reason": plan.engine_reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of every engine (default 3)")
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run these cases only")
    parser.add_argument("--keep-cache", action="store_true", help="use the usual cache file (may skip measuring)")
    args = parser.parse_args()
    if not args.keep_cache:
        folder = tempfile.mkdtemp(prefix="kfs-engine-bench-")
        os.environ[engines.CACHE_ENV] = os.path.join(folder, "engines.json")
    print(f"host: {engines.host_fingerprint()}")
    header = (
        f"{'case':>14s} {'tf s':>7s} {'xla s':>7s} {'blas s':>7s} {'auto s':>7s} {'chose':>5s} "
        f"{'chosen/best':>11s} {'auto/best':>9s} {'ok':>3s}"
    )
    rows = []
    for name in args.only or list(CASES):
        result = run_case(name, args.rounds)
        best = result["best"]
        fastest = min(t for engine, t in best.items() if engine != "auto")
        ratio = best["auto"] / fastest
        cells = " ".join(f"{best[e]:>7.2f}" if e in best else f"{'-':>7s}" for e in ("tf", "xla", "blas", "auto"))
        chosen = best[result["choice"]] / fastest  # auto runs the chosen engine's own cached function
        rows.append(
            f"{name:>14s} {cells} {result['choice']:>5s} {chosen:>11.3f} {ratio:>9.3f} "
            f"{'yes' if ratio <= 1.05 else 'NO':>3s}"
        )
        print(
            f"{name}: default chose {result['choice']} ({result['reason']}); first use {result['first_use']:.1f} s",
            flush=True,
        )
    print(header)
    print("\n".join(rows))
    print(
        "ok: the default (auto, after its first use) within 5% of the fastest engine, best of the rounds each; "
        "chosen/best: the best time of the engine auto chose over the fastest's (the choice itself)"
    )


if __name__ == "__main__":
    main()
