"""Dense prediction with the converted FCN versus a sliding window, and tiled versus whole-image passes.

Part 1: for CaffeNet at 451x451 and VGG16 at 512x512 and 1024x1024 (random
weights, nothing downloaded), the time of one FCN pass, of the batched sliding
window at the network's stride (32) with the source classifier, and of one
window; the measured speedup is printed next to the ratio of
multiply-accumulates (MACs of convolutions and dense layers, computed from the
layers' shapes), the speedup an implementation with equal efficiency would get.
Target: default `predict_map` >= 0.85 x that ratio (it picks XLA for
the fastest execution by itself, `engines`); `engine="tf"` is shown beside it.

Part 2: one large image through the FCN whole and in exact tiles, each in a
fresh process: time (second of two runs) and peak resident memory
(``VmHWM``, reset after the model is built; "growth" is the peak over the
resident memory before the pass). The tiles must overlap by about the receptive field, so tiling
costs at least the "computed area" ratio printed; the target was an overhead
<= 15% for tiles of 1024 pixels or more.

Run (a few minutes on 2 CPU cores; --quick skips the slowest parts)::

    python benchmarks/dense_vs_sliding.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402
from keras_fcn_surgery.graph import graph_of, is_graph_model, nodes_in_order  # noqa: E402
from keras_fcn_surgery.inference import engines  # noqa: E402
from keras_fcn_surgery.zoo import caffenet  # noqa: E402

STRIDE = 32
MODELS = {
    "caffenet": lambda: caffenet(),
    "vgg16": lambda: keras.applications.VGG16(weights=None),
}


def layer_macs(layer, input_shape, output_shape) -> int:
    """Multiply-accumulates of one call of a convolution or dense layer (0 for other layers)."""
    out = int(np.prod(output_shape[1:]))
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return out * int(np.prod(layer.kernel_size))
    if isinstance(layer, keras.layers.SeparableConv2D):
        depthwise = int(np.prod(input_shape[1:])) * layer.depth_multiplier * int(np.prod(layer.kernel_size))
        return depthwise + out * input_shape[-1] * layer.depth_multiplier
    if isinstance(layer, keras.layers.Conv2D):
        channels = input_shape[-1] if layer.data_format == "channels_last" else input_shape[1]
        return out * int(np.prod(layer.kernel_size)) * channels // layer.groups
    if isinstance(layer, keras.layers.Dense):
        return out * input_shape[-1]
    return 0


def count_macs(model, input_shape) -> int:
    """MACs of one forward pass at ``input_shape`` (with batch), shapes propagated layer by layer."""
    total, _ = _count(graph_of(model), [tuple(input_shape)])
    return total


def _count(graph, input_shapes):
    shapes = {id(t): s for t, s in zip(graph.inputs, input_shapes)}
    total = 0
    for node in nodes_in_order(graph):
        layer = node.operation
        inputs = [shapes[id(t)] for t in node.input_tensors]
        if is_graph_model(layer):
            inner, outputs = _count(graph_of(layer), inputs)
            total += inner
        else:
            output = layer.compute_output_shape(inputs[0] if len(inputs) == 1 else inputs)
            outputs = [tuple(output)] if not isinstance(output, list) else [tuple(o) for o in output]
            total += layer_macs(layer, inputs[0], outputs[0])
        for tensor, shape in zip(node.outputs, outputs):
            shapes[id(tensor)] = shape
    return total, [shapes[id(t)] for t in graph.outputs]


def best_time(function, repeats: int, warmup=None) -> tuple[float, float, float]:
    """Best wall-clock and best CPU (process, all threads) seconds over ``repeats`` runs after a warm-up,
    and the wall-clock seconds of the warm-up (tracing and XLA compilation included).

    CPU time barely moves when other processes share the cores; wall time does.
    """
    first = time.perf_counter()
    (warmup or function)()  # trace, compile, allocate
    first = time.perf_counter() - first
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), first


def dense_vs_sliding(name: str, size: int, repeats: int, sliding_repeats: int, batch_size: int) -> dict:
    classifier = MODELS[name]()
    fcn = kfs.convert(classifier, verify=False)
    window = tuple(classifier.inputs[0].shape[1:3])
    image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype("float32")
    count = ((size - window[0]) // STRIDE + 1) * ((size - window[1]) // STRIDE + 1)
    window_macs = count_macs(classifier, (1, *window, 3))
    fcn_macs = count_macs(fcn, (1, size, size, 3))
    one = engines.forward(classifier, "tf")
    crop = image[None, : window[0], : window[1]]
    corner = image[: window[0] + 8 * STRIDE, : window[1] + 8 * STRIDE]  # 81 windows: traces the batch shape
    row = {
        "model": name,
        "size": size,
        "windows": count,
        "window_gmacs": window_macs / 1e9,
        "sliding_gmacs": count * window_macs / 1e9,
        "fcn_gmacs": fcn_macs / 1e9,
        "ideal": count * window_macs / fcn_macs,
        "one": best_time(lambda: one(crop), repeats),
        "fcn": best_time(lambda: kfs.predict_map(fcn, image), repeats),
        "xla": best_time(lambda: kfs.predict_map(fcn, image, engine="tf"), repeats),
        "sliding": best_time(
            lambda: kfs.sliding_window_predict(classifier, image, STRIDE, batch_size=batch_size),
            sliding_repeats,
            warmup=lambda: kfs.sliding_window_predict(classifier, corner, STRIDE, batch_size=batch_size),
        ),
    }
    return row


def print_dense_table(rows) -> None:
    print("\n== Dense FCN pass vs batched sliding window (source classifier), stride 32 ==")
    print("seconds as wall / CPU (process time of all threads; steady when other processes share the cores)")
    print(
        f"{'model':9s} {'image':>9s} {'windows':>7s} {'GMAC/win':>8s} {'GMAC sw':>8s} {'GMAC fcn':>8s} "
        f"{'ideal':>6s} | {'1 window':>13s} {'sliding window':>15s} {'FCN default':>13s} {'FCN no XLA':>13s}"
    )
    for r in rows:
        print(
            f"{r['model']:9s} {r['size']:>4d}x{r['size']:<4d} {r['windows']:>7d} {r['window_gmacs']:>8.2f} "
            f"{r['sliding_gmacs']:>8.1f} {r['fcn_gmacs']:>8.1f} {r['ideal']:>6.2f} | "
            + " ".join(
                f"{r[k][0]:>6.3f}/{r[k][1]:<6.3f}".rjust(w)
                for k, w in (("one", 13), ("sliding", 15), ("fcn", 13), ("xla", 13))
            )
        )
    print(
        "\nspeedup = sliding window / FCN, and as a share of the ideal (the MAC ratio); target: default "
        "`predict_map` >= 0.85 x ideal. 'no XLA': engine='tf'. compile s: first call - best call of the "
        "default (tracing and XLA compilation, paid once per tile shape)"
    )
    print(
        f"{'model':9s} {'image':>9s} {'ideal':>6s} | {'wall':>6s} {'x ideal':>7s} {'CPU':>6s} {'x ideal':>7s} | "
        f"{'noX wall':>8s} {'x ideal':>7s} {'noX CPU':>7s} {'x ideal':>7s} | {'compile s':>9s} | verdict"
    )
    for r in rows:
        ratios = [r["sliding"][i] / r[k][i] for k in ("fcn", "xla") for i in (0, 1)]
        default_cpu = ratios[1] / r["ideal"]
        verdict = "met" if default_cpu >= 0.85 else "NOT met"
        compile_seconds = max(r["fcn"][2] - r["fcn"][0], 0.0)
        print(
            f"{r['model']:9s} {r['size']:>4d}x{r['size']:<4d} {r['ideal']:>6.2f} | {ratios[0]:>6.2f} "
            f"{ratios[0] / r['ideal']:>7.2f} {ratios[1]:>6.2f} {ratios[1] / r['ideal']:>7.2f} | {ratios[2]:>8.2f} "
            f"{ratios[2] / r['ideal']:>7.2f} {ratios[3]:>7.2f} {ratios[3] / r['ideal']:>7.2f} | "
            f"{compile_seconds:>9.2f} | {verdict} (default CPU {default_cpu:.2f} x ideal)"
        )


def _memory_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc (Linux) or getrusage."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so the baseline is what the model really holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Restart the peak-RSS count (Linux >= 4.0), so the model's loading does not mask the pass."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child(config: dict) -> None:
    """One tiled or whole-image pass in this fresh process; prints JSON with time and peak memory."""
    fcn = kfs.load_model(config["fcn_path"])
    size = config["size"]
    image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype("float32")
    gc.collect()
    _release_free_memory()
    config["peak_reset"] = _reset_peak()
    baseline, _ = _memory_mib()
    tile = config["tile"]
    kfs.predict_map(fcn, image, tile=tile)
    wall, cpu = time.perf_counter(), time.process_time()
    kfs.predict_map(fcn, image, tile=tile)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    _, peak = _memory_mib()
    area = 1.0
    if tile is not None:
        plan = kfs.plan_prediction(fcn, (size, size), tile=tile)
        area = plan.work_ratio  # MACs planned over one whole pass (staged tiles when that computes less)
        config["tiles"] = sum(stage.tiles for stage in plan.stages)
        config["tile_used"] = plan.stages[0].tile[0]
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "baseline_mib": baseline, "peak_mib": peak, "area": area}
    print(json.dumps({**config, **result}))


def run_child(config: dict) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {config} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiled_vs_whole(model: str, size: int, tiles, rounds: int) -> None:
    print(f"\n== {model} on {size}x{size}: whole image vs exact tiles (fresh process each, best of {rounds}) ==")
    folder = tempfile.mkdtemp(prefix="dense_vs_sliding-")
    path = os.path.join(folder, f"{model}_fcn.keras")
    kfs.convert(MODELS[model](), verify=False).save(path)
    try:
        configs = [{"fcn_path": path, "size": size, "tile": tile} for tile in (None, *tiles)]
        runs = [[run_child(config) for config in configs] for _ in range(rounds)]  # round-robin: fair to drift
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for results in zip(*runs):
        row = dict(results[0])
        for key in ("seconds", "cpu_seconds"):
            row[key] = min(r[key] for r in results)
        row["peak_mib"] = max(r["peak_mib"] for r in results)
        rows.append(row)
    whole = rows[0]
    print(
        f"{'pass':>10s} {'tiles':>5s} {'tile px':>7s} {'wall s':>7s} {'CPU s':>7s} {'overhead':>8s} {'CPU':>6s} "
        f"{'area':>5s} {'CPU/area':>8s} {'before MiB':>10s} {'peak MiB':>8s}"
    )
    for r in rows:
        label = "whole" if r["tile"] is None else f"tile {r['tile']}"
        wall = r["seconds"] / whole["seconds"] - 1
        cpu = r["cpu_seconds"] / whole["cpu_seconds"] - 1
        print(
            f"{label:>10s} {r.get('tiles', 1):>5d} {r.get('tile_used', size):>7d} {r['seconds']:>7.2f} "
            f"{r['cpu_seconds']:>7.2f} {100 * wall:>7.0f}% {100 * cpu:>5.0f}% {r['area']:>5.2f} "
            f"{(1 + cpu) / r['area']:>8.2f} {r['baseline_mib']:>10.0f} {r['peak_mib']:>8.0f}"
        )
    print(
        "overhead: tiled / whole - 1, wall and CPU time (target <= 10%). area: planned MACs / one whole pass, "
        "the overlap that the receptive field forces on exact tiles. CPU/area: the tiled cost beyond that overlap "
        "(1.00 = none). before/peak: resident memory with the model loaded, and its peak during the passes "
        "(memory the process freed earlier is reused, so compare peaks)."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip VGG16 at 1024 and use a smaller tiling image")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument("--no-tiling", action="store_true", help="skip part 2")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each part-2 process (best time is kept)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    print(f"TensorFlow on {os.cpu_count()} CPU cores; load average at start {os.getloadavg()[0]:.2f}")
    cases = [("caffenet", 451, args.repeats, 64), ("vgg16", 512, 1, 32)]
    if not args.quick:
        cases.append(("vgg16", 1024, 1, 32))
    rows = []
    for name, size, sliding_repeats, batch in cases:
        rows.append(dense_vs_sliding(name, size, args.repeats, sliding_repeats, batch))
        print(f"  measured {name} {size} (load average {os.getloadavg()[0]:.2f})", flush=True)
    print_dense_table(rows)
    if not args.no_tiling:
        sizes = (1536, [1024]) if args.quick else (2048, [1024, 1536])
        tiled_vs_whole("vgg16", *sizes, rounds=1 if args.quick else args.rounds)
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (other processes share these cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
