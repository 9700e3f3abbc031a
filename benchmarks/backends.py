"""`predict_map`'s time on each Keras backend (TensorFlow, JAX), side by side, on this machine.

Each backend runs in its own process (Keras reads ``KERAS_BACKEND`` once, at
import): the model is converted there (random weights, nothing downloaded,
``verify=False``) and timed by `benchmarks/engines.py`'s `run_case`: every
engine the backend offers (TensorFlow: tf, xla, blas; JAX: jax, blas) and the
default ("auto", after its first use, which measures), round after round in a
random order, best round of each. The last columns: the fastest engine on
that backend and its time over TensorFlow's fastest.

Run (VGG16 at 512 and CaffeNet at 451 by default, a few minutes on 2 CPU
cores; ``--only vgg16@1024 --only resnet50@1024`` for the large ones)::

    python benchmarks/backends.py [--rounds 3] [--only caffenet@451] [--backend jax]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax")
CASE_NAMES = ("caffenet@451", "vgg16@512", "vgg16@1024", "resnet50@512", "resnet50@1024")
DEFAULT_CASES = ("caffenet@451", "vgg16@512")
ENGINE_COLUMNS = ("tf", "xla", "jax", "blas", "auto")


def child(name: str, rounds: int) -> None:
    """Time one case on this process's backend and print the result as one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, HERE)
    import engines as engines_benchmark  # benchmarks/engines.py
    import keras

    model, size = name.split("@")
    if model == "resnet50":
        engines_benchmark.CASES[name] = (lambda: keras.applications.ResNet50(weights=None), int(size))
    os.environ["KFS_ENGINE_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="kfs-backend-bench-"), "engines.json")
    result = engines_benchmark.run_case(name, rounds)
    print(json.dumps({"backend": keras.backend.backend(), **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of every engine (default 3)")
    parser.add_argument("--only", choices=CASE_NAMES, action="append", help="run these cases only")
    parser.add_argument("--backend", choices=BACKENDS, action="append", help="these backends only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    print(f"{'case':>14s} {'backend':>10s} " + " ".join(f"{e + ' s':>7s}" for e in ENGINE_COLUMNS) + " chose  fastest")
    for name in args.only or DEFAULT_CASES:
        reference = None
        for backend in args.backend or BACKENDS:
            environment = {**os.environ, "KERAS_BACKEND": backend}
            command = [sys.executable, __file__, "--child", name, "--rounds", str(args.rounds)]
            done = subprocess.run(command, env=environment, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                print(f"{name:>14s} {backend:>10s} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            result = json.loads(lines[-1])
            best = result["best"]
            fastest = min(seconds for engine, seconds in best.items() if engine != "auto")
            reference = fastest if backend == "tensorflow" else reference
            cells = " ".join(f"{best[e]:>7.2f}" if e in best else f"{'-':>7s}" for e in ENGINE_COLUMNS)
            versus = f" ({fastest / reference:.2f}x tf)" if reference and backend != "tensorflow" else ""
            print(f"{name:>14s} {backend:>10s} {cells} {result['choice']:>5s} {fastest:>7.2f}{versus}", flush=True)


if __name__ == "__main__":
    main()
