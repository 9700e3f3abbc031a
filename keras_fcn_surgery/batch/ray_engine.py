"""The Ray Data engine: the same `predict_source` on Ray workers, one model load per worker.

The inputs become a Ray dataset of paths; `map_batches` runs a callable class
whose constructor loads the model once per worker (on a GPU when the cluster
has them), and whose call computes and writes each input's outputs to the
shared output folder. The driver only gathers the per-input results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time

from keras_fcn_surgery.batch.job import BatchOptions, InputResult, predict_source
from keras_fcn_surgery.batch.sources import Source
from keras_fcn_surgery.errors import InputError
from keras_fcn_surgery.native_log import native_stderr_captured
from keras_fcn_surgery.saving.atomic import remove_tree

RAY_EXTRA = "pip install 'keras-fcn-surgery[ray]'"
_RESULT_FIELDS = (
    "path",
    "status",
    "outputs",
    "message",
    "megapixels",
    "computed_fraction",
    "seconds",
    "certificate",
)


def run_on_ray(
    fcn,
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
        return _run(ray, fcn, sources, out_dir, options, address=address, workers=workers)


def _run(ray, fcn, sources, out_dir, options, *, address, workers) -> list[InputResult]:
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
        items = [{"path": s.path, "name": s.name} for s in sources]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        dataset = dataset.map_batches(
            PredictWorker,
            fn_constructor_kwargs={
                "model": [ray.put(_model_bytes(fcn))],  # in a list: fetched by the worker, not kept for restarts
                "out_dir": out_dir,
                "options": BatchOptions(**{**options.__dict__, "progress": False}),
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=count),
            num_gpus=1 if gpus else 0,
            num_cpus=1,
        )
        rows = dataset.take_all()
    except BaseException:
        if started_here:
            ray.shutdown()  # stops the workers before their unfinished outputs are removed
            started_here = False
        _remove_partial_outputs(out_dir, since=started)
        raise
    finally:
        if started_here:
            ray.shutdown()
    by_path = {row["path"]: row for row in rows}
    results = []
    for source in sources:
        row = by_path.get(source.path)
        if row is None:
            message = f"'{source.path}': no result came back from Ray."
            results.append(InputResult(source.path, "failed", message=message))
            continue
        outputs = tuple(p for p in str(row["outputs"]).split("\n") if p)
        results.append(
            InputResult(
                source.path,
                str(row["status"]),
                outputs,
                str(row["message"]),
                float(row["megapixels"]),
                float(row["computed_fraction"]),
                float(row["seconds"]),
                str(row["certificate"]),
            )
        )
    return results


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
    """A Ray Data callable class: loads the model once, then computes and writes one input per row."""

    def __init__(self, model: list, out_dir: str, options: BatchOptions):
        import ray

        from keras_fcn_surgery.saving.loading import load_model

        (reference,) = model
        payload = ray.get(reference)
        folder = tempfile.mkdtemp(prefix="kfs-model-")
        path = os.path.join(folder, "model.keras")
        try:
            with open(path, "wb") as handle:
                handle.write(payload)
            self.fcn = load_model(path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.out_dir, self.options = out_dir, options

    def __call__(self, batch: dict) -> dict:
        columns: dict[str, list] = {name: [] for name in _RESULT_FIELDS}
        for path, name in zip(batch["path"], batch["name"]):
            result = predict_source(self.fcn, Source(str(path), str(name)), self.out_dir, self.options)
            columns["path"].append(result.source)
            columns["status"].append(result.status)
            columns["outputs"].append("\n".join(result.outputs))
            columns["message"].append(result.message)
            columns["megapixels"].append(result.megapixels)
            columns["computed_fraction"].append(result.computed_fraction)
            columns["seconds"].append(result.seconds)
            columns["certificate"].append(result.certificate)
        return columns


def _remove_partial_outputs(out_dir: str, since: float) -> None:
    """Remove the ``.partial-*`` folders this job's workers left when it was interrupted (a killed worker cannot)."""
    for folder, subfolders, _ in os.walk(out_dir):
        for name in list(subfolders):
            path = os.path.join(folder, name)
            if name.startswith(".partial-") and os.path.getmtime(path) >= since - 1:
                remove_tree(path)
                subfolders.remove(name)


def _model_bytes(fcn) -> bytes:
    folder = tempfile.mkdtemp(prefix="kfs-model-")
    path = os.path.join(folder, "model.keras")
    try:
        fcn.save(path)
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise InputError(f"The Ray engine needs Ray Data: {RAY_EXTRA}.") from error
    return ray
