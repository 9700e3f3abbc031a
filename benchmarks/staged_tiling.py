"""Staged tiling versus plain exact tiles versus one whole-image pass (VGG16, random weights).

Part 1, the target: VGG16 at 2048 x 2048 with tiles of 1024 pixels. Time: the
whole pass and the staged pass alternate in one process, after one warm-up
pass of each (the warm-up is the first pass: tracing and XLA compilation of
each new shape, reported as the compile cost); the ratio is the median of the
ratios of neighbouring passes, robust to the load drifting on a shared
machine, and min/min beside it. Memory: each configuration in a fresh
process, one pass, peak resident growth. Target: staged / whole <= 1.10
(plain tiles: 1.98 when measured on 2026-11-22).

Part 2, the table: the planned work (multiply-accumulates over one whole pass)
of plain and staged tiles across tile sizes (512, 1024, 2048) and image sizes
(1024 to 16384), from `plan_prediction` (no pass is run): where staging wins.

Part 3, bounded memory (``--large``): an 8192 x 8192 image read from a
memory-mapped ``.npy`` file, staged tiles of 1024, the map written into a zarr
store (``out=``, as for a slide), in a fresh process (peak resident growth,
target <= 1.5 GiB); then, in the same process, whole passes of a 2048 x 2048
image: wall time per megapixel of the 8192 pass against theirs (target:
within 10%). Then, in a second fresh process, the 8192 pass again, with a
whole 2048 pass before it, after it and after every 45 s of it: a pass of
seven minutes sees the machine's speed drift by 10-25% on a shared machine,
and this compares each stretch with the whole passes around it. Before each
whole pass the large pass's dirty pages are flushed to disk, the flush counted
in the large pass's time, so that its writeback does not slow the whole passes
(``--no-interleave`` skips it). About 22 minutes on 2 cores; run it in the
background.

Run it with TensorFlow's default oneDNN setting for the machine: with
``TF_ENABLE_ONEDNN_OPTS=1`` forced on an AVX2 CPU, a single 348 x 348 x 128
tile through VGG16's block 3 ran for over 25 minutes (batches of two took 9 s),
a oneDNN pathology seen on 2026-11-22.

Run::

    python benchmarks/staged_tiling.py [--quick] [--large] [--rounds 4] [--no-plain]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402
from keras_fcn_surgery.inference.predict import plan_prediction  # noqa: E402


def _memory_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def child(config: dict) -> None:
    """One configuration in this fresh process; prints one JSON line."""
    fcn = kfs.load_model(config["fcn_path"])
    size = config["size"]
    if config.get("image_path"):
        image = np.load(config["image_path"], mmap_mode="r")
    else:
        image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype("float32")
    options = {"tile": config["tile"], "staged": config["staged"]}
    plan = plan_prediction(fcn, (size, size), **options)
    if config.get("zarr_out"):  # the map itself on disk, as a slide-scale user writes it (README, predict_map)
        import zarr

        cells = kfs.geometry(fcn).output_size((size, size))
        classes = int(fcn.outputs[0].shape[-1])
        options["out"] = zarr.open_array(
            config["zarr_out"], mode="w", shape=(*cells, classes), chunks=(64, 64, classes), dtype="float32"
        )
    if config.get("interleave"):  # time only, whole 2048 passes between the large pass's stages
        print(json.dumps({**config, **interleaved(fcn, image, options, plan)}))
        return
    gc.collect()
    _reset_peak()
    baseline, _ = _memory_mib()
    passes = []
    with timed_stages() as stages:
        for _ in range(config["passes"]):
            wall, cpu = time.perf_counter(), time.process_time()
            kfs.predict_map(fcn, image, **options)
            passes.append((time.perf_counter() - wall, time.process_time() - cpu))
    _, peak = _memory_mib()
    reference = []
    if config.get("reference_passes"):  # whole passes of a 2048 image, side by side with the large pass
        side = config.get("reference_size", 2048)
        small = np.random.default_rng(1).uniform(0, 255, (side, side, 3)).astype("float32")
        kfs.predict_map(fcn, small)  # warm-up: traces and compiles the whole-image shape
        os.sync()  # the large pass's spilled maps are not written back during the whole passes
        for _ in range(config["reference_passes"]):
            wall = time.perf_counter()
            kfs.predict_map(fcn, small)
            reference.append(time.perf_counter() - wall)
    result = {
        "seconds": passes[-1][0],
        "cpu_seconds": passes[-1][1],
        "first_seconds": passes[0][0],
        "baseline_mib": baseline,
        "growth_mib": peak - baseline,
        "stages": len(plan.stages),
        "tiles": sum(s.tiles for s in plan.stages),
        "work": plan.work_ratio,
        "plan_peak_mib": plan.peak_bytes / 2**20,
        "reference_seconds": reference,
        "stage_seconds": stages[-len(plan.stages) :] if plan.staged else [],
    }
    print(json.dumps({**config, **result}))


@contextlib.contextmanager
def timed_stages(excluded=lambda: 0.0, counted=lambda: True):
    """Collects each stage's wall time of the staged passes run inside, less the ``excluded()`` seconds in it.

    A stage run while ``counted()`` is false (a whole pass run inside a stage) is not collected.
    """
    from keras_fcn_surgery.inference import runner

    run_tiles, stages = runner.run_tiles, []

    def timed_stage(*args, **kwargs):
        if not counted():
            return run_tiles(*args, **kwargs)
        wall, skipped = time.perf_counter(), excluded()
        result = run_tiles(*args, **kwargs)
        stages.append(time.perf_counter() - wall - (excluded() - skipped))
        return result

    runner.run_tiles = timed_stage
    try:
        yield stages
    finally:
        runner.run_tiles = run_tiles


def interleaved(fcn, image, options: dict, plan, every: float = 45.0) -> dict:
    """Time one pass of ``image`` with a whole 2048 pass before it, after it and every ``every`` seconds inside it.

    Like the first pass of the other process, it traces and compiles each
    stage's tile shape as it comes (the whole passes are warmed up first).

    Robust to the machine's speed drifting over a pass of many minutes: each
    stretch of the large pass is compared with the whole passes just before
    and after it, and the reference is their mean weighted by the stretch's
    time. The whole passes are excluded from the large pass's time. Before
    each, the large pass's dirty pages (its spilled stage maps, the zarr map)
    are flushed to disk (`os.sync`) and the flush is counted in the large
    pass's time: the kernel's writeback is its cost, and must not slow the
    whole passes it would otherwise overlap.
    """
    from keras_fcn_surgery.inference import engines

    small = np.random.default_rng(1).uniform(0, 255, (2048, 2048, 3)).astype("float32")
    kfs.predict_map(fcn, small)  # warm-up: traces and compiles the whole-image shape
    # "active": functions made while patched stay in `engines`'s cache and must not checkpoint after the pass.
    state = {"active": True, "inside_whole": False, "mark": 0.0, "excluded": 0.0}
    wholes: list[float] = []
    stretches: list[float] = []

    def whole() -> None:
        state["inside_whole"] = True
        try:
            wall = time.perf_counter()
            kfs.predict_map(fcn, small)
            took = time.perf_counter() - wall
        finally:
            state["inside_whole"] = False
        wholes.append(took)
        state["excluded"] += took
        state["mark"] = time.perf_counter()

    def checkpoint() -> None:
        os.sync()
        stretches.append(time.perf_counter() - state["mark"])
        whole()

    forward_fn = engines.forward

    def forward_with_checkpoints(*args, **kwargs):
        forward = forward_fn(*args, **kwargs)

        def call(batch):
            result = forward(batch)
            if state["active"] and not state["inside_whole"] and time.perf_counter() - state["mark"] >= every:
                checkpoint()
            return result

        return call

    whole()
    engines.forward = forward_with_checkpoints
    try:
        with timed_stages(excluded=lambda: state["excluded"], counted=lambda: not state["inside_whole"]) as stages:
            kfs.predict_map(fcn, image, **options)
            checkpoint()
    finally:
        engines.forward = forward_fn
        state["active"] = False
    assert len(stages) == len(plan.stages), "one timing a stage"
    reference = sum(t * (a + b) / 2 for t, a, b in zip(stretches, wholes, wholes[1:])) / sum(stretches)
    return {
        "seconds": sum(stretches),
        "stage_seconds": stages,
        "stretch_seconds": stretches,
        "whole_seconds": wholes,
        "weighted_whole": reference,
    }


def alternating(config: dict) -> None:
    """Passes of one image taking turns in this process (whole first); prints one JSON line."""
    fcn = kfs.load_model(config["fcn_path"])
    size = config["size"]
    image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype("float32")
    passes = {_label(p): {"tile": p["tile"], "staged": p["staged"]} for p in config["passes_to_compare"]}
    first, times, cpu = {}, {name: [] for name in passes}, {name: [] for name in passes}
    for name, options in passes.items():
        wall = time.perf_counter()
        kfs.predict_map(fcn, image, **options)
        first[name] = time.perf_counter() - wall
    for index in range(config["rounds"]):
        order = list(passes) if index % 2 == 0 else list(passes)[::-1]  # A B B A: fair to a steady drift
        for name in order:
            wall, start = time.perf_counter(), time.process_time()
            kfs.predict_map(fcn, image, **passes[name])
            times[name].append(time.perf_counter() - wall)
            cpu[name].append(time.process_time() - start)
    print(json.dumps({**config, "first": first, "times": times, "cpu": cpu}))


LOG = None  # a JSON-lines file that keeps each finished measurement (--log), should a later one be cut short


def run_child(config: dict, timeout: int = 3600) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {config} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if LOG:
        with open(LOG, "a") as log:
            log.write(json.dumps(result) + "\n")
    return result


def _label(row) -> str:
    if row["tile"] is None:
        return "whole"
    return f"{'staged' if row['staged'] is not False else 'plain'} {row['tile']}"


def measured(fcn_path: str, size: int, tile: int, rounds: int, plain: bool) -> list[dict]:
    print(
        f"\n== VGG16 on {size}x{size}: whole / plain tiles / staged tiles "
        f"(time: {rounds} rounds taking turns in one process; memory: a fresh process each) =="
    )
    configs = [{"tile": None, "staged": None}, {"tile": tile, "staged": None}]
    if plain:
        configs.insert(1, {"tile": tile, "staged": False})
    turns = run_child({"fcn_path": fcn_path, "size": size, "rounds": rounds, "passes_to_compare": configs})
    rows = []
    for config in configs:
        row = run_child({"fcn_path": fcn_path, "size": size, "passes": 1, **config})
        label = _label(row)
        row.update(times=turns["times"][label], cpu=turns["cpu"][label], first=turns["first"][label])
        rows.append(row)
    whole = rows[0]
    print(
        f"{'pass':>12s} {'stages':>6s} {'tiles':>5s} {'work':>5s} {'1st s':>6s} {'min s':>6s} {'median s':>8s} "
        f"{'/whole':>6s} {'min/min':>7s} {'CPU/whole':>9s} {'growth MiB':>10s} {'plan MiB':>8s}"
    )
    for r in rows:
        pairs = [t / w for t, w in zip(r["times"], whole["times"])]
        r["ratio"], r["ratio_min"] = float(np.median(pairs)), min(r["times"]) / min(whole["times"])
        cpu = float(np.median([t / w for t, w in zip(r["cpu"], whole["cpu"])]))
        print(
            f"{_label(r):>12s} {r['stages']:>6d} {r['tiles']:>5d} {r['work']:>5.2f} {r['first']:>6.2f} "
            f"{min(r['times']):>6.2f} {float(np.median(r['times'])):>8.2f} {r['ratio']:>6.2f} {r['ratio_min']:>7.2f} "
            f"{cpu:>9.2f} {r['growth_mib']:>10.0f} {r['plan_peak_mib']:>8.0f}"
        )
        print(f"{'':>12s} passes: {' '.join(f'{t:.2f}' for t in r['times'])}")
    print(
        "work: planned MACs / one whole pass. 1st s: the first pass (tracing, XLA compilation of each new shape): "
        "the compile cost is its excess over the others, amortised over later passes and tiles. /whole: median "
        "of each pass's time over the whole pass of its round. growth: peak resident memory of one pass in a "
        "fresh process over the memory with the model loaded. Target: staged /whole <= 1.10."
    )
    return rows


def table(fcn, sizes, tiles) -> None:
    print("\n== Planned work over one whole pass: plain tiles -> staged tiles (stages), VGG16 ==")
    print(f"{'image':>11s} " + " ".join(f"{'tile ' + str(t):>22s}" for t in tiles))
    for size in sizes:
        cells = []
        for tile in tiles:
            if tile >= size:
                cells.append(f"{'one pass':>22s}")
                continue
            plain = plan_prediction(fcn, (size, size), tile=tile, staged=False)
            staged = plan_prediction(fcn, (size, size), tile=tile)
            text = f"{plain.work_ratio:.2f} -> {staged.work_ratio:.2f} ({len(staged.stages)})"
            cells.append(f"{text:>22s}")
        print(f"{size:>5d}x{size:<5d} " + " ".join(cells))
    print("staging wins wherever the tiles are much smaller than the image (the plain overhead is the overlap).")


def large(fcn_path: str, whole_2048: dict | None, size: int, tile: int, interleave: bool) -> None:
    print(f"\n== VGG16 on {size}x{size} from a memory-mapped file, staged tiles of {tile} (one pass) ==")
    folder = tempfile.mkdtemp(prefix="staged-large-")
    try:
        path = os.path.join(folder, "image.npy")
        image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
        rng = np.random.default_rng(0)
        for top in range(0, size, 1024):
            image[top : top + 1024] = rng.integers(0, 256, (min(1024, size - top), size, 3), dtype=np.uint8)
        image.flush()
        del image
        config = {
            "fcn_path": fcn_path,
            "size": size,
            "tile": tile,
            "staged": None,
            "passes": 1,
            "image_path": path,
            "zarr_out": os.path.join(folder, "scores.zarr"),
            "reference_passes": 3,
        }
        row = run_child(config, timeout=7200)
        turns = run_child({**config, "interleave": True}, timeout=7200) if interleave else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    megapixels = size * size / 1e6
    per_mp = row["seconds"] / megapixels
    print(
        f"stages {row['stages']}, tiles {row['tiles']}, work {row['work']:.2f}; wall {row['seconds']:.1f} s "
        f"(CPU {row['cpu_seconds']:.1f} s) = {per_mp:.3f} s/MP; peak resident growth {row['growth_mib']:.0f} MiB "
        f"(plan estimate {row['plan_peak_mib']:.0f} MiB; the map is written to a zarr store on disk, and the "
        f"growth includes the pages of the memory-mapped image read, {size * size * 3 / 2**20:.0f} MiB)"
    )
    print(f"its stages took {' '.join(f'{t:.1f}' for t in row['stage_seconds'])} s")
    if row["reference_seconds"]:
        same = float(np.median(row["reference_seconds"])) / (2048**2 / 1e6)
        print(
            f"whole 2048 passes after it in the same process: "
            f"{' '.join(f'{t:.2f}' for t in row['reference_seconds'])} s, median {same:.3f} s/MP -> ratio "
            f"{per_mp / same:.2f} (target <= 1.10)"
        )
    if whole_2048 is not None:
        reference = min(whole_2048["times"]) / (whole_2048["size"] ** 2 / 1e6)
        print(f"fastest whole 2048 pass of part 1: {reference:.3f} s/MP -> ratio {per_mp / reference:.2f}")
    if turns is not None:
        per_mp_turns = turns["seconds"] / megapixels
        same = turns["weighted_whole"] / (2048**2 / 1e6)
        wholes = turns["whole_seconds"]
        median = float(np.median(wholes)) / (2048**2 / 1e6)
        print(
            f"second pass ({turns['seconds']:.1f} s in {len(turns['stretch_seconds'])} stretches of about 45 s; "
            f"stages {' '.join(f'{t:.1f}' for t in turns['stage_seconds'])} s; each stretch then flushed to disk, "
            f"the flush counted in) with a whole 2048 pass before it and after each stretch "
            f"({' '.join(f'{t:.2f}' for t in wholes)} s): {per_mp_turns:.3f} s/MP against {same:.3f} s/MP (the "
            f"whole passes around each stretch, weighted by its time) -> ratio {per_mp_turns / same:.2f} "
            f"(target <= 1.10); against their median {per_mp_turns / median:.2f}"
        )
    print(
        f"growth target <= 1536 MiB: {'met' if row['growth_mib'] <= 1536 else 'NOT met'}. The 8192 map has "
        f"{(250 * 250 / 8192**2) / (58 * 58 / 2048**2):.2f}x the cells per pixel of the 2048 one (less border is "
        "lost to the 224-px window), so its head does that much more work per megapixel."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1536 instead of 2048, one round")
    parser.add_argument("--large", action="store_true", help="also the 8192 x 8192 bounded-memory pass")
    parser.add_argument("--large-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-tiles pass (the slowest)")
    parser.add_argument("--large-size", type=int, default=8192, help="image side of the bounded-memory pass")
    parser.add_argument(
        "--no-interleave", action="store_true", help="skip the second large pass timed between whole passes"
    )
    parser.add_argument("--log", help="append each measurement to this JSON-lines file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        config = json.loads(args.child)
        alternating(config) if "passes_to_compare" in config else child(config)
        return 0
    global LOG
    LOG = args.log
    print(f"TensorFlow on {os.cpu_count()} CPU cores; load average at start {os.getloadavg()[0]:.2f}")
    fcn = kfs.convert(keras.applications.VGG16(weights=None), verify=False)
    folder = tempfile.mkdtemp(prefix="staged-tiling-")
    path = os.path.join(folder, "vgg16_fcn.keras")
    fcn.save(path)
    try:
        if not args.large_only:
            table(fcn, (1024, 2048, 4096, 8192, 16384), (512, 1024, 2048))
        rows = None
        if not args.large_only:
            size = 1536 if args.quick else 2048
            rows = measured(path, size, 1024, 1 if args.quick else args.rounds, not args.no_plain)
        if args.large or args.large_only:
            whole = rows[0] if rows and rows[0]["size"] == 2048 else None
            large(path, whole, args.large_size, 1024, not args.no_interleave)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (other processes share these cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
