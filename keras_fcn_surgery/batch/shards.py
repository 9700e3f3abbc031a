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

Every cell's value comes from the same exact tiles whatever cells a region
keeps, so any number of regions gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, replace

import numpy as np

from keras_fcn_surgery.batch import writers
from keras_fcn_surgery.batch.formats import ZarrFormat, check_input, formats_for, staged
from keras_fcn_surgery.batch.job import (
    BatchOptions,
    InputResult,
    OpenInput,
    _compute,
    _segment,
    certify,
    failed_result,
    map_tile,
    open_input,
    segment_tile,
    shown_output,
    work_fraction,
)
from keras_fcn_surgery.batch.outputs import output_paths
from keras_fcn_surgery.batch.readers import open_reader
from keras_fcn_surgery.batch.sources import Source
from keras_fcn_surgery.errors import ConversionError, InputError, first_line
from keras_fcn_surgery.saving.atomic import pause_point, remove_tree
from keras_fcn_surgery.segmentation.predict import tile_fraction

# Map rows per chunk of the store (and columns): regions are bands of whole chunk rows.
CHUNK_ROWS = 256
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
    """One input's regions, those still to compute, and its work folder."""

    source: Source
    regions: tuple[Region, ...]
    pending: tuple[Region, ...]
    work: str


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


def plan_input(mapper, source: Source, out_dir: str, options: BatchOptions, shards: int) -> InputPlan | InputResult:
    """Cut ``source``'s map into regions and prepare its work folder (kept from an interrupted run when it was
    made for the same model, input, mask and options); an `InputResult` when the input is skipped or fails."""
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
            count = shards if tile is not None else 1  # one pass over the whole image cannot be cut
            regions = cut_regions(job.kept, job.map_size, count, _chunk_rows(options))
            work = work_folder(out_dir, source)
            record = {
                "source": source.path,
                "map_size": list(job.map_size),
                "regions": [[r.start, r.stop] for r in regions],
                "fingerprint": _fingerprint(mapper, job, options),
            }
            if _read_json(os.path.join(work, _PLAN)) != record:
                remove_tree(work)
                os.makedirs(os.path.join(work, _DONE))
                _create_store(os.path.join(work, _STORE), job, _chunk_rows(options))
                if job.kept is not None:  # the mask once, not again in every region
                    np.save(os.path.join(work, _KEPT), np.packbits(job.kept, axis=1))
                _write_json(os.path.join(work, _PLAN), record)
    except (ConversionError, OSError) as error:
        return failed_result(source, str(error), start, input_error=isinstance(error, InputError))
    except Exception as error:  # as `predict_source`: one input's error must not stop the others
        return failed_result(source, f"{type(error).__name__}: {first_line(str(error))}", start)
    pending = tuple(r for r in regions if not os.path.exists(_marker(work, r.index)))
    return InputPlan(source, regions, pending, work)


def run_region(mapper, source: Source, out_dir: str, options: BatchOptions, region: Region) -> None:
    """Compute ``region`` of ``source``'s map into its work folder's store and mark it done.

    Raises whatever the computation raises (the region stays to be redone).
    """
    work, started = work_folder(out_dir, source), time.perf_counter()
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
    record = {"rows": [region.start, region.stop], "seconds": seconds, "host": socket.gethostname(), "pid": os.getpid()}
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


def predict_source_sharded(mapper, source: Source, out_dir: str, options: BatchOptions, shards: int) -> InputResult:
    """`predict_source` by regions in this process: plan, compute each region still to do, finish."""
    start = time.perf_counter()
    plan = plan_input(mapper, source, out_dir, options, shards)
    if isinstance(plan, InputResult):
        return plan
    for region in plan.pending:
        try:
            run_region(mapper, source, out_dir, options, region)
        except (ConversionError, OSError) as error:
            return failed_result(source, str(error), start)
        except Exception as error:
            return failed_result(source, f"{type(error).__name__}: {first_line(str(error))}", start)
    return finish_input(mapper, plan, out_dir, options, time.perf_counter() - start)


def _chunk_rows(options: BatchOptions) -> int:
    return options.shard_rows or CHUNK_ROWS


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
