"""The pieces of one tiled pass: checking the image, planning the tiles, reading them, running the model."""

from __future__ import annotations

import itertools
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery.errors import ConversionError, InputError, SlowTilingWarning
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.grid.geometry import Geometry
from keras_fcn_surgery.layout import ImageSpec, Layout

# Input pixels per forward pass when `batch_size` is not given: tiles of 1024 x 1024
# or more go one at a time (batching them would defeat the memory bound of tiling).
PIXELS_PER_BATCH = 1 << 20


def with_channel_axis(image, spec: ImageSpec):
    if len(image.shape) == 2 and spec.channels == 1:
        return ChannelView(image, spec.layout)
    return image


class ChannelView:
    """A 2-D array seen as one-channel 3-D, sliced lazily."""

    def __init__(self, array, layout: Layout):
        self._array, self._layout = array, layout
        height, width = array.shape
        self.shape = layout.image_shape(height, width, 1)

    def __getitem__(self, index):
        rows, cols = (index[i] for i in self._layout.image_spatial_axes)
        region = np.asarray(self._array[rows, cols])
        return np.expand_dims(region, self._layout.image_channel_axis)


def image_size_of(image, spec: ImageSpec) -> tuple[int, int]:
    shape = tuple(getattr(image, "shape", ()))
    expected = "(H, W, C)" if spec.layout.channels_last else "(C, H, W)"
    if len(shape) != 3:
        raise InputError(
            f"Expected one image shaped {expected} with C = {spec.channels} (an array or an array-like with "
            f"`shape` and slicing). Received shape {shape}; for a batch, call once per image."
        )
    channels = spec.layout.image_channels(shape)
    if channels != spec.channels:
        raise InputError(
            f"The model takes {spec.channels} channels ({spec.layout.data_format}, {expected}); the image of shape "
            f"{shape} has {channels}."
        )
    rows, cols = spec.layout.image_spatial_axes
    return (int(shape[rows]), int(shape[cols]))


def check_image_size(size, grid: Geometry) -> None:
    minimum = grid.min_input_size
    if size[0] < minimum[0] or size[1] < minimum[1]:
        field = grid.receptive_field
        raise InputError(
            f"An image of {size[0]}x{size[1]} pixels is smaller than the network's minimum input of "
            f"{minimum[0]}x{minimum[1]} (receptive field {field[0]}x{field[1]}): its score map would be empty. "
            "Pad or enlarge the image."
        )


def output_arrays(out, shapes: dict, fcn) -> list:
    """One array per output to write its map into: ``out``'s, or new ones.

    Args:
        out: None; for a one-output model an array; for several outputs a dict
            of arrays by output name, one for each output.
        shapes: each output's map shape, by name, in the model's order.
    """
    names = list(shapes)
    if out is None:
        return [np.empty(shape, dtype=output_dtype(fcn, index)) for index, shape in enumerate(shapes.values())]
    if len(names) == 1:
        return [_checked_out(out, shapes[names[0]], "`out`")]
    if not isinstance(out, dict) or set(out) != set(names):
        given = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise InputError(
            f"The model has {len(names)} outputs ({', '.join(map(repr, names))}): give `out` as a dict of one "
            f"array per output name. Received: {given}"
        )
    return [_checked_out(out[name], shape, f"`out[{name!r}]`") for name, shape in shapes.items()]


def _checked_out(out, shape, what: str):
    given = tuple(getattr(out, "shape", ()))
    if given != shape:
        raise InputError(
            f"{what} has shape {given}, but the map of this image has shape {shape}. Allocate it with that shape "
            "(`geometry(fcn).output_size((H, W))` gives the map's height and width)."
        )
    return out


def as_maps(result) -> list:
    """A forward pass's result as a list of arrays, one per output (a one-output model's bare array included)."""
    return list(result) if isinstance(result, (list, tuple)) else [result]


def plan_tiles(size, grid: Geometry, tile) -> list[list[tiling.AxisTile]]:
    if tile is None:
        sides = size
    else:
        requested = pair(tile, "tile")
        sides = tuple(tiling.tile_length(t, n, s) for t, n, s in zip(requested, size, grid.stride))
    if tuple(sides) == tuple(size):
        cells = grid.output_size(size)
        return [[tiling.AxisTile(0, n, 0, c, 0)] for n, c in zip(size, cells)]
    if grid.global_context:
        raise ConversionError(
            "The network pools over the whole image (a global pooling inside, such as squeeze-and-excitation), "
            "so every cell depends on every pixel and no tiling is exact. Use `tile=None`."
        )
    minimum = grid.min_input_size
    inner = {"at_image_start": (False, False), "at_image_end": (False, False)}
    smallest = smallest_tiles(size, grid)
    for axis, name in enumerate(("height", "width")):
        if sides[axis] < smallest[axis][1]:
            given = requested[axis]
            aligned = f" ({sides[axis]} once aligned to the stride with the image's remainder)"
            padded = "" if sides[axis] == given else aligned
            raise InputError(
                f"A tile {name} of {given} pixels{padded} keeps no exact cell of this network: the cells near a "
                f"tile's inner edges see past it. Use tiles of at least {smallest[axis][0]} pixels, or no tiling."
            )
    cells, exact = grid.output_size(sides), grid.exact_cells(sides, **inner)
    shortest = [low + (n - low) % s for low, n, s in zip(minimum, size, grid.stride)]
    sides = [
        tiling.balanced_tile_length(n, t, s, c, start, c - stop, low)
        for n, t, s, c, (start, stop), low in zip(size, sides, grid.stride, cells, exact, shortest)
    ]
    cells, exact = grid.output_size(sides), grid.exact_cells(sides, **inner)
    return [
        tiling.plan_axis(n, t, s, c, start, c - stop)
        for n, t, s, c, (start, stop) in zip(size, sides, grid.stride, cells, exact)
    ]


def smallest_tiles(size, grid: Geometry) -> tuple[tuple[int, int], ...]:
    """Per axis, the smallest ``tile`` to ask for that keeps exact cells, and the tile length it gives.

    Searched from the geometry (stride by stride, from the network's minimum
    input), so the hint is the true minimum, not a guess.
    """
    found = []
    for axis, (length, stride, low) in enumerate(zip(size, grid.stride, grid.min_input_size)):
        side = tiling.tile_length(max(low, 1), length, stride)
        while side < length:
            if side >= low:
                sides = [int(n) for n in size]
                sides[axis] = side
                start, stop = grid.exact_cells(sides, at_image_start=(False, False), at_image_end=(False, False))[axis]
                if stop - start >= 1:
                    break
            side += stride
        side = min(side, length)
        found.append((side - length % stride if side < length else length, side))
    return tuple(found)


# Tiles computing more than this many times the image's own work get a `SlowTilingWarning`.
WASTEFUL_WORK = 3.0
# Elements of the input windows gathered for one product of a masked head's kept cells (64 MiB in float32).
_CELL_WINDOW_ELEMENTS = 16 << 20


def warn_if_wasteful(work_ratio: float, tile, work_at, size) -> None:
    """Warn `SlowTilingWarning` when tiles of ``tile`` cost over `WASTEFUL_WORK` x one pass, naming a better tile.

    Args:
        work_ratio: the tiled pass's work over one whole pass.
        tile: the requested ``(T_h, T_w)``, or None.
        work_at: the work ratio at another tile side (a function of ``(T_h, T_w)``).
        size: the image's ``(H, W)``.
    """
    if tile is None or work_ratio <= WASTEFUL_WORK:
        return
    side = tuple(tile)
    better = None
    while better is None and any(s < n for s, n in zip(side, size)):
        side = tuple(min(2 * s, n) for s, n in zip(side, size))
        try:
            if work_at(side) <= 1.5:
                better = side
        except ConversionError:
            continue
    advice = f"tiles of {better[0]}x{better[1]}" if better is not None and better != tuple(size) else "no tiling"
    warnings.warn(
        f"Tiles of {tile[0]}x{tile[1]} pixels overlap by the network's reach so much that the pass computes "
        f"{work_ratio:.1f}x one whole-image pass; {advice} (tile={'None' if advice == 'no tiling' else better}) "
        "computes far less.",
        SlowTilingWarning,
        stacklevel=3,
    )


def pair(value, name: str) -> tuple[int, int]:
    values = (value, value) if np.isscalar(value) else tuple(value)
    if len(values) != 2 or any(int(v) != v or v < 1 for v in values):
        raise InputError(f"Expected `{name}` to be a positive integer or a pair of them. Received: {value!r}")
    return (int(values[0]), int(values[1]))


def read_tile(image, spec: ImageSpec, rows: tiling.AxisTile, cols: tiling.AxisTile, preprocess, dtype) -> np.ndarray:
    pixels = np.asarray(image[spec.layout.image_index(slice(rows.start, rows.stop), slice(cols.start, cols.stop))])
    if preprocess is not None:
        pixels = np.asarray(preprocess(pixels.astype(np.float32)))
    return pixels.astype(dtype, copy=False)


def input_dtype(model) -> str:
    dtype = str(model.inputs[0].dtype)
    return dtype if dtype.startswith("float") else "float32"


def output_dtype(model, index: int = 0) -> str:
    dtype = str(model.outputs[index].dtype)
    return dtype if dtype.startswith("float") else "float32"


class NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def progress_bar(total: int, progress: bool | None, unit: str):
    if progress is None:
        progress = total > 1 and sys.stderr.isatty()
    if not progress:
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit, leave=False)


@dataclass(frozen=True)
class TileJob:
    """The tiles of one tiled pass and the cells they write (`run_tiles`).

    Attributes:
        spec: the image the model takes (layout, channels): how tiles are read
            and maps laid out.
        axis_plans: per axis, its `AxisTile`s; the pass's tiles are their pairs.
        batch_size: tiles per forward pass (tiles of one size are batched together).
        tiles: the ``(rows, cols)`` `AxisTile` pairs to run, of any sizes;
            None: every pair of ``axis_plans``.
        keep: None, or a boolean array over the output's cells: every cell
            outside it is written as NaN.
    """

    spec: ImageSpec
    axis_plans: list
    batch_size: int
    tiles: list | tuple | None = None
    keep: object = None


def run_tiles(forward, source, job: TileJob, out, *, preprocess, dtype, bar, prefetch):
    """Run ``forward`` over the tiles of ``job`` (a `TileJob`) on ``source`` and write the cells each tile keeps
    into ``out``.

    With ``prefetch``, the next batch of tiles is read (and preprocessed) on a
    background thread while the model computes the current one.

    A model with several outputs writes each into its own array: ``out`` is
    then a list of arrays in the model's order, and a tile's cells go to the
    same places in each (the outputs share one grid, `geometry`). A tile that
    is the whole input writes each map whole, so outputs on different grids
    run as one whole pass.
    """
    spec, batch_size, tiles, keep = job.spec, job.batch_size, job.tiles, job.keep
    if tiles is None:
        tiles = list(itertools.product(*job.axis_plans))
    targets = as_maps(out)
    cells = getattr(forward, "cells", None)  # a model that starts with its head convolution, run as products
    if keep is not None and cells is not None and spec.layout.channels_last and len(targets) == 1:
        _run_kept_cells(
            cells, source, job, tiles, targets[0], preprocess=preprocess, dtype=dtype, bar=bar, prefetch=prefetch
        )
        return
    rows_axis, cols_axis = spec.layout.image_spatial_axes
    size = (source.shape[rows_axis], source.shape[cols_axis])
    by_shape: dict = {}
    for rows, cols in tiles:
        by_shape.setdefault((rows.stop - rows.start, cols.stop - cols.start), []).append((rows, cols))
    batches = [group[i : i + batch_size] for group in by_shape.values() for i in range(0, len(group), batch_size)]

    def load(batch):
        return np.stack([read_tile(source, spec, rows, cols, preprocess, dtype) for rows, cols in batch])

    def write(batch, result):
        maps = as_maps(result)
        for position, (rows, cols) in enumerate(batch):
            whole = (rows.start, rows.stop, cols.start, cols.stop) == (0, size[0], 0, size[1])
            for target, output_maps in zip(targets, maps):
                cell_map = output_maps[position]
                if whole:
                    cells_rows, cells_cols = (cell_map.shape[axis] for axis in spec.layout.image_spatial_axes)
                    here = (slice(0, cells_rows), slice(0, cells_cols))
                    there = here
                else:
                    here = (slice(rows.keep_start, rows.keep_stop), slice(cols.keep_start, cols.keep_stop))
                    there = (slice(rows.out_start, rows.out_stop), slice(cols.out_start, cols.out_stop))
                cells = cell_map[spec.layout.image_index(*here)]
                if keep is not None:
                    kept = keep[there]
                    cells = np.where(np.expand_dims(kept, spec.layout.image_channel_axis), cells, np.nan)
                target[spec.layout.image_index(*there)] = cells
        bar.update(len(batch))

    if keep is not None:
        for target in targets:
            fill_nan(target, spec.layout)
    run_batches(forward, batches, load, write, prefetch=prefetch)


def _run_kept_cells(cells, source, job: TileJob, tiles, out, *, preprocess, dtype, bar, prefetch) -> None:
    """`run_tiles` with a mask for a model ``cells`` computes cell by cell (`blas.split_forward`'s ``cells``):
    only the kept cells of each tile, those of many tiles in one product, so that the thin tiles along a
    tissue's edge do not each stream the head's whole kernel. A batch is up to `_CELL_WINDOW_ELEMENTS` of
    windows, gathered from the tiles' inputs (each read once); a tile's part of the map is written once all its
    cells are computed, as a tile writes it (NaN off the mask)."""
    spec, keep = job.spec, np.asarray(job.keep)
    limit = max(1, _CELL_WINDOW_ELEMENTS // (cells.window[0] * cells.window[1] * spec.channels))
    fill_nan(out, spec.layout)
    batches: list = []  # each a list of (tile, the first of its kept cells there, how many)
    room = 0
    for rows, cols in tiles:
        tile = _KeptCells(rows, cols, keep[rows.out_start : rows.out_stop, cols.out_start : cols.out_stop])
        if not tile.cells:
            bar.update(1)
        done = 0
        while done < tile.cells:
            if not room:
                batches.append([])
                room = limit
            count = min(room, tile.cells - done)
            batches[-1].append((tile, done, count))
            done, room = done + count, room - count

    def load(batch):
        windows = np.empty((sum(count for *_, count in batch), *cells.window, spec.channels), dtype=np.float32)
        start = 0
        for tile, first, count in batch:
            tile.gather(source, spec, preprocess, dtype, cells.window, first, windows[start : start + count])
            start += count
        return windows

    def write(batch, scores):
        start = 0
        for tile, first, count in batch:
            tile.scores.append(scores[start : start + count])
            start += count
            if first + count == tile.cells:
                tile.write(out, spec.layout)
                bar.update(1)

    run_batches(cells, batches, load, write, prefetch=prefetch)


class _KeptCells:
    """One tile of `_run_kept_cells`: its kept cells, their windows' input while they are gathered, and the
    scores computed for them so far."""

    def __init__(self, rows, cols, kept: np.ndarray):
        self.rows, self.cols, self.kept = rows, cols, kept
        self.cells = int(kept.sum())
        self.scores: list = []
        self.pixels: np.ndarray | None = None

    def gather(self, source, spec: ImageSpec, preprocess, dtype, window, first: int, into: np.ndarray) -> None:
        """The windows of its kept cells ``first`` on (as many as ``into`` holds) into ``into``."""
        if self.pixels is None:  # read once: a tile's cells may span two batches
            self.pixels = read_tile(source, spec, self.rows, self.cols, preprocess, dtype).astype(np.float32)
        width = self.pixels.shape[1]
        # the tile's output cell k (from keep_start on) reads its input from k on: valid, stride 1
        r, c = np.nonzero(self.kept)
        starts = (r[first : first + len(into)] + self.rows.keep_start) * width
        starts += c[first : first + len(into)] + self.cols.keep_start
        offsets = (np.arange(window[0])[:, None] * width + np.arange(window[1])).ravel()
        flat = self.pixels.reshape(-1, spec.channels)
        np.take(flat, (starts[:, None] + offsets).ravel(), axis=0, out=into.reshape(-1, spec.channels), mode="clip")
        if first + len(into) == self.cells:
            self.pixels = None

    def write(self, out, layout: Layout) -> None:
        scores = np.concatenate(self.scores)
        block = np.full((*self.kept.shape, scores.shape[-1]), np.nan, dtype=out.dtype)
        block[self.kept] = scores
        there = (slice(self.rows.out_start, self.rows.out_stop), slice(self.cols.out_start, self.cols.out_stop))
        out[layout.image_index(*there)] = block
        self.scores = []


def run_batches(forward, batches, load, write, *, prefetch: bool = False) -> None:
    """The one execution loop: for each batch, ``write(batch, forward(load(batch)))``.

    Every batch-and-scatter pass of the package runs here: an FCN's tiles
    (`run_tiles`), a masked head's kept cells, whole-image batches, a windowed
    map's windows and their strips, the sliding window and a certificate's
    crops. With ``prefetch``, the next batch is loaded (read, preprocessed) on a
    background thread while ``forward`` computes the current one; batches are
    written in order either way.

    Args:
        forward: the model's forward pass, a function of one stacked batch.
        batches: the batches, in order (any objects ``load`` and ``write`` understand).
        load: a batch's stacked inputs.
        write: stores a batch's result (where its cells go is the caller's).
        prefetch: load the next batch on a background thread.
    """
    batches = list(batches)
    if not prefetch or len(batches) < 2:
        for batch in batches:
            write(batch, forward(load(batch)))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfs-prefetch") as pool:
        pending = pool.submit(load, batches[0])
        for index, batch in enumerate(batches):
            pixels = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(load, batches[index + 1])
            write(batch, forward(pixels))


def fill_nan(out, layout: Layout, rows_per_write: int = 256) -> None:
    """Set every cell of ``out`` (numpy, memmap or zarr) to NaN, a band of rows at a time."""
    height = out.shape[layout.image_spatial_axes[0]]
    for first in range(0, height, rows_per_write):
        out[layout.image_index(slice(first, first + rows_per_write), slice(None))] = np.nan
