"""Staged tiling: a network cut into stages, each tiled on the stored map of the one before.

Exact tiles of a whole network overlap by its whole receptive field (404
pixels for VGG16), so tiles of 1024 pixels compute about twice the image. Cut
at a tensor that all later computation depends on (a pooling's output with no
branch crossing it), the network becomes stages; a stage tiled on the stored
output of the stage before overlaps by its own receptive field only, and
deeper stages, whose maps are small, run in few large tiles or whole. Each
stage is tiled exactly (`grid.tiling`), so the stored maps, and the final
map, equal those of the whole-image pass within float round-off.

`plan_prediction` chooses the cuts (a cheapest chain over the candidate cuts,
`grid.stages`), each stage's tile size (as large as keeps its activations
within those one forward call may hold: a batch of about a million pixels of
the requested tiles through the whole network) and
where each stored map lives (memory, or a file on disk past a budget), and
reports it all; `predict_map` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import keras
import numpy as np

from keras_fcn_surgery.cost import layer_costs, pass_cost
from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.graph import (
    cut_positions,
    describe,
    flat_nodes,
    graph_of,
    model_facts,
    model_layout,
    nodes_in_order,
    producer_of,
    sub_model,
    tensor_shapes,
)
from keras_fcn_surgery.grid import stages as stage_math
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.grid.geometry import geometry
from keras_fcn_surgery.inference import engines, runner
from keras_fcn_surgery.inference.store import Scratch
from keras_fcn_surgery.layout import ImageSpec
from keras_fcn_surgery.surgery.atrous import FinerStride
from keras_fcn_surgery.surgery.fcn import fcn_spec

# Bytes of stored maps kept in memory when `memory_budget` is not given; larger ones go to disk. Spilling
# costs little (VGG16 at 4096x4096: 235 CPU-s all on disk against 228 with a 512 MiB map in memory), and
# at 8192x8192 a 128 MiB map in memory took the peak resident growth to 1559 MiB, over the 1.5 GiB target.
DEFAULT_MEMORY_BUDGET = 64 << 20
# What TensorFlow's runtime adds on a first pass whatever the image size: traced graphs, compiled kernels,
# allocator slack. Fitted to VGG16's peak resident growth (2048x2048 whole: 2330 MiB for 2048 MiB of
# planned activations; staged: 1301 MiB for 601 MiB at 2048, 1187 MiB for 465 MiB at 4096, all on disk).
_RUNTIME_BYTES = 768 << 20
# Costs in multiply-accumulates (what the cut choice minimises) of the work that is not arithmetic:
# one forward call, and writing then reading back one element of a stored map in memory or on disk.
# Measured on 2 cores: a 128 MiB map written by rows and read back by overlapping tiles takes about 9 ns
# an element in memory and on disk alike (pwrite/pread through the page cache), some 600 MACs at VGG16's
# 66 GMAC/s; disk is charged a little more so that a map within the budget stays in memory.
_MACS_PER_CALL = 50_000_000
_MACS_PER_STORED_ELEMENT = 600
_MACS_PER_SPILLED_ELEMENT = 800
# Staging is chosen automatically only when it saves at least this share of the plain tiles' work.
_MIN_SAVING = 0.05
# A masked plan tries smaller tiles for a stage down to this many tiles.
_MAX_MASKED_TILES = 2048
# What a masked plan charges for each shape of forward call it adds: a new shape under "tf" (its trace
# generalised) took about 0.1 s for VGG16's block3 stage on 2 cores, where a 15 GMAC tile took 1.1 s. Masked
# stages of many shapes do not run under XLA (`engines.COMPILED_SHAPES`, `engines.without_compiling`).
_MACS_PER_SHAPE = 1_500_000_000
# How a masked plan may crop tiles to their needed cells: (step in cells, None for a quarter tile; whether
# a tile may be split), and how many times a tile may be halved around the mask's edges and holes.
_MASKED_CROPS = ((1, True), (1, False), (None, False))
_MASKED_SPLITS = 7
# A masked plan chooses its own cuts only where every candidate cut's map has at most this many cells (the
# needed cells of each take 4 bytes a cell to find); larger slides keep the unmasked plan's cuts.
_MAX_MASK_CELLS = 1 << 26
# A candidate cut starts a new stride level when the map shrinks at least this much since the last.
_STRIDE_STEP = 1.5

# Plans an FCN keeps (`graph.model_facts`), by image size and tiling: slides of many sizes forget the oldest.
_PLANS_PER_MODEL = 64


@dataclass(frozen=True)
class StagePlan:
    """One stage of a prediction plan.

    Attributes:
        start: the layer whose output the stage reads (``"input"`` for the image).
        stop: the layer whose output it writes.
        input_size: ``(H, W)`` of the map it reads.
        output_size: ``(H, W)`` of the map it writes.
        tile: ``(H, W)`` of its tiles, in cells of its input map (``input_size``
            when it runs whole).
        tiles: its number of tiles.
        batch_size: tiles per forward call.
        computed_area: cells its tiles cover (overlaps counted each time) over
            the cells of its input map; 1.0 when it runs whole.
        macs: multiply-accumulates of all its tiles.
        peak_bytes: activations of one batch of tiles (an estimate: the largest
            inputs plus output of one layer).
        store: where its output goes: ``"memory"``, ``"disk"`` (a temporary
            file) or ``"out"`` (the result).
        store_bytes: bytes of its output map.
        engine: the execution it runs under, once chosen (`inference.engines`).
    """

    start: str
    stop: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    tile: tuple[int, int]
    tiles: int
    batch_size: int
    computed_area: float
    macs: int
    peak_bytes: int
    store: str
    store_bytes: int
    engine: str | None = None


@dataclass(frozen=True)
class PlannedOutput:
    """One map a prediction plan writes: an output of the model.

    Attributes:
        name: the output's name (the key of its map when the model has several).
        map_size: ``(H', W')`` of its map.
        classes: its channels.
    """

    name: str
    map_size: tuple[int, int]
    classes: int


@dataclass(frozen=True)
class PredictionPlan:
    """How `predict_map` computes one image's map: its stages, tiles, work and memory.

    Attributes:
        image_size: ``(H, W)`` of the image.
        map_size: ``(H', W')`` of the map (of the first output's, when the
            model has several: see ``outputs``).
        tile: the requested tile, ``(T_h, T_w)`` in pixels, or None.
        stages: the `StagePlan` of each stage, in order (one for a plain pass).
        whole_macs: multiply-accumulates of one whole-image pass.
        plain_macs: those of plain exact tiles of the whole network (the
            cost staging is compared with); 0 where such tiles are too small
            to keep any cell.
        peak_bytes: estimated peak memory of the pass beyond the model's
            weights and the result: the largest batch's activations plus the
            stored maps held in memory meanwhile, plus about 0.75 GiB that
            TensorFlow's runtime takes on a first pass (fitted to VGG16).
        kept_fraction: the share of map cells a ``keep`` mask keeps (1.0
            without one); each stage then computes only the tiles the kept
            cells need, and ``macs`` counts only those.
        engine: the executions the stages run under (``"tf"``, ``"xla"`` or
            ``"blas"``, `inference.engines`; several joined by ``+``), or None
            when not asked for.
        engine_reason: why (asked for, measured, cached...), stage by stage.
        outputs: the `PlannedOutput` of each of the model's outputs, in its
            order: the last stage writes every one. Tiles serve them all
            (their maps share one grid), or, for outputs on different grids,
            the plan is one whole-image pass.
        finer: for a map at a stride finer than the network's (its FCN à
            trous), the `FinerStride` costs: this pass against the sliding
            window at that stride, shift-and-stitch and the FCN at its own
            stride; None otherwise.
        precision_costs: with an engine, what one call of its heaviest stage
            costs at float32, bfloat16 and float16 on this machine
            (`engines.precision_costs`, measured once and cached); "" without.
    """

    image_size: tuple[int, int]
    map_size: tuple[int, int]
    tile: tuple[int, int] | None
    stages: tuple[StagePlan, ...]
    whole_macs: int
    plain_macs: int
    peak_bytes: int
    kept_fraction: float = 1.0
    _runs: tuple = field(default=(), repr=False, compare=False)
    engine: str | None = None
    engine_reason: str = ""
    outputs: tuple[PlannedOutput, ...] = ()
    finer: FinerStride | None = None
    precision_costs: str = ""

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1

    @property
    def method(self) -> str:
        """``"fcn"``: the map of a fully convolutional network (see `inference.windowed.WindowedPlan`)."""
        return "fcn"

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the planned pass, all stages and tiles."""
        return sum(stage.macs for stage in self.stages)

    @property
    def work_ratio(self) -> float:
        """The planned work over that of one whole-image pass (1.0 = no overlap)."""
        return self.macs / self.whole_macs if self.whole_macs else 1.0

    def __str__(self) -> str:
        kind = f"{len(self.stages)} stages" if self.staged else "one stage"
        tile = "whole image" if self.tile is None else f"tile {self.tile[0]}x{self.tile[1]}"
        if self.kept_fraction < 1:
            kind += f", {self.kept_fraction:.0%} of the cells kept"
        lines = [
            f"{self.image_size[0]}x{self.image_size[1]} -> map {self.map_size[0]}x{self.map_size[1]}, {tile}, "
            f"{kind}: {self.macs / 1e9:.1f} GMAC = {self.work_ratio:.2f} x one whole pass "
            f"(plain tiles {self.plain_macs / max(self.whole_macs, 1):.2f} x); "
            f"peak memory ~{self.peak_bytes / 2**20:.0f} MiB",
            *([f"engine {self.engine}: {self.engine_reason}"] if self.engine else []),
            *([str(self.finer)] if self.finer is not None else []),
        ]
        if len(self.outputs) > 1:
            maps = ", ".join(f"{o.name} {o.map_size[0]}x{o.map_size[1]}x{o.classes}" for o in self.outputs)
            lines.append(f"{len(self.outputs)} outputs: {maps}")
        # Layer names are shown whole: the table widens for long ones.
        width = max(4, *(len(name) for s in self.stages for name in (s.start, s.stop)))
        engines = any(s.engine for s in self.stages)
        lines.append(
            f"{'from':>{width}s} {'to':>{width}s} {'input':>11s} {'tile':>11s} {'tiles':>5s} {'batch':>5s} "
            f"{'area':>5s} {'GMAC':>7s} {'peak MiB':>8s} {'store':>6s} {'MiB':>7s}" + (" engine" if engines else "")
        )
        for s in self.stages:
            lines.append(
                f"{s.start:>{width}s} {s.stop:>{width}s} {s.input_size[0]:>5d}x{s.input_size[1]:<5d} "
                f"{s.tile[0]:>5d}x{s.tile[1]:<5d} {s.tiles:>5d} {s.batch_size:>5d} {s.computed_area:>5.2f} "
                f"{s.macs / 1e9:>7.1f} {s.peak_bytes / 2**20:>8.0f} {s.store:>6s} {s.store_bytes / 2**20:>7.0f}"
                + (f" {s.engine or '':>6s}" if engines else "")
            )
        if self.precision_costs:
            lines.append(self.precision_costs)
        return "\n".join(lines)


@dataclass(frozen=True)
class _StageRun:
    """What running one stage needs: its model, input spec and tiles."""

    model: keras.Model
    spec: ImageSpec
    axis_plans: list
    batch_size: int
    store: str
    tiles: tuple | None = None  # the (rows, cols) tiles to run, of a masked plan; None: all of axis_plans
    keep: object = None  # the last stage's boolean cell mask; cells outside it are written as NaN

    def call_shapes(self) -> int:
        """How many input shapes its forward calls take (batch included): each a trace, or an XLA compilation."""
        if self.tiles is None:
            return 1
        counts = _shape_counts(self.tiles).values()
        return sum(1 + (count > self.batch_size and count % self.batch_size > 0) for count in counts)

    def call_shape(self) -> tuple[int, ...]:
        """The input shape of one forward call: a batch of its (largest) tiles."""
        rows, cols = self.axis_plans
        count = len(rows) * len(cols) if self.tiles is None else max(1, len(self.tiles))
        height, width = rows[0].stop - rows[0].start, cols[0].stop - cols[0].start
        return tuple(self.spec.layout.batch_shape(min(self.batch_size, count), height, width, self.spec.channels))


@dataclass(frozen=True)
class _Candidate:
    model: keras.Model
    axis_plans: list
    tile: tuple[int, int]
    tiles: int
    tile_macs: int
    tile_peak: int
    cost: float


def plan_fcn(
    fcn,
    image_size,
    *,
    tile=None,
    staged: bool | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    keep=None,
    engine: str | None = None,
) -> PredictionPlan:
    """`plan_prediction` of an FCN (no method to choose); a `Mapper`'s plans and a windowed map's prefix use it."""
    size = tuple(int(d) for d in image_size)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"Expected `batch_size` >= 1. Received: batch_size={batch_size}")
    if budget < 0:
        raise InputError(f"Expected `memory_budget` >= 0 bytes. Received: memory_budget={memory_budget}")
    if staged not in (None, True, False):
        raise InputError(f"Expected `staged` to be None, True or False. Received: staged={staged!r}")
    key = (size, None if tile is None else runner.pair(tile, "tile"), staged, batch_size, budget)
    per_model = model_facts(fcn).plans
    if key not in per_model:
        if len(per_model) >= _PLANS_PER_MODEL:  # slides of many sizes: forget the oldest plan
            per_model.pop(next(iter(per_model)))
        per_model[key] = _Planner(fcn, size, key[1], batch_size, budget).plan(staged)
    plan = per_model[key]
    if keep is not None:
        mask = _keep_mask(keep, plan.map_size)
        own = None
        if plan.tile is not None and staged is not False and mask.any() and not mask.all():
            # a mask keeping every cell computes what no mask does: the unmasked plan's cuts and tiles
            own = _Planner(fcn, size, key[1], batch_size, budget).masked(staged, mask)
        plan = own if own is not None else _masked(plan, mask, batch_given=batch_size is not None)
    if engine is not None:
        plan = engines.with_engine(plan, fcn, engine, calls=stage_calls(plan))
    return plan


def stage_calls(plan: PredictionPlan) -> tuple:
    """``(model, call shape, call shapes)`` of each stage of ``plan``: what an execution is chosen for
    (`engines.with_engine`), and how many shapes its calls take (a masked plan's tiles differ)."""
    return tuple((run.model, run.call_shape(), run.call_shapes()) for run in plan._runs)


def _keep_mask(keep, map_size) -> np.ndarray:
    mask = np.asarray(keep)
    if mask.shape != tuple(map_size):
        raise InputError(
            f"`keep` has shape {mask.shape}, but the map of this image has {map_size[0]}x{map_size[1]} cells. "
            "Give one boolean per map cell (`geometry(fcn).output_size((H, W))`)."
        )
    return mask.astype(bool, copy=False)


def _masked(plan: PredictionPlan, keep: np.ndarray, *, batch_given: bool, chosen=None) -> PredictionPlan:
    """``plan`` restricted to what the kept cells need, working back from the last stage.

    Each stage runs the tiles that write a cell the kept cells depend on (for
    the last stage, a kept cell; for the others, a cell in the windows of the
    needed cells of the stage after), each shortened to the needed cells it
    writes (`tiling.crop_tile`) or split into smaller such tiles where that
    computes less (`_masked_stage`). The needed cells of the stage before are
    the windows of this stage's needed cells, so tile overlaps do not add up
    from stage to stage. ``chosen`` gives each stage's `_MaskedTiling` where
    the caller has chosen them already (`_Planner.masked`).
    """
    needed = keep
    stages, runs = list(plan.stages), list(plan._runs)
    for index in reversed(range(len(stages))):
        stage, run = stages[index], runs[index]
        if chosen is not None:
            best = chosen[index]
        else:
            planned = (run.axis_plans, stage.tile, stage.batch_size)
            finer, given = plan.tile is not None, batch_given
            best = _masked_stage(run.model, run.spec, planned, stage.input_size, needed, finer=finer, batch_given=given)
        area = sum((r.stop - r.start) * (c.stop - c.start) for r, c in best.tiles)
        stages[index] = replace(
            stage,
            tile=best.tile,
            tiles=len(best.tiles),
            batch_size=best.batch,
            computed_area=area / (stage.input_size[0] * stage.input_size[1]),
            macs=best.macs,
        )
        last = index == len(stages) - 1
        runs[index] = replace(
            run, axis_plans=best.axis_plans, batch_size=best.batch, tiles=tuple(best.tiles), keep=keep if last else None
        )
        if index and chosen is None:  # the cells the stage before must write (the image is all there)
            needed = _cells_read(run.model, stage.input_size, needed)
    return replace(plan, stages=tuple(stages), _runs=tuple(runs), kept_fraction=float(keep.mean()))


@dataclass(frozen=True)
class _MaskedTiling:
    """How one stage writes its needed cells: its tiling, the tiles it runs and what they cost."""

    cost: float
    axis_plans: list
    tile: tuple[int, int]
    batch: int
    tiles: list
    macs: int


def _masked_stage(model, spec, planned, input_size, needed: np.ndarray, *, finer: bool, batch_given: bool):
    """The cheapest tiles found that write the ``needed`` output cells of one stage: a `_MaskedTiling`.

    ``planned`` is the stage's ``(axis_plans, tile, batch)``; with ``finer``,
    tilings at a half, a quarter... of its tile side are tried too. Each
    tiling's tiles that write a needed cell are cropped to the needed cells
    they write, in steps of one cell or of a quarter tile, and each is kept
    whole or split (`_cover`); the cost counts the multiply-accumulates, the
    forward calls and each new call shape (a trace or compilation).
    """
    options = [planned]
    if finer:
        options += _finer_tilings(model, input_size, planned[1], planned[2], batch_given)
    macs_of, exact_cells = _tile_arithmetic(model, spec, planned[1])
    best: _MaskedTiling | None = None
    for axis_plans, tile, batch in options:
        many = tile != planned[1] or tiling.tiles_touching(needed, *axis_plans).sum() > _MAX_MASKED_TILES
        for quantum, split in _MASKED_CROPS:
            if split and many:
                continue  # smaller or many tiles follow the mask's edges already; splitting them takes planning time
            tiles = _needed_tiles(model, axis_plans, tile, needed, quantum, macs_of if split else None, exact_cells)
            macs, cost = 0, 0.0
            for shape, count in _shape_counts(tiles).items():
                macs += count * macs_of(shape)
                # a batch dimension of its own for the last, partial batch: one more shape to trace
                shapes = 1 + (count > batch and count % batch > 0)
                cost += -(-count // batch) * _MACS_PER_CALL + shapes * macs_of.shape_cost
            cost += macs
            if best is None or cost < best.cost:
                best = _MaskedTiling(cost, axis_plans, tile, batch, tiles, macs)
    assert best is not None  # the planned tiling is always an option
    return best


def _needed_tiles(
    model, axis_plans, tile, needed: np.ndarray, quantum: int | None = None, macs_of=None, exact_cells=None
) -> list:
    """The tiles that write a needed cell, each cropped to the needed cells it writes (rows, then columns).

    Crops go in steps of ``quantum`` cells, or of a quarter of the tile's
    cells for None (a few tile shapes per stage, each traced or compiled
    once). With ``macs_of`` (a tile shape's multiply-accumulates), a tile is
    split where its halves compute less (`_cover`).
    """
    grid = geometry(model)
    cells = grid.output_size(tile)
    inner = grid.exact_cells(tile, at_image_start=(False, False), at_image_end=(False, False))
    margins = [(start, count - stop) for (start, stop), count in zip(inner, cells)]
    quanta = [max(1, count // 4) if quantum is None else quantum for count in cells]
    rows, cols = axis_plans
    selected = tiling.tiles_touching(needed, rows, cols)
    found: list = []
    exact_cells = exact_cells or _ExactCells(grid, tile)
    for i, j in zip(*np.nonzero(selected)):
        row, col = rows[i], cols[j]

        def crop(first_row, last_row, first_col, last_col, row=row, col=col):
            cropped = tuple(
                tiling.crop_tile(part, cells[axis], start, stop, grid.stride[axis], *margins[axis], quanta[axis])
                for axis, (part, start, stop) in enumerate(((row, first_row, last_row), (col, first_col, last_col)))
            )
            return _exact_or_whole((row, col), cropped, exact_cells, axis_plans)

        block = needed[row.out_start : row.out_stop, col.out_start : col.out_stop]
        found += _cover(block, (row.out_start, col.out_start), crop, macs_of, _MASKED_SPLITS)[0]
    return found


def _cover(block: np.ndarray, origin, crop, macs_of, depth: int) -> tuple[list, float]:
    """Tiles writing the True cells of ``block`` (cells of the map from ``origin``), and their cost.

    One tile cropped to the box of the True cells (``crop`` of that box in map
    cells), or, with ``macs_of`` and ``depth`` left, that box cut in two
    (`_best_cut`) and each part covered alike, where the parts compute less
    even with a new call shape each (a tile across a mask's edge, or around a
    hole, computes its whole box; each part adds its own margins).
    """
    used_rows, used_cols = np.flatnonzero(block.any(axis=1)), np.flatnonzero(block.any(axis=0))
    if not len(used_rows):
        return [], 0.0
    r0, r1, c0, c1 = int(used_rows[0]), int(used_rows[-1]) + 1, int(used_cols[0]), int(used_cols[-1]) + 1
    whole = crop(origin[0] + r0, origin[0] + r1, origin[1] + c0, origin[1] + c1)
    if macs_of is None:
        return [whole], 0.0
    macs = macs_of(tuple(t.stop - t.start for t in whole))
    cost = macs + _MACS_PER_CALL
    box = block[r0:r1, c0:c1]
    if not depth or box.all() or max(r1 - r0, c1 - c0) < 2:
        return [whole], cost
    # A tile's work per written cell only grows as it shrinks (its margins are shared by fewer cells), so parts
    # writing the needed cells compute at least their share of this tile's work, and a split adds a call and a
    # shape: where what it could save is less, no split can win (the recursion below is most of a plan's time).
    written = (whole[0].keep_stop - whole[0].keep_start) * (whole[1].keep_stop - whole[1].keep_start)
    if macs * (1 - int(box.sum()) / max(written, 1)) <= macs_of.shape_cost + _MACS_PER_CALL:
        return [whole], cost
    halves = _best_cut(block, box, (r0, c0))
    parts, total = [], 0.0
    for half, (dr, dc) in halves:
        tiles, half_cost = _cover(half, (origin[0] + dr, origin[1] + dc), crop, macs_of, depth - 1)
        parts += tiles
        total += half_cost
    # each piece may be a call shape of its own: a split must save more than tracing it costs
    total += macs_of.shape_cost * (len(parts) - 1)
    return (parts, total) if total < cost else ([whole], cost)


def _tile_arithmetic(model, spec, reference) -> tuple[_TileMacs, _ExactCells]:
    """A stage model's `_TileMacs` and `_ExactCells` around tiles of ``reference``, learned once per model: every
    masked plan of the same stage (each candidate chain, each slide of a job) reuses what the others inferred."""
    known = model_facts(model).tile_arithmetic
    key = (spec.layout.data_format, spec.channels, tuple(reference))
    if key not in known:
        known[key] = (_TileMacs(model, spec, reference), _ExactCells(geometry(model), reference))
    return known[key]


class _TileMacs:
    """A stage's multiply-accumulates at any tile shape, from one shape inference per distinct side.

    A layer's work is its output cells times a cost per cell, and its output
    rows depend on the input's rows alone (columns likewise), so a shape's
    work follows from its rows' and its columns' sizes, each inferred once
    with the other side at the reference tile's. A model where that does not
    hold (checked at the reference tile) is costed shape by shape.
    """

    def __init__(self, model, spec, reference):
        self.model, self.spec, self.reference = model, spec, tuple(reference)
        self.rows: dict = {}
        self.cols: dict = {}
        self.shapes: dict = {}
        layers = self._layers(self.reference)
        self.per_cell = [macs // max(1, r * c) for macs, r, c in layers]
        whole = pass_cost(model, self._shape(self.reference)).macs
        # a small network's new shape costs little: at most a quarter of its reference tile's pass
        self.shape_cost = min(_MACS_PER_SHAPE, whole // 4)
        self.separable = all(macs == p * r * c for p, (macs, r, c) in zip(self.per_cell, layers))
        self.separable = self.separable and sum(macs for macs, _, _ in layers) == whole

    def _shape(self, size):
        return self.spec.layout.batch_shape(1, size[0], size[1], self.spec.channels)

    def _layers(self, size) -> list:
        return [
            (macs, *(int(d) for d in self.spec.layout.spatial_shape(shape)))
            for macs, shape in layer_costs(self.model, self._shape(size))
        ]

    def __call__(self, shape) -> int:
        shape = tuple(shape)
        if shape not in self.shapes:
            if self.separable:
                if shape[0] not in self.rows:
                    self.rows[shape[0]] = [r for _, r, _ in self._layers((shape[0], self.reference[1]))]
                if shape[1] not in self.cols:
                    self.cols[shape[1]] = [c for _, _, c in self._layers((self.reference[0], shape[1]))]
                rows, cols = self.rows[shape[0]], self.cols[shape[1]]
                self.shapes[shape] = sum(p * r * c for p, r, c in zip(self.per_cell, rows, cols))
            else:
                self.shapes[shape] = pass_cost(self.model, self._shape(shape)).macs
        return self.shapes[shape]


class _ExactCells:
    """`Geometry.exact_cells` of tiles of a stage, axis by axis (each axis's cells depend on its own side)."""

    def __init__(self, grid, reference):
        self.grid, self.reference = grid, tuple(reference)
        self.axes: dict = {}

    def __call__(self, size, starts, ends) -> tuple:
        found = []
        for axis in range(2):
            key = (axis, size[axis], starts[axis], ends[axis])
            if key not in self.axes:
                sides = list(self.reference)
                sides[axis] = size[axis]
                self.axes[key] = self.grid.exact_cells(
                    tuple(sides), at_image_start=(starts[axis],) * 2, at_image_end=(ends[axis],) * 2
                )[axis]
            found.append(self.axes[key])
        return tuple(found)


def _best_cut(block, box, corner) -> list:
    """``box`` (``block`` from ``corner`` on) cut in two across rows or columns where the boxes of the True
    cells on either side cover the fewest cells: its two ``(part of block, its origin in block)``."""
    best: tuple | None = None
    for axis in (0, 1):
        if box.shape[axis] < 2:
            continue
        across = box if axis == 0 else box.T
        used = across.any(axis=1)
        first = np.where(used, across.argmax(axis=1), across.shape[1])
        last = np.where(used, across.shape[1] - across[:, ::-1].argmax(axis=1), -1)
        # for a cut before line k (1..n-1): the box of lines < k and the box of lines >= k
        size_before = _box_sizes(used, first, last)
        size_after = _box_sizes(used[::-1], first[::-1], last[::-1])[::-1]
        total = size_before[:-1] + size_after[1:]
        k = int(np.argmin(total)) + 1
        if best is None or total[k - 1] < best[0]:
            best = (int(total[k - 1]), axis, k)
    assert best is not None  # the box has a side of 2 or more
    _, axis, k = best
    r0, c0 = corner
    if axis == 0:
        return [
            (block[r0 : r0 + k, c0 : c0 + box.shape[1]], (r0, c0)),
            (block[r0 + k : r0 + box.shape[0], c0 : c0 + box.shape[1]], (r0 + k, c0)),
        ]
    return [
        (block[r0 : r0 + box.shape[0], c0 : c0 + k], (r0, c0)),
        (block[r0 : r0 + box.shape[0], c0 + k : c0 + box.shape[1]], (r0, c0 + k)),
    ]


def _box_sizes(used, first, last) -> np.ndarray:
    """For each prefix of lines (1, 2, ... all): cells of the box of its True cells (0 for none)."""
    lines = np.arange(len(used))
    top = np.minimum.accumulate(np.where(used, lines, len(used)))
    bottom = np.maximum.accumulate(np.where(used, lines, -1))
    low = np.minimum.accumulate(first)
    high = np.maximum.accumulate(last)
    return np.where(bottom >= 0, (bottom - top + 1) * np.maximum(high - low, 0), 0)


def _exact_or_whole(whole, cropped, exact_cells, axis_plans) -> tuple:
    """``cropped`` where its written cells are exact for its new size and edges, else ``whole`` (as planned)."""
    size = tuple(t.stop - t.start for t in cropped)
    lengths = (axis_plans[0][-1].stop, axis_plans[1][-1].stop)
    try:
        exact = exact_cells(
            size, tuple(t.start == 0 for t in cropped), tuple(t.stop == n for t, n in zip(cropped, lengths))
        )
    except ConversionError:
        return whole
    if all(start <= t.keep_start and t.keep_stop <= stop for t, (start, stop) in zip(cropped, exact)):
        return cropped
    return whole


def _shape_counts(tiles) -> dict:
    counts: dict = {}
    for rows, cols in tiles:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        counts[shape] = counts.get(shape, 0) + 1
    return counts


def _cells_read(model, input_size, needed: np.ndarray) -> np.ndarray:
    """The input cells whose values the ``needed`` output cells depend on: each cell's window, unioned.

    The stage's tiles read more (their overlaps, and whole tiles around the
    needed cells); cells read but not needed are left unwritten (zeros) by
    the stage before and only reach output cells that are not needed either.
    """
    grid = geometry(model).at(input_size)
    windows = []
    for length, cells, stride, offset, field_ in zip(
        input_size, needed.shape, grid.stride, grid.offset, grid.receptive_field
    ):
        starts = [min(max(offset + i * stride, 0), length) for i in range(cells)]
        windows.append(
            [tiling.AxisTile(start, min(max(start + field_, 0), length), 0, 1, i) for i, start in enumerate(starts)]
        )
    return tiling.pixels_read(input_size, windows[0], windows[1], needed)


def _finer_tilings(model, input_size, tile, batch: int, batch_given: bool) -> list:
    """A stage's exact tilings at a half, a quarter... of its tile side, as long as they keep cells."""
    grid = geometry(model)
    found, side = [], tile
    while min(side) >= 2:
        side = (max(1, side[0] // 2), max(1, side[1] // 2))
        try:
            axis_plans = runner.plan_tiles(input_size, grid, side)
        except ConversionError:
            break
        if len(axis_plans[0]) * len(axis_plans[1]) > _MAX_MASKED_TILES:
            break  # tiles this small overlap more than they save, and planning them takes seconds
        smaller = _tile_size(axis_plans)
        if smaller == tuple(tile):
            continue
        scale = (tile[0] * tile[1]) // max(1, smaller[0] * smaller[1])
        found.append((axis_plans, smaller, batch if batch_given else max(1, batch * scale)))
    return found


class _Planner:
    def __init__(self, fcn, size, tile, batch_size, budget):
        self.fcn, self.size, self.tile, self.batch_size, self.budget = fcn, size, tile, batch_size, budget
        self.spec = outputs = fcn_spec(fcn)
        try:
            self.grid = geometry(fcn)
            grids = [self.grid] * len(outputs.outputs)
        except ConversionError as apart:
            if not outputs.several:
                raise
            # Each output's own geometry raises what is wrong with it; if none does, the outputs lie on
            # different grids: one whole pass serves them, tiles cannot.
            grids = [geometry(fcn, output=name) for name in outputs.names]
            if tile is not None and any(t < n for t, n in zip(tile, size)):
                raise apart
            self.grid = grids[0]
        for grid in grids:
            runner.check_image_size(size, grid)
        self.outputs = tuple(
            PlannedOutput(o.name, grid.output_size(size), o.classes) for o, grid in zip(outputs.outputs, grids)
        )
        self.map_size = self.outputs[0].map_size
        self.itemsize = np.dtype(runner.output_dtype(fcn)).itemsize

    def _shape(self, spatial, channels, batch=1):
        return self.spec.layout.batch_shape(batch, spatial[0], spatial[1], channels)

    def plan(self, staged):
        whole = pass_cost(self.fcn, self._shape(self.size, self.spec.channels))
        covered = self.tile is None or all(t >= n for t, n in zip(self.tile, self.size))
        if staged and self.grid.global_context and not covered:
            raise ConversionError(self._global_context_message())
        try:
            axis_plans = runner.plan_tiles(self.size, self.grid, self.tile)
        except ConversionError as error:
            if not staged or self.grid.global_context:
                raise  # staging is chosen for speed, never to rescue tiles too small: only when asked
            plain_error, plain, plain_macs = error, None, 0
            # Plain tiles of this size are impossible; activations of the smallest that is not.
            side = tuple(max(t, m) for t, m in zip(self.tile, self.grid.min_input_size))
            self.activation_budget = pass_cost(self.fcn, self._shape(side, self.spec.channels)).peak_elements
            self.reference = self.activation_budget * runner.PIXELS_PER_BATCH // (side[0] * side[1])
        else:
            plain_error = None
            tile = _tile_size(axis_plans)
            tiles = len(axis_plans[0]) * len(axis_plans[1])
            one_tile = pass_cost(self.fcn, self._shape(tile, self.spec.channels))
            plain_macs = tiles * one_tile.macs
            batch = self.batch_size or max(1, runner.PIXELS_PER_BATCH // (tile[0] * tile[1]))
            candidate = _Candidate(self.fcn, axis_plans, tile, tiles, one_tile.macs, one_tile.peak_elements, 0)
            plain = ([(None, None, candidate)], [batch])
            self.activation_budget = one_tile.peak_elements
            # The activations of a batch of about 1 million pixels of plain tiles.
            self.reference = max(one_tile.peak_elements * runner.PIXELS_PER_BATCH // (tile[0] * tile[1]), 1)
            if tiles == 1 or staged is False:
                return self._build(*plain, whole.macs, plain_macs)
        chain = self._staged_chain(staged)
        if chain is None:
            if plain is None:
                raise plain_error
            return self._build(*plain, whole.macs, plain_macs)
        stages, cost, _ = chain
        if staged is None and plain is not None:
            plain_cost = plain_macs + plain[0][0][2].tiles * _MACS_PER_CALL
            if cost > (1 - _MIN_SAVING) * plain_cost:
                return self._build(*plain, whole.macs, plain_macs)
        batches = [
            self.batch_size or max(1, min(candidate.tiles, self.reference // max(candidate.tile_peak, 1)))
            for _, _, candidate in stages
        ]
        return self._build(stages, batches, whole.macs, plain_macs)

    def _global_context_message(self) -> str:
        culprit = next(
            (node.operation for node in flat_nodes(self.fcn) if "Global" in type(node.operation).__name__), None
        )
        where = f"layer {describe(culprit)}" if culprit is not None else "a layer"
        return (
            f"Model '{self.fcn.name}' cannot be staged: {where} pools over the whole map, so every cell depends "
            "on every pixel and no stage after it can be tiled. Use `tile=None` (one whole-image pass)."
        )

    def _staged_chain(self, staged, keep=None):
        graph = graph_of(self.fcn)
        shapes = tensor_shapes(self.fcn, self._shape(self.size, self.spec.channels))
        cuts = _cut_tensors(graph, shapes, self.spec.layout)
        if not cuts:
            if staged:
                raise ConversionError(
                    f"Model '{self.fcn.name}' cannot be staged: no tensor between its input and output carries "
                    "all later computation at a new stride (every pooling is crossed by a branch). "
                    "Use `staged=None` or `staged=False` (plain exact tiles)."
                )
            return None
        bounds = [None, *cuts, _outputs_bound(graph.outputs)]
        self.shapes, self.bounds = shapes, bounds
        cache: dict = {}

        last = len(bounds) - 1
        masked_cost = None if keep is None else self._masked_cost(keep)

        def cost(i, j):
            if staged and (i, j) == (0, last):
                return None  # staging required: not the whole network as one stage
            if (i, j) not in cache:
                cache[(i, j)] = self._candidate(i, j)
            candidate = cache[(i, j)]
            if candidate is None or masked_cost is None:
                return None if candidate is None else candidate.cost
            return masked_cost(i, j, candidate)

        chain, total = stage_math.cheapest_chain(last, cost)
        if not chain or (len(chain) == 2 and keep is None):
            if staged:
                raise ConversionError(
                    f"Model '{self.fcn.name}' cannot be staged at tiles of {self.tile}: no chain of stages can "
                    "be tiled exactly. Use `staged=None` or larger tiles."
                )
            return None
        stages = [(bounds[i], bounds[j], cache[(i, j)]) for i, j in zip(chain, chain[1:])]
        return stages, total, chain

    def _candidate(self, i, j):
        start, stop = self.bounds[i], self.bounds[j]
        model = _stage_model(self.fcn, start, stop)
        try:
            if model_layout(model) != self.spec.layout:
                return None
            grid = geometry(model)
        except ConversionError:
            return None
        if grid.global_context:
            return None
        in_shape = self.shapes[id(start)] if start is not None else self._shape(self.size, self.spec.channels)
        in_size = tuple(int(d) for d in self.spec.layout.spatial_shape(in_shape))
        channels = int(self.spec.layout.channels(in_shape))
        requested = self.tile if i == 0 else self._deep_tile(model, in_size, channels)
        axis_plans = None
        while axis_plans is None:
            try:
                axis_plans = runner.plan_tiles(in_size, grid, requested)
            except ConversionError:
                # The first stage keeps the requested tiles; deeper ones grow theirs until they work.
                if i == 0 or all(r >= n for r, n in zip(requested, in_size)):
                    return None
                requested = tuple(min(2 * r, n) for r, n in zip(requested, in_size))
        tile = _tile_size(axis_plans)
        tiles = len(axis_plans[0]) * len(axis_plans[1])
        one = pass_cost(model, self._shape(tile, channels))
        cost = tiles * (one.macs + _MACS_PER_CALL)
        if j < len(self.bounds) - 1:
            elements = int(np.prod(self.shapes[id(stop)][1:]))
            spill = elements * self.itemsize > self.budget
            cost += elements * (_MACS_PER_SPILLED_ELEMENT if spill else _MACS_PER_STORED_ELEMENT)
        return _Candidate(model, axis_plans, tile, tiles, one.macs, one.peak_elements, cost)

    def masked(self, staged, keep: np.ndarray) -> PredictionPlan | None:
        """The plan of the ``keep`` cells with cuts and tiles of their own; None where it has no stages to choose.

        The cuts are the cheapest chain for the kept cells: each candidate
        stage is costed by the tiles that write the cells the kept cells need
        of its output (`_masked_stage`), so a mask may cut where the unmasked
        plan does not (a cut before a head of valid convolutions, whose tiles
        then compute the kept cells and little else).
        """
        unmasked = self.plan(staged)  # the whole pass's and plain tiles' work, the activation budget
        found = self._staged_chain(staged, keep)
        if found is None or self.too_large:
            return None
        stages = found[0]
        batches = [self._batch(candidate) for _, _, candidate in stages]
        plan = self._build(stages, batches, unmasked.whole_macs, unmasked.plain_macs)
        chosen = [self.masked_tilings[(i, j)] for i, j in zip(found[2], found[2][1:])]
        return _masked(plan, keep, batch_given=self.batch_size is not None, chosen=chosen)

    def _batch(self, candidate) -> int:
        return self.batch_size or max(1, min(candidate.tiles, self.reference // max(candidate.tile_peak, 1)))

    def _masked_cost(self, keep: np.ndarray):
        """``cost(i, j, candidate)`` of a stage writing only the cells that ``keep``'s cells need of its output."""
        last = len(self.bounds) - 1
        self.needed = {last: keep}
        self.masked_tilings: dict = {}
        self.too_large = False
        costs: dict = {}

        def needed_at(j):
            if j not in self.needed:
                # Windows of the kept cells through the rest of the network at once: a box per kept cell.
                rest = _stage_model(self.fcn, self.bounds[j], self.bounds[last])
                size = tuple(int(d) for d in self.spec.layout.spatial_shape(self.shapes[id(self.bounds[j])]))
                if size[0] * size[1] > _MAX_MASK_CELLS:
                    self.too_large, self.needed[j] = True, None
                    return None
                try:
                    self.needed[j] = _cells_read(rest, size, keep)
                except ConversionError:
                    self.needed[j] = None
            return self.needed[j]

        def cost(i, j, candidate):
            if (i, j) not in costs:
                needed = needed_at(j)
                if needed is None:
                    costs[(i, j)] = None
                    return None
                rows, cols = candidate.axis_plans
                spec = self.spec
                if i:
                    spec = ImageSpec(spec.layout, int(spec.layout.channels(self.shapes[id(self.bounds[i])])))
                planned = (candidate.axis_plans, candidate.tile, self._batch(candidate))
                size = (rows[-1].stop, cols[-1].stop)
                given = self.batch_size is not None
                best = _masked_stage(candidate.model, spec, planned, size, needed, finer=True, batch_given=given)
                self.masked_tilings[(i, j)] = best
                total = best.cost
                if j < last:
                    elements = int(needed.sum()) * int(self.spec.layout.channels(self.shapes[id(self.bounds[j])]))
                    spill = int(np.prod(self.shapes[id(self.bounds[j])][1:])) * self.itemsize > self.budget
                    total += elements * (_MACS_PER_SPILLED_ELEMENT if spill else _MACS_PER_STORED_ELEMENT)
                costs[(i, j)] = total
            return costs[(i, j)]

        return cost

    def _deep_tile(self, model, in_size, channels):
        """The requested tile scaled to a deeper stage's map, as large as one call's activation budget allows."""
        base = tuple(max(1, -(-t * n // s)) for t, n, s in zip(self.tile, in_size, self.size))
        try:
            base_peak = pass_cost(model, self._shape(base, channels)).peak_elements
        except Exception:  # a tile too small for the stage: let plan_tiles say so, then grow it
            return base
        # One call may hold a batch's activations (`reference`); one larger tile holds no more than that.
        budget = self.activation_budget if self.batch_size else max(self.activation_budget, self.reference)
        factor = max(1.0, stage_math.memory_scale(base_peak, budget))
        return stage_math.scaled_tile(base, factor, in_size)

    def _build(self, stages, batches, whole_macs, plain_macs):
        last = len(stages) - 1
        sizes = []
        for index, (_, stop, _) in enumerate(stages):
            if index < last:
                sizes.append(int(np.prod(self.shapes[id(stop)][1:])) * self.itemsize)
        in_memory = stage_math.place_stores(sizes, self.budget)
        plans, runs, peak = [], [], 0
        for index, ((start, stop, candidate), batch) in enumerate(zip(stages, batches)):
            axis_plans = candidate.axis_plans
            in_size = (axis_plans[0][-1].stop, axis_plans[1][-1].stop)
            out_size = (axis_plans[0][-1].out_stop, axis_plans[1][-1].out_stop)
            channels = self.spec.channels
            if start is not None:
                channels = int(self.spec.layout.channels(self.shapes[id(start)]))
            store = "out" if index == last else ("memory" if in_memory[index] else "disk")
            store_bytes = sizes[index] if index < last else self._maps_bytes()
            area = sum((r.stop - r.start) * (c.stop - c.start) for r in axis_plans[0] for c in axis_plans[1])
            peak_bytes = batch * candidate.tile_peak * self.itemsize
            held = peak_bytes
            if index and in_memory[index - 1]:
                held += sizes[index - 1]
            if store == "memory":
                held += store_bytes
            peak = max(peak, held)
            plans.append(
                StagePlan(
                    start="input" if start is None else _producer_name(start),
                    stop=_producer_name(stop if stop is not None else _outputs_bound(self.fcn.outputs)),
                    input_size=in_size,
                    output_size=out_size,
                    tile=candidate.tile,
                    tiles=candidate.tiles,
                    batch_size=batch,
                    computed_area=area / (in_size[0] * in_size[1]),
                    macs=candidate.tiles * candidate.tile_macs,
                    peak_bytes=peak_bytes,
                    store=store,
                    store_bytes=store_bytes,
                )
            )
            spec = ImageSpec(self.spec.layout, channels)
            runs.append(_StageRun(candidate.model, spec, axis_plans, batch, store))
        return PredictionPlan(
            image_size=self.size,
            map_size=self.map_size,
            tile=self.tile,
            stages=tuple(plans),
            whole_macs=whole_macs,
            plain_macs=plain_macs,
            peak_bytes=peak + _RUNTIME_BYTES,
            _runs=tuple(runs),
            outputs=self.outputs,
        )

    def _maps_bytes(self) -> int:
        return sum(int(np.prod(o.map_size)) * o.classes for o in self.outputs) * self.itemsize


def run_plan(plan: PredictionPlan, image, out, *, preprocess, forward_for, progress, prefetch, spill_dir=None):
    """Run every stage of ``plan`` on ``image``, the last one writing into ``out``."""
    runs = plan._runs
    scratch = Scratch("kfs-stages-", spill_dir)
    try:
        with scratch, runner.progress_bar(sum(s.tiles for s in plan.stages), progress, "tiles") as bar:
            source = image
            for index, (stage, run) in enumerate(zip(plan.stages, runs)):
                if run.store == "out":
                    target = out
                else:  # zeros: cells a masked plan skips stay finite
                    shape = _image_shape(run, stage, plan, index)
                    dtype = runner.output_dtype(run.model)
                    target = scratch.array(f"stage{index}", shape, dtype, on_disk=run.store == "disk")
                runner.run_tiles(
                    forward_for(run.model, stage.engine),
                    source,
                    runner.TileJob(run.spec, run.axis_plans, run.batch_size, tiles=run.tiles, keep=run.keep),
                    target,
                    preprocess=preprocess if index == 0 else None,
                    dtype=runner.input_dtype(run.model),
                    bar=bar,
                    prefetch=prefetch,
                )
                if index:
                    scratch.release(f"stage{index - 1}")  # read: no later stage needs it
                source = target
        return out
    except OSError as error:
        raise ConversionError(
            f"Could not write or read a stored stage map in {scratch.where()}: {error}. Free disk space, "
            "pass `spill_dir=` on a larger disk, or raise `memory_budget=` to keep the maps in memory."
        ) from error


def _image_shape(run: _StageRun, stage: StagePlan, plan: PredictionPlan, index: int) -> tuple:
    channels = int(run.spec.layout.channels(tuple(run.model.outputs[0].shape)))
    return run.spec.layout.image_shape(stage.output_size[0], stage.output_size[1], channels)


def _tile_size(axis_plans) -> tuple[int, int]:
    rows, cols = axis_plans
    return (rows[0].stop - rows[0].start, cols[0].stop - cols[0].start)


def _outputs_bound(outputs):
    """The last stage's stop: the one output tensor, or the tuple of them all."""
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _producer_name(tensor) -> str:
    if isinstance(tensor, tuple):
        return "+".join(_producer_name(t) for t in tensor)
    operation = producer_of(tensor)
    return operation.name if operation is not None else str(tensor.name)


def _stage_model(fcn, start, stop):
    per_model = model_facts(fcn).stages
    key = (id(start), tuple(map(id, stop)) if isinstance(stop, tuple) else id(stop))
    if key not in per_model:
        name = f"{fcn.name}_stage_{_producer_name(start) if start is not None else 'input'}_{_producer_name(stop)}"
        name = name.replace("+", "_")  # several outputs' names: '+' is no valid model name
        per_model[key] = sub_model(fcn, start, list(stop) if isinstance(stop, tuple) else stop, name=name)
    return per_model[key]


def _cut_tensors(graph, shapes, layout) -> list:
    """Tensors that carry all later computation, each the first at a new (coarser) stride.

    The graph's nodes are in an order where each follows its inputs; a
    node's single output is a cut when no edge from an earlier tensor passes
    over it. Nested models count as one node.
    """
    nodes = nodes_in_order(graph)
    uncrossed = set(cut_positions(nodes, graph.inputs, graph.outputs))
    output_ids = {id(t) for t in graph.outputs}
    cuts, level = [], None
    for index, node in enumerate(nodes[:-1]):
        if len(node.outputs) != 1 or id(node.outputs[0]) in output_ids:
            continue
        tensor = node.outputs[0]
        crossing = index not in uncrossed
        if crossing or len(shapes.get(id(tensor), ())) != 4:
            continue
        side = min(layout.spatial_shape(shapes[id(tensor)]))
        if side < 1:
            continue
        if level is None:
            level = min(layout.spatial_shape(shapes[id(graph.inputs[0])]))
        if level / side >= _STRIDE_STEP:
            cuts.append(tensor)
            level = side
    return cuts
