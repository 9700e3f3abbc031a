"""The Ray Data engine: the same `predict_source` on Ray workers, one model load per worker.

The inputs become one Ray dataset: the regions of every input whose pass is
tiled (`batch.shards`: as many as its size, the workers and the memory budget
make, or ``shards``), and the other inputs whole. `map_batches` runs a
callable class whose constructor loads the model once per worker (on a GPU
when the cluster has them), and whose call computes a region into its
input's store, or computes and writes a whole input's outputs, in the
shared output folder. The driver plans the regions (fixing each input's
execution), writes an input's outputs once its last region is back, and
gathers the per-input results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import replace

from keras_fcn_surgery.batch import shards
from keras_fcn_surgery.batch.job import BatchOptions, InputResult, predict_source
from keras_fcn_surgery.batch.sources import Source
from keras_fcn_surgery.errors import InputError, first_line
from keras_fcn_surgery.inference import engines
from keras_fcn_surgery.inference.mapper import Mapper, MapperRecipe
from keras_fcn_surgery.inference.runner import progress_bar
from keras_fcn_surgery.native_log import native_stderr_captured
from keras_fcn_surgery.saving.atomic import remove_tree

RAY_EXTRA = "pip install 'keras-mapper-surgery[ray]'"
_RESULT_FIELDS = (
    "path",
    "status",
    "outputs",
    "message",
    "megapixels",
    "computed_fraction",
    "seconds",
    "certificate",
    "input_error",
)


def run_on_ray(
    mapper: Mapper,
    sources: list[Source],
    out_dir: str,
    options: BatchOptions,
    *,
    address: str | None = None,
    workers: int | None = None,
) -> list[InputResult]:
    """Run every source on Ray and return the results in the order of ``sources``.

    Joins the cluster at ``address`` (else ``RAY_ADDRESS``, else starts a local
    Ray, shut down again at the end). ``out_dir`` must be reachable by every
    worker under the same path (a shared file system on a cluster).
    """
    ray = _ray()
    with _ray_kept_quiet(ray, shown=bool(options.progress)):
        return _run(ray, mapper, sources, out_dir, options, address=address, workers=workers)


def _run(ray, mapper, sources, out_dir, options, *, address, workers) -> list[InputResult]:
    started = time.time()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or None,
            log_to_driver=False,  # the workers' own output stays in their log files
            include_dashboard=False,
            logging_level=logging.ERROR,  # Ray's notices ("Token authentication is enabled...") stay off
        )
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = workers or (gpus if gpus else max(1, int(resources.get("CPU", 1))))
        if count < 1:
            raise InputError(f"Expected at least one Ray worker. Received: workers={workers}")
        results = _run_regions(ray, mapper, sources, out_dir, options, count, gpus)
    except BaseException:
        if started_here:
            ray.shutdown()  # stops the workers before their unfinished outputs are removed
            started_here = False
        _remove_partial_outputs(out_dir, since=started)
        raise
    finally:
        if started_here:
            ray.shutdown()
    return results


def _run_regions(ray, mapper, sources, out_dir, options, count: int, gpus: int) -> list[InputResult]:
    """Every input as one dataset of regions and whole inputs, regions largest first; each input by regions is
    finished (its outputs written from its store and published) here as soon as its last region comes back.

    With ``options.shards`` every input is cut into regions; without, an input whose pass is tiled is cut into
    as many as `shards.region_count` makes for ``count`` workers (the rest run whole), its execution fixed
    here for all its regions (the machine's native execution when the workers have GPUs this driver lacks:
    it cannot measure theirs).
    """
    started = time.perf_counter()
    planned = options
    if gpus and not engines.accelerators() and options.execution == "auto":
        planned = replace(options, execution=engines.native())
    plans: dict[str, shards.InputPlan | InputResult | None] = {}
    for s in sources:
        if options.shards or shards.cuts_into_regions(s, out_dir, options, 0):
            plans[s.path] = shards.plan_input(mapper, s, out_dir, planned, options.shards, count)
        else:
            plans[s.path] = None
    pending = [
        (p.source, r, p.options.execution) for p in plans.values() if isinstance(p, shards.InputPlan) for r in p.pending
    ]
    pending.sort(key=lambda item: -item[1].cells)  # the regions with most work start first
    items = [
        {"path": source.path, "name": source.name, "region": r.index, "start": r.start, "stop": r.stop, "execution": e}
        for source, r, e in pending
    ]
    items += [
        {"path": s.path, "name": s.name, "region": _WHOLE, "start": 0, "stop": 0, "execution": options.execution}
        for s in sources
        if plans[s.path] is None
    ]
    results: dict[str, InputResult] = {p: r for p, r in plans.items() if isinstance(r, InputResult)}
    waiting = {p: len(plan.pending) for p, plan in plans.items() if isinstance(plan, shards.InputPlan)}
    errors: dict[str, str] = {}

    def finish(path: str) -> None:
        plan = plans[path]
        assert isinstance(plan, shards.InputPlan)
        if path in errors:
            results[path] = InputResult(path, "failed", message=errors[path])
        else:
            results[path] = shards.finish_input(mapper, plan, out_dir, plan.options, time.perf_counter() - started)

    for path in [p for p, n in waiting.items() if n == 0]:  # every region done by an earlier run
        finish(path)
    if items:
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        dataset = dataset.map_batches(
            RegionWorker,
            fn_constructor_kwargs={
                "model": [ray.put(mapper.recipe())],  # in a list: fetched by the worker, not kept for restarts
                "out_dir": out_dir,
                "options": BatchOptions(**{**options.__dict__, "progress": False}),
            },
            batch_size=1,
            batch_format="numpy",
            # one region at a time per worker: none waits behind a long one while another worker is idle
            compute=ray.data.ActorPoolStrategy(size=count, max_tasks_in_flight_per_actor=1),
            num_gpus=1 if gpus else 0,
            num_cpus=1,
        )
        with progress_bar(len(items), options.progress, "regions") as bar:
            for row in dataset.iter_rows():
                path = str(row["path"])
                bar.update(1)
                if int(row["region"]) == _WHOLE:
                    results[path] = _result_of(row)
                    continue
                if row["message"]:
                    errors.setdefault(path, str(row["message"]))
                waiting[path] -= 1
                if waiting[path] == 0:
                    finish(path)
    return [results.get(s.path) or InputResult(s.path, "failed", message=_NO_RESULT.format(s.path)) for s in sources]


def _result_of(row) -> InputResult:
    """The `InputResult` of a whole input's row."""
    outputs = tuple(p for p in str(row["outputs"]).split("\n") if p)
    return InputResult(
        str(row["path"]),
        str(row["status"]),
        outputs,
        str(row["message"]),
        float(row["megapixels"]),
        float(row["computed_fraction"]),
        float(row["seconds"]),
        str(row["certificate"]),
        bool(row["input_error"]),
    )


# A row's region number for an input computed whole (`predict_source`).
_WHOLE = -1
_NO_RESULT = "'{}': no result came back from Ray."


@contextlib.contextmanager
def _ray_kept_quiet(ray, *, shown: bool):
    """Keep Ray's and Ray Data's own log lines off the terminal while a batch runs, unless progress is ``shown``.

    Ray's Python loggers (``ray``, ``ray.data``: "Starting execution of
    Dataset...", "Progress bars disabled...") are raised to ERROR and Ray
    Data's execution notice is turned off for the run, then restored. The
    driver's C++ core worker writes to file descriptor 2 (an error-level
    line for every actor pool Ray Data starts, Ray's own doing:
    ray-project/ray#57733); that is captured and shown only if the run
    fails. With ``shown`` (``progress=True``), Ray Data draws its progress and
    nothing is hidden.
    """
    context = ray.data.DataContext.get_current()
    saved = (context.enable_progress_bars, context.print_on_execution_start)
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    context.enable_progress_bars = context.print_on_execution_start = shown
    try:
        if shown:
            yield
            return
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with native_stderr_captured():
            yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class PredictWorker:
    """A Ray Data callable class: rebuilds the job's `Mapper` once, then computes and writes one input per row."""

    def __init__(self, model: list, out_dir: str, options: BatchOptions):
        import ray

        (reference,) = model
        recipe: MapperRecipe = ray.get(reference)
        self.mapper = recipe.build()  # the job's mapper, rebuilt here: no table of the driver's process needed
        self.out_dir, self.options = out_dir, options

    def __call__(self, batch: dict) -> dict:
        columns: dict[str, list] = {name: [] for name in _RESULT_FIELDS}
        for path, name in zip(batch["path"], batch["name"]):
            result = predict_source(self.mapper, Source(str(path), str(name)), self.out_dir, self.options)
            _add_result(columns, result)
        return columns


class RegionWorker(PredictWorker):
    """A Ray Data callable class: loads the model once, then computes one region of an input's map per row
    (`batch.shards.run_region`), at the execution fixed for its input, or a whole input (region -1,
    `predict_source`); a region that fails comes back with its message, to be redone by a rerun."""

    def __call__(self, batch: dict) -> dict:
        columns: dict[str, list] = {name: [] for name in (*_RESULT_FIELDS, "region")}
        rows = zip(batch["path"], batch["name"], batch["region"], batch["start"], batch["stop"], batch["execution"])
        for path, name, index, start, stop, execution in rows:
            source = Source(str(path), str(name))
            options = replace(self.options, execution=str(execution))
            columns["region"].append(int(index))
            if int(index) == _WHOLE:
                _add_result(columns, predict_source(self.mapper, source, self.out_dir, options))
                continue
            region = shards.Region(int(index), int(start), int(stop), 0)
            try:
                shards.run_region(self.mapper, source, self.out_dir, options, region)
                message = ""
            except Exception as error:  # this region's failure must not stop the others
                message = f"'{path}': region {int(index)}: {type(error).__name__}: {first_line(str(error))}"
            _add_result(columns, InputResult(str(path), "", message=message))
        return columns


def _add_result(columns: dict, result: InputResult) -> None:
    columns["path"].append(result.source)
    columns["status"].append(result.status)
    columns["outputs"].append("\n".join(result.outputs))
    columns["message"].append(result.message)
    columns["megapixels"].append(result.megapixels)
    columns["computed_fraction"].append(result.computed_fraction)
    columns["seconds"].append(result.seconds)
    columns["certificate"].append(result.certificate)
    columns["input_error"].append(result.input_error)


def _remove_partial_outputs(out_dir: str, since: float) -> None:
    """Remove the ``.partial-*`` folders this job's workers left when it was interrupted (a killed worker cannot)."""
    for folder, subfolders, _ in os.walk(out_dir):
        for name in list(subfolders):
            path = os.path.join(folder, name)
            if name.startswith(".partial-") and os.path.getmtime(path) >= since - 1:
                remove_tree(path)
                subfolders.remove(name)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise InputError(f"The Ray engine needs Ray Data: {RAY_EXTRA}.") from error
    return ray
