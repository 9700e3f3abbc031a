"""Region shards: one input's map cut into row bands of whole chunks, computed anywhere, resumed by region.

`plan_input` cuts an input's final map into regions, bands of whole chunk
rows of a zarr store in a work folder beside the outputs
(``.shards-<name>/``), balanced by the cells each must compute (the mask's
kept cells). `run_region` computes one region with the one execution loop,
`predict_map` (a segmenter's: `run_segmenter`) keeping only the region's
cells, so a staged plan computes only what the region needs; its writes
land only in the region's rows (`RegionView`), whose chunks no other region
owns, and a marker file records the region as done once they are written.
`finish_input` writes every output from the completed store, moves them
into place atomically (``formats.staged``) and removes the work
folder. An interrupted run leaves the work folder: the next run with the
same model, input and options redoes only the regions without a marker.

Without ``shards`` the count follows from the input (`region_count`: two
regions a worker at least, each region's share of the map within the memory
budget), for every tiled input on Ray and, locally, for inputs of at least
`LOCAL_REGION_PIXELS`. The execution is fixed once per input when it is cut
(`pinned_execution`: ``"auto"`` resolved as `predict_map` would for the
whole input) and recorded in its plan, so every region runs the same one.

Every cell's value comes from the same exact tiles whatever cells a region
keeps, so any number of regions gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass, replace

import numpy as np

from keras_fcn_surgery.batch import writers
from keras_fcn_surgery.batch.formats import ZarrFormat, check_input, formats_for, staged
from keras_fcn_surgery.batch.job import (
    LARGE_SIDE,
    BatchOptions,
    InputResult,
    OpenInput,
    _compute,
    _segment,
    certify,
    failed_result,
    map_tile,
    open_input,
    predict_source,
    segment_tile,
    shown_output,
    work_fraction,
)
from keras_fcn_surgery.batch.outputs import output_paths
from keras_fcn_surgery.batch.readers import choose_level, open_reader
from keras_fcn_surgery.batch.sources import Source
from keras_fcn_surgery.errors import ConversionError, InputError, first_line
from keras_fcn_surgery.inference import engines
from keras_fcn_surgery.inference.staged import DEFAULT_MEMORY_BUDGET, stage_calls
from keras_fcn_surgery.saving.atomic import pause_point, remove_tree
from keras_fcn_surgery.segmentation.predict import tile_fraction

# Map rows per chunk of the store (and columns): regions are bands of whole chunk rows.
CHUNK_ROWS = 256
# Without `shards`, the regions an input is cut into (`region_count`): at least this many per worker, so that
# every worker has work, a slow worker's last region is short, and an interruption loses at most half of a
# worker's share; and as many as keep each region's share of the map (kept cells x classes x 4 bytes) within
# the memory budget (`Tiling.memory_budget`, 64 MiB by default), what one region writes and what an
# interrupted region loses.
REGIONS_PER_WORKER = 2
MAX_REGIONS = 1024
# The fewest map rows per chunk when an input's map has too few chunk rows of `CHUNK_ROWS` for its regions.
MIN_CHUNK_ROWS = 16
# Locally (one worker) an input is cut into regions without `shards` from this many pixels of the level
# computed (10,000 x 10,000), so that an interrupted run resumes it; on Ray, every input whose pass is tiled.
LOCAL_REGION_PIXELS = 100_000_000
_STORE = "store.zarr"
_PLAN = "plan.json"
_DONE = "done"
_KEPT = "kept.npy"


@dataclass(frozen=True)
class Region:
    """Rows ``[start, stop)`` of one input's map (every column): whole chunk rows of its store.

    Attributes:
        index: the region's number in its input (0, 1, ...).
        start: first map row.
        stop: the row after the last.
        cells: the cells it computes (kept by the mask), its share of the work.
    """

    index: int
    start: int
    stop: int
    cells: int


@dataclass(frozen=True)
class InputPlan:
    """One input's regions, those still to compute, its work folder, and the options every region runs with
    (the job's, with the execution fixed for the input: ``"auto"`` resolved once, so that every region runs
    the same engine and the map is the same bytes wherever its regions run)."""

    source: Source
    regions: tuple[Region, ...]
    pending: tuple[Region, ...]
    work: str
    options: BatchOptions


def check_shards(shards) -> int | None:
    """``shards`` when None or a positive integer; else `InputError`."""
    if shards is None:
        return None
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise InputError(f"Expected `shards` to be None or a positive integer. Received: shards={shards!r}")
    return int(shards)


def check_shard_rows(rows) -> int | None:
    """``rows`` when None or a positive integer; else `InputError`."""
    if rows is None:
        return None
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
        raise InputError(f"Expected `shard_rows` to be None or a positive integer. Received: shard_rows={rows!r}")
    return int(rows)


def cut_regions(kept: np.ndarray | None, map_size, shards: int, chunk_rows: int = CHUNK_ROWS) -> tuple[Region, ...]:
    """At most ``shards`` bands of whole chunk rows with about the same number of kept cells each.

    Bands follow each other from the top; a band closes once it holds its
    share of the kept cells (every cell without a mask). Chunk rows without
    a kept cell join the band before them; there is always one region.
    """
    height, width = (int(d) for d in map_size)
    edges = list(range(0, height, chunk_rows)) + [height]
    counts = [int(kept[a:b].sum()) if kept is not None else (b - a) * width for a, b in zip(edges, edges[1:])]
    total = sum(counts)
    regions: list[Region] = []
    start, cells, before = 0, 0, 0
    for n, count in enumerate(counts[:-1]):
        cells += count
        if len(regions) + 1 < shards and cells and (before + cells) * shards >= total * (len(regions) + 1):
            regions.append(Region(len(regions), edges[start], edges[n + 1], cells))
            start, before, cells = n + 1, before + cells, 0
    cells += counts[-1]
    if regions and not cells:  # trailing rows without a kept cell join the band before them
        last = regions.pop()
        start, cells = edges.index(last.start), last.cells
    regions.append(Region(len(regions), edges[start], height, cells))
    return tuple(regions)


class RegionView:
    """A map array seen whole, whose writes land only in rows ``[start, stop)``: a region's share of the store.

    `predict_map`'s tiles and its NaN fill write whole tiles and bands of
    rows; what falls outside the region belongs to other regions and is
    dropped. Reads go to the whole array.
    """

    def __init__(self, array, start: int, stop: int):
        self.array, self.start, self.stop = array, start, stop
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        return self.array[index]

    def __setitem__(self, index, value) -> None:
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0]
        if not isinstance(rows, slice):
            raise TypeError(f"Write a region of a score map by slices of rows. Received: {index!r}")
        first, last, step = rows.indices(self.shape[0])
        if step != 1:
            raise TypeError(f"Write a region of a score map by contiguous rows. Received: {index!r}")
        low, high = max(first, self.start), min(last, self.stop)
        if low >= high:
            return
        if np.ndim(value) == np.ndim(self.array) and np.shape(value)[0] == last - first:
            value = np.asarray(value)[low - first : high - first]
        self.array[(slice(low, high), *index[1:])] = value

    def __array__(self, dtype=None, copy=None):
        whole = np.asarray(self.array[:])
        return whole if dtype is None else whole.astype(dtype)


def work_folder(out_dir: str, source: Source) -> str:
    """Where one input's regions are computed: ``.shards-<name>`` beside its outputs."""
    base = os.path.join(out_dir, source.name)
    return os.path.join(os.path.dirname(base), f".shards-{os.path.basename(base)}")


def region_count(map_size, kept: np.ndarray | None, classes: int, workers: int, budget: int | None = None):
    """``(regions, chunk rows)`` for an input whose map is ``map_size`` with ``kept`` cells (None: all) of
    ``classes`` values, run on ``workers``, when `shards` is not given.

    At least `REGIONS_PER_WORKER` regions per worker, and enough that each
    region's share of the map (its kept cells x ``classes`` x 4 bytes) is
    within ``budget`` (None: 64 MiB); at most `MAX_REGIONS`. The store's
    chunks are `CHUNK_ROWS` rows unless the map has too few of them for four
    chunk rows a region (for balance), then fewer, down to `MIN_CHUNK_ROWS`.
    `cut_regions` may make fewer regions (few kept rows).
    """
    height, width = (int(d) for d in map_size)
    cells = int(kept.sum()) if kept is not None else height * width
    budget = DEFAULT_MEMORY_BUDGET if budget is None else max(int(budget), 1)
    wanted = max(REGIONS_PER_WORKER * max(int(workers), 1), math.ceil(cells * max(classes, 1) * 4 / budget))
    wanted = min(wanted, MAX_REGIONS)
    rows = min(CHUNK_ROWS, max(MIN_CHUNK_ROWS, math.ceil(height / (4 * wanted))))
    return wanted, rows


def cuts_into_regions(source: Source, out_dir: str, options: BatchOptions, least_pixels: int) -> bool:
    """Whether ``source`` is computed by regions when `shards` is not given: an earlier run left its regions, or
    its pass is tiled (large, masked or ``tile`` given) and its level holds at least ``least_pixels`` pixels.
    An input that cannot be read answers False (its whole run reports why)."""
    if os.path.exists(os.path.join(work_folder(out_dir, source), _PLAN)):
        return True
    paths = output_paths(out_dir, source.name, options.formats)
    if not options.overwrite and all(os.path.exists(p) for p in paths.values()):
        return False
    try:
        with open_reader(source.path) as reader:
            height, width = reader.levels[choose_level(reader, level=options.level, mpp=options.mpp)].size
    except Exception:  # an unreadable input: `predict_source` says why
        return False
    tiled = options.tile is not None or options.mask is not None or max(height, width) > LARGE_SIDE
    return tiled and height * width >= least_pixels


def plan_input(
    mapper, source: Source, out_dir: str, options: BatchOptions, shards: int | None, workers: int = 1
) -> InputPlan | InputResult | None:
    """Cut ``source``'s map into regions and prepare its work folder; an `InputResult` when the input is skipped
    or fails.

    ``shards``: at most this many regions, or None: `region_count` for
    ``workers`` (None is returned when that makes one region: the input runs
    whole, `predict_source`). An interrupted run's work folder is kept when
    it was made for the same model, input, mask and options (and, for a
    given ``shards``, the same cut), with its regions and its execution.
    """
    start = time.perf_counter()
    paths = output_paths(out_dir, source.name, options.formats)
    if not options.overwrite and all(os.path.exists(p) for p in paths.values()):
        return InputResult(source.path, "skipped", tuple(paths.values()))
    try:
        check_input(options, source.path)  # before any region is computed
        with open_reader(source.path) as reader:
            job = open_input(mapper, reader, source, options)
            if job.per_pixel:
                tile = segment_tile(options, job.size, job.kept)
            else:
                tile = None if job.grid.global_context else map_tile(options, job.size, job.grid, job.kept)
            work = work_folder(out_dir, source)
            record: dict = {"source": source.path, "map_size": list(job.map_size)}
            record["fingerprint"] = _fingerprint(mapper, job, options)
            earlier = _read_json(os.path.join(work, _PLAN))
            kept_earlier = isinstance(earlier, dict) and "execution" in earlier and "regions" in earlier
            kept_earlier = kept_earlier and all(earlier.get(k) == v for k, v in record.items())
            rows = _chunk_rows(options)
            if shards is not None:
                count = shards if tile is not None else 1  # one pass over the whole image cannot be cut
            elif kept_earlier:
                count = 0  # the earlier run's cut
            else:
                classes = sum(o.classes for o in job.spec.outputs)
                budget = mapper.tiling.memory_budget
                count, auto_rows = region_count(job.map_size, job.kept, classes, workers, budget)
                rows = options.shard_rows or auto_rows
                count = count if tile is not None else 1
            regions = cut_regions(job.kept, job.map_size, count, rows) if count else ()
            if kept_earlier and (not regions or [[r.start, r.stop] for r in regions] == earlier["regions"]):
                regions = tuple(Region(n, a, b, _cells(job, a, b)) for n, (a, b) in enumerate(earlier["regions"]))
                execution = earlier["execution"]
            elif shards is None and len(regions) == 1:
                return None
            else:
                execution = pinned_execution(mapper, job, options, tile)
                record.update(regions=[[r.start, r.stop] for r in regions], execution=execution, chunk_rows=rows)
                remove_tree(work)
                os.makedirs(os.path.join(work, _DONE))
                _create_store(os.path.join(work, _STORE), job, rows)
                if job.kept is not None:  # the mask once, not again in every region
                    np.save(os.path.join(work, _KEPT), np.packbits(job.kept, axis=1))
                _write_json(os.path.join(work, _PLAN), record)
    except (ConversionError, OSError) as error:
        return failed_result(source, str(error), start, input_error=isinstance(error, InputError))
    except Exception as error:  # as `predict_source`: one input's error must not stop the others
        return failed_result(source, f"{type(error).__name__}: {first_line(str(error))}", start)
    pending = tuple(r for r in regions if not os.path.exists(_marker(work, r.index)))
    return InputPlan(source, regions, pending, work, replace(options, execution=execution))


def pinned_execution(mapper, job: OpenInput, options: BatchOptions, tile) -> str:
    """The execution every region of ``job`` runs: ``options.execution`` unless ``"auto"``; then the one
    `predict_map` would choose for the whole input (its plan's stages', measured on this machine: ``"blas"``
    for the native execution with the BLAS head), or the native execution where the stages chose two that
    one name cannot say, and for a windowed map (whose passes choose per band)."""
    if options.execution != "auto" or job.per_pixel:
        return options.execution
    native = engines.native()
    if mapper.method != "fcn":
        return native
    keep = None if job.kept is None or job.grid.global_context else job.kept
    plan = mapper.with_options(tile=tile).plan(job.size, keep=keep)
    chosen = engines.with_engine(plan, mapper.runnable, "auto", mapper.execution.policy, calls=stage_calls(plan))
    used = set(chosen.engine.split("+"))
    if len(used) == 1:
        return used.pop()
    return "blas" if used == {native, "blas"} else native


def run_region(mapper, source: Source, out_dir: str, options: BatchOptions, region: Region) -> None:
    """Compute ``region`` of ``source``'s map into its work folder's store and mark it done.

    Raises whatever the computation raises (the region stays to be redone).
    """
    work, started = work_folder(out_dir, source), time.perf_counter()
    if options.execution != mapper.execution.engine:  # the input's execution, fixed when it was planned
        mapper = mapper.with_options(engine=options.execution)
    with open_reader(source.path) as reader:
        job = open_input(mapper, reader, source, replace(options, mask=None))  # the mask: as planned
        if options.mask is not None:
            packed = np.load(os.path.join(work, _KEPT))
            job.kept = np.unpackbits(packed, axis=1, count=job.map_size[1]).astype(bool)
        keep = job.kept  # the whole map: the pass of an input in one piece
        if (region.start, region.stop) != (0, job.map_size[0]):
            keep = np.zeros(job.map_size, dtype=bool)  # the region's cells the mask keeps
            keep[region.start : region.stop] = True if job.kept is None else job.kept[region.start : region.stop]
            job.kept = None  # one map-sized mask at a time
        maps = {name: RegionView(array, region.start, region.stop) for name, array in _store_maps(work, job).items()}
        scores = job.scores(maps)
        if job.per_pixel:
            _segment(mapper, job.view, job.layout, job.size, keep, scores, options)
        else:
            _compute(mapper, job.view, job.layout, job.grid, job.size, keep, scores, options)
    pause_point(f"region {region.index}")  # test hook: a worker killed after writing, before the record
    seconds = time.perf_counter() - started
    record = {
        "rows": [region.start, region.stop],
        "seconds": seconds,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "execution": options.execution,
    }
    _write_json(_marker(work, region.index), record)


def region_records(work: str) -> dict[int, dict]:
    """The completed regions' records in a work folder, by region: rows, seconds, host and process."""
    folder = os.path.join(work, _DONE)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return {int(name.split(".")[0]): _read_json(os.path.join(folder, name)) for name in names if name.endswith(".json")}


def finish_input(mapper, plan: InputPlan, out_dir: str, options: BatchOptions, seconds: float = 0.0) -> InputResult:
    """Write ``plan``'s outputs from its completed store and publish them; an `InputResult` either way."""
    start = time.perf_counter() - seconds
    source = plan.source
    paths = output_paths(out_dir, source.name, options.formats)
    missing = [r.index for r in plan.regions if not os.path.exists(_marker(plan.work, r.index))]
    if missing:
        return failed_result(source, f"regions {missing} of its map were not computed; rerun to compute them.", start)
    try:
        with open_reader(source.path) as reader:
            job = open_input(mapper, reader, source, options)
            maps = _store_maps(plan.work, job)
            with staged(paths, formats_for(options), overwrite=options.overwrite) as outputs:
                shown = shown_output(job.spec, options.output, required=outputs.one_map)
                if job.per_pixel:
                    fraction, computed = _segment_fraction(mapper, job, options), None
                else:
                    keep = None if job.kept is None or job.grid.global_context else job.kept
                    tile = map_tile(options, job.size, job.grid, job.kept)
                    fraction, computed = work_fraction(mapper, job.size, tile, keep, options), _computed(job, maps)
                certificate, line = certify(mapper, job, computed, shown, options)
                # The zarr output is the store itself, moved last: until then a rerun can still use it.
                filled = job.filled(maps, shown, fraction, certificate, options)
                outputs.write(filled, store=os.path.join(plan.work, _STORE))
            remove_tree(plan.work)
    except (ConversionError, OSError) as error:
        return failed_result(source, str(error), start)
    except Exception as error:
        return failed_result(source, f"{type(error).__name__}: {first_line(str(error))}", start)
    megapixels = job.size[0] * job.size[1] / 1e6
    return InputResult(
        source.path, "done", tuple(paths.values()), "", megapixels, fraction, time.perf_counter() - start, line
    )


def predict_source_sharded(
    mapper, source: Source, out_dir: str, options: BatchOptions, shards: int | None
) -> InputResult:
    """`predict_source` by regions in this process: plan, compute each region still to do, finish.

    ``shards`` None: as many regions as `region_count` makes for one worker (`predict_images` asks so for an
    input of at least `LOCAL_REGION_PIXELS` pixels whose pass is tiled, or one an earlier run left regions of:
    `cuts_into_regions`); when that is one, the input runs whole (`predict_source`).
    """
    start = time.perf_counter()
    plan = plan_input(mapper, source, out_dir, options, shards)
    if plan is None:
        return predict_source(mapper, source, out_dir, options)
    if isinstance(plan, InputResult):
        return plan
    for region in plan.pending:
        try:
            run_region(mapper, source, out_dir, plan.options, region)
        except (ConversionError, OSError) as error:
            return failed_result(source, str(error), start)
        except Exception as error:
            return failed_result(source, f"{type(error).__name__}: {first_line(str(error))}", start)
    return finish_input(mapper, plan, out_dir, plan.options, time.perf_counter() - start)


def _chunk_rows(options: BatchOptions) -> int:
    return options.shard_rows or CHUNK_ROWS


def _cells(job: OpenInput, start: int, stop: int) -> int:
    return int(job.kept[start:stop].sum()) if job.kept is not None else (stop - start) * int(job.map_size[1])


def _marker(work: str, index: int) -> str:
    return os.path.join(work, _DONE, f"{index}.json")


def _create_store(path: str, job: OpenInput, chunk_rows: int) -> None:
    ZarrFormat(chunk_rows=chunk_rows).allocate(path, job.map_shapes(None), ())


def _store_maps(work: str, job: OpenInput) -> dict:
    group = writers.require_zarr().open_group(os.path.join(work, _STORE), mode="r+")
    return {o.name: group[o.name if job.spec.several else writers.SCORES] for o in job.spec.outputs}


def _computed(job: OpenInput, maps: dict):
    """The map in the model's layout, as the certificate reads it."""
    if job.layout.channels_last:
        return job.scores(maps)
    moved = {name: job.layout.image_from_channels_last(np.asarray(array[:])) for name, array in maps.items()}
    return job.scores(moved)


def _segment_fraction(mapper, job: OpenInput, options: BatchOptions) -> float:

    if job.kept is None:
        return 1.0
    return tile_fraction(mapper.runnable, job.size, segment_tile(options, job.size, job.kept), job.kept)


def _fingerprint(mapper, job: OpenInput, options: BatchOptions) -> str:
    """A hash of what the map depends on: the model's weights and names, the mask, the options."""
    digest = hashlib.sha256()
    for weight in mapper.runnable.weights:  # values and shapes, not names (Keras numbers them per process)
        values = np.ascontiguousarray(np.asarray(weight))
        digest.update(repr((values.shape, values.dtype.str)).encode())
        digest.update(values.tobytes())
    if job.kept is not None:
        digest.update(np.packbits(job.kept).tobytes())
    chosen = {k: v for k, v in options.__dict__.items() if k not in _OUTPUT_ONLY}
    digest.update(repr(sorted(chosen.items())).encode())
    return digest.hexdigest()


# Options that change only how the outputs are written, not the map in the store.
_OUTPUT_ONLY = ("progress", "overwrite", "formats", "ome_zarr_version")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value) -> None:
    """``value`` as JSON at ``path``, atomically (a reader sees all of it or no file)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
