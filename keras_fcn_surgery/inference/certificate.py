"""A certificate of exactness for a score map: sampled cells against the classifier on the crops they stand for.

A score map replaces a sliding window: cell ``(i, j)`` stands for the
classifier run on one crop of the image, of the classifier's input size.
`certify_map` cuts that crop out for a few sampled cells, runs the classifier
on it (or, when the classifier is not at hand, the FCN itself: at exactly the
classifier's input size the FCN *is* the classifier, which `convert` verified),
and compares, relative to the output scale as `surgery.verify` measures a
conversion.

Which crop: the crop's one cell must see the window the map's cell sees. With
``o_N`` the offset of the map's windows at the image size and ``o_S`` that of
the single window at the crop size ``S`` (`grid.geometry`), the crop of cell
``i`` starts at ``o_N - o_S + i * stride`` on each axis. Only cells whose crop
lies inside the image are sampled. A ``valid``-padding network's cells equal
their crops within float32 round-off; a ``same``-padding network's classifier
sees zeros past its crop's edge where the map's cell sees the neighbouring
pixels, so the cells differ and an `InexactMapWarning` says by how much.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from keras_fcn_surgery.errors import ConversionError, InexactMapWarning, InputError, UncertifiableMapError
from keras_fcn_surgery.graph import source_of, traced_model
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.grid.geometry import Geometry, geometry
from keras_fcn_surgery.inference import engines, runner, windowed
from keras_fcn_surgery.layout import ImageSpec
from keras_fcn_surgery.options import CERTIFIED_CELLS
from keras_fcn_surgery.saving.record import source_input_size
from keras_fcn_surgery.surgery.atrous import origin_of
from keras_fcn_surgery.surgery.fcn import as_fcn, choose_output, fcn_spec, is_fully_convolutional, original_size
from keras_fcn_surgery.surgery.verify import (
    RELATIVE_TOLERANCE,
    VerificationResult,
    batch_spread,
    compare_arrays,
    tolerance_for,
)

# Cells `certify_map`, `predict_images` and the CLI's `predict` and `heatmap` certify unless told otherwise.
DEFAULT_CELLS = CERTIFIED_CELLS


def precision_tolerance(precision: str) -> float:
    """The relative tolerance (of the output scale) a map computed at ``precision`` is certified to.

    The one place that says how close a reduced-precision map must stay to the
    float32 classifier. A pass under a mixed policy rounds every layer's
    output to the compute type (variables and the accumulation of products
    stay float32); each rounding is off by at most the unit roundoff ``u``
    relative to the value: 2^-8 for bfloat16's 8-bit significand, 2^-11 for
    float16's 11 bits. Through a network the relative errors add, about one
    ``u`` per rounded layer, and are measured against the largest magnitude
    the float32 classifier gives on the certified crops (the output scale).
    bfloat16 is allowed 16 of them, a VGG16's depth: 2^-4, 6e-2 (VGG16 at
    512x512 measured 3.8e-3, issue 39). float16 keeps 2e-2, the tolerance
    `surgery.verify` checks float16 conversions at (16 u is 8e-3; float16's
    narrow range, 6e-5 to 65504, also rounds small activations coarsely).
    float32 is the conversion's own, 1e-4 (summation order only).

    Raises:
        InputError: for a precision other than float32, bfloat16 or float16.
    """
    return RELATIVE_TOLERANCE[engines.check_precision(precision)]


@dataclass(frozen=True)
class MapCertificate:
    """How far sampled cells of a score map are from the classifier on the crops they stand for.

    Built by `certify_map`. The comparison is `surgery.verify`'s: the largest
    absolute difference, and that divided by the largest magnitude the
    classifier gave on the crops (the output scale).

    Attributes:
        cells: the sampled cells ``(i, j)``, row by row.
        eligible: how many of the map's cells have their crop inside the image
            (and are kept, under a mask): the cells were sampled among them.
        map_size: ``(H', W')`` of the map.
        crop_size: ``(H, W)`` of each crop: the classifier's input size.
        against: what ran on the crops: ``"classifier 'name'"``, or
            ``"FCN 'name' at the classifier's input size"`` (``"... at its
            smallest input size"`` when the classifier's size is not known
            here: pass ``input_size``).
        comparison: the numbers, as `VerificationResult` gives them for a
            conversion (``input_shape`` is the batch of crops).
        top_class_agreement: the share of sampled cells whose top class is
            the crop's (1.0 for all of them).
        reason: why the cells differ, when they do ("" otherwise); at a reduced
            precision also when they pass but the classifier's window reaches
            into padding on its crop: its wider tolerance can hide that
            difference (a `same`-padded network), and the certificate says so.
        precision: what the map was computed at (``"float32"``,
            ``"bfloat16"``, ``"float16"``); the crops always run at float32
            and the tolerance is the precision's (`precision_tolerance`).
    """

    cells: tuple[tuple[int, int], ...]
    eligible: int
    map_size: tuple[int, int]
    crop_size: tuple[int, int]
    against: str
    comparison: VerificationResult
    top_class_agreement: float
    reason: str = ""
    precision: str = "float32"

    @property
    def max_abs_diff(self) -> float:
        return self.comparison.max_abs_diff

    @property
    def max_rel_diff(self) -> float:
        return self.comparison.max_rel_diff

    @property
    def tolerance(self) -> float:
        return self.comparison.tolerance

    @property
    def exact(self) -> bool:
        """Whether every sampled cell equals its crop's scores within the tolerance."""
        return self.comparison.passed

    @property
    def informative(self) -> bool:
        """False when the classifier's scores hardly vary across the sampled crops (an untrained or collapsed
        network, a saturated softmax): a map that ignored the image would pass too (`VerificationResult`)."""
        return self.comparison.informative

    def metadata(self) -> dict:
        """The figures as plain values (numbers, lists, strings), for npz and zarr metadata."""
        return {
            "cells": [list(cell) for cell in self.cells],
            "eligible": self.eligible,
            "crop_size": list(self.crop_size),
            "against": self.against,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "tolerance": self.tolerance,
            "output_scale": self.comparison.output_scale,
            "top_class_agreement": self.top_class_agreement,
            "exact": self.exact,
            "informative": self.informative,
            "reason": self.reason,
            "precision": self.precision,
        }

    def __str__(self) -> str:
        verdict = "exact" if self.exact else "DIFFERENT"
        if self.exact and self.reason:  # a reduced precision's tolerance covers a padding difference too
            verdict = f"exact at {self.precision}'s tolerance, which covers its difference and the padding's together"
        if self.exact and not self.informative:
            verdict += ", but uninformative: the classifier's scores hardly vary across these crops"
        if self.exact and self.reason:
            verdict += f". {self.reason}"
        computed = "" if self.precision == "float32" else f", computed at {self.precision}"
        size = f"{self.map_size[0]}x{self.map_size[1]}"
        return (
            f"{len(self.cells)} of {self.eligible} eligible cells (map {size}{computed}) "
            f"against {self.against} on their {self.crop_size[0]}x{self.crop_size[1]} crops: max abs diff "
            f"{self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g} (tolerance {self.tolerance:g}), "
            f"top class equal in {100 * self.top_class_agreement:.0f}%: {verdict}"
        )


class CertifiedMap(NamedTuple):
    """What `predict_map` returns with ``certify=N``: the map and its `MapCertificate`.

    ``scores, certificate = predict_map(fcn, image, certify=8)``.
    """

    scores: Any
    certificate: MapCertificate


class CropRun(NamedTuple):
    """What a certificate runs: the FCN whose map it is, the model run on crops, the crop size, its description."""

    fcn: Any
    runs_on: Any
    crop: tuple[int, int]
    against: str
    model: Any = None  # the model as given (named in errors); None: ``fcn``


@dataclass(frozen=True)
class CertificateOptions:
    """How many cells a certificate compares, drawn how, and what it holds them to (`crop_certificate`,
    `windowed_certificate`).

    Attributes:
        n: how many cells to compare (drawn as `sample_cells` draws them).
        seed: the seed of the sampling.
        tolerance: the relative tolerance; None: the wider of the model's
            (`surgery.verify.tolerance_for`) and the precision's.
        precision: what the map was computed at (``"float32"``,
            ``"bfloat16"``, ``"float16"``); the crops run at float32 and the
            default tolerance is the precision's (`precision_tolerance`).
    """

    n: int = DEFAULT_CELLS
    seed: int = 0
    tolerance: float | None = None
    precision: str = "float32"


def crop_certificate(
    runs: CropRun, image, score_map, options: CertificateOptions, *, preprocess=None, keep=None, output=None
):
    """The certificate of an FCN's map: ``options.n`` sampled cells against ``runs.runs_on`` on their crops.

    For a model with several outputs, ``score_map`` is the dict of its maps
    (`OutputMaps`), and the result a dict of `MapCertificate` by output name,
    or with ``output``, that output's certificate alone. Outputs on one grid
    share their cells and crops (the crops run once).
    """
    n, seed, tolerance, precision = options.n, options.seed, options.tolerance, options.precision
    fcn, runs_on, crop, against, model = runs
    model = fcn if model is None else model
    spec = outputs = fcn_spec(fcn)
    image = runner.with_channel_axis(image, spec)
    size = runner.image_size_of(image, spec)
    if outputs.several:
        if not isinstance(score_map, dict) or set(score_map) != set(outputs.names):
            given = sorted(score_map) if isinstance(score_map, dict) else type(score_map).__name__
            raise InputError(
                f"Model '{model.name}' has {len(outputs.names)} outputs ({', '.join(map(repr, outputs.names))}): "
                f"give the dict of their maps `predict_map` returns. Received: {given}"
            )
        names = list(outputs.names) if output is None else [choose_output(outputs.outputs, output)]
    elif output is not None:
        names = [choose_output(outputs.outputs, output)]
    else:
        names = [outputs.names[0]]
    tolerance = float(tolerance if tolerance is not None else max(tolerance_for(fcn), precision_tolerance(precision)))
    crops_run: dict = {}
    certificates = {}
    for name in names:
        index = outputs.names.index(name)
        plan = _plan_crops(fcn, size, crop, int(n), keep, seed, output=name if outputs.several else None)
        cell_map = score_map[name] if outputs.several else score_map
        classes = outputs.outputs[index].classes
        expected_shape = spec.layout.image_shape(plan.map_size[0], plan.map_size[1], classes)
        if tuple(getattr(cell_map, "shape", ())) != tuple(expected_shape):
            which = f" of output '{name}'" if outputs.several else ""
            raise InputError(
                f"The map{which} has shape {tuple(getattr(cell_map, 'shape', ()))}, but model '{model.name}' gives "
                f"{tuple(expected_shape)} on this {size[0]}x{size[1]} image: give the map computed on this image "
                "by this model."
            )
        if plan.origins not in crops_run:  # outputs on one grid: the same crops, run once for all
            crops_run[plan.origins] = _run_on_crops(runs_on, image, spec, plan.origins, crop, preprocess)
        expected = crops_run[plan.origins][index]
        actual = _cell_values(cell_map, plan.cells, spec.layout)
        certificates[name] = replace(_compare(plan, expected, actual, against, tolerance, spec), precision=precision)
    if outputs.several and output is None:
        return certificates
    return certificates[names[0]]


@dataclass(frozen=True)
class _CropPlan:
    """The sampled cells of a map and the crops they stand for (one plan serves every output of a model)."""

    grid: Geometry
    at_crop: Geometry
    map_size: tuple[int, int]
    crop: tuple[int, int]
    eligible: int
    cells: tuple[tuple[int, int], ...]
    origins: tuple[tuple[int, int], ...]


def _plan_crops(fcn, size, crop, n: int, keep, seed: int, output: str | None = None) -> _CropPlan:
    """Which cells to compare, among those whose crop lies inside the image, and where their crops start
    (of the map of ``output``, for a model with several)."""
    grid = geometry(fcn, output=output)
    if not grid.exact:
        raise UncertifiableMapError(
            f"Which crop a cell of this map stands for is unknown: {grid.unknown[0]}, so the map cannot be "
            "certified against the classifier."
        )
    map_size = grid.output_size(size)
    at_crop = _at_crop_size(grid, crop, fcn)
    # Where cell 0's crop starts on each axis: its one window must be the map's cell's window.
    starts = [offset - own for offset, own in zip(grid.at(size).offset, at_crop.offset)]
    rows, cols = (
        _eligible(start, stride, length, side, cells)
        for start, stride, length, side, cells in zip(starts, grid.stride, size, crop, map_size)
    )
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != tuple(map_size):
            raise InputError(f"`keep` has shape {keep.shape}; the map has {map_size[0]}x{map_size[1]} cells.")
        eligible = int(np.count_nonzero(keep[rows.start : rows.stop, cols.start : cols.stop]))
    else:
        eligible = len(rows) * len(cols)
    if eligible == 0:
        raise UncertifiableMapError(
            f"No cell of this {map_size[0]}x{map_size[1]} map has its {crop[0]}x{crop[1]} crop inside the "
            f"{size[0]}x{size[1]} image{' among the kept cells' if keep is not None else ''}: there is nothing to "
            "compare with the classifier. Certify on a larger image."
        )
    cells = tuple(sample_cells(rows, cols, n, seed=seed, keep=keep))
    origins = tuple((starts[0] + i * grid.stride[0], starts[1] + j * grid.stride[1]) for i, j in cells)
    return _CropPlan(grid, at_crop, tuple(map_size), tuple(crop), eligible, cells, origins)  # type: ignore[arg-type]


def _cell_values(score_map, cells, layout) -> np.ndarray:
    """``(n, K)`` float64 values of ``cells`` of a map laid out as ``layout`` (read one cell at a time: zarr)."""
    return np.stack(
        [
            np.asarray(score_map[layout.image_index(slice(i, i + 1), slice(j, j + 1))], dtype=np.float64).reshape(-1)
            for i, j in cells
        ]
    )


def _compare(plan: _CropPlan, expected, actual, against: str, tolerance: float, spec) -> MapCertificate:
    """The certificate of one output: its map's cells (``actual``) against the crops' scores (``expected``)."""
    certificate = _measured(
        plan.cells, plan.eligible, plan.map_size, plan.crop, against, (expected, actual), tolerance, spec
    )
    if not certificate.exact:
        return replace(certificate, reason=_why_inexact(plan.grid, plan.at_crop, plan.crop))
    if tolerance > RELATIVE_TOLERANCE["float32"] and _padding(plan.at_crop, plan.crop):
        # Exact at a reduced precision's tolerance, which a `same`-padded network's edge cells may pass only
        # because it is wide: say that they differ because of padding, as a float32 certificate would.
        return replace(certificate, reason=_why_inexact(plan.grid, plan.at_crop, plan.crop))
    return certificate


def _measured(cells, eligible, map_size, crop, against: str, scores, tolerance: float, spec) -> MapCertificate:
    """The certificate of ``cells``: ``scores``, the crops' ``(expected, actual)`` map cells, compared."""
    expected, actual = scores
    comparison = compare_arrays(
        [(expected, actual)],
        tolerance=tolerance,
        input_shape=spec.layout.batch_shape(len(cells), crop[0], crop[1], spec.channels),
    )
    comparison = replace(comparison, input_spread=batch_spread([expected], comparison.output_scale))
    both = np.all(np.isfinite(expected), axis=1) & np.all(np.isfinite(actual), axis=1)
    agree = np.argmax(expected[both], axis=1) == np.argmax(actual[both], axis=1)
    return MapCertificate(
        cells=tuple(cells),
        eligible=eligible,
        map_size=tuple(map_size),  # type: ignore[arg-type]
        crop_size=tuple(crop),  # type: ignore[arg-type]
        against=against,
        comparison=comparison,
        top_class_agreement=float(np.mean(agree)) if len(agree) else 0.0,
    )


def windowed_certificate(
    model, image, score_map, options: CertificateOptions, *, stride=None, plan=None, preprocess=None, keep=None
) -> MapCertificate:
    """The certificate of a classifier's windowed map (`inference.windowed`), without the warning.

    Cell ``(i, j)`` of such a map stands for the crop at ``(i * s_h, j *
    s_w)``: ``options.n`` cells, sampled as `certify_map` samples them, are
    compared with the classifier itself run on their crops. ``plan``: the
    map's `WindowedPlan` where the caller has it (a `Mapper`), else planned
    here at ``stride``.
    """
    n, seed, tolerance, precision = options.n, options.seed, options.tolerance, options.precision
    check_cell_count(n, "n")
    found = windowed.analysis(model)
    spec = ImageSpec(found.layout, found.channels)
    image = runner.with_channel_axis(image, spec)
    if plan is None:
        plan = windowed.plan_windows(model, runner.image_size_of(image, spec), stride=stride, keep=keep)
    rows, cols = range(plan.map_size[0]), range(plan.map_size[1])
    cells = sample_cells(rows, cols, int(n), seed=seed, keep=keep)
    origins = tuple((i * plan.stride[0], j * plan.stride[1]) for i, j in cells)
    expected = _run_on_crops(found.model, image, spec, origins, found.window, preprocess)[0]
    actual = _cell_values(score_map, cells, spec.layout)
    if tolerance is None:
        tolerance = max(tolerance_for(found.model), precision_tolerance(precision))
    against = f"classifier '{found.model.name}'"
    scores = (expected, actual)
    measured = _measured(cells, plan.windows, plan.map_size, found.window, against, scores, tolerance, spec)
    return replace(measured, precision=precision)


def check_cell_count(n, argument: str) -> None:
    """Refuse anything but a positive number of cells to certify, naming ``argument``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(
            f"Expected `{argument}` (cells to certify) to be a positive integer. Received: {argument}={n!r}"
        )


def warn_if_inexact(certificate, stacklevel: int = 2) -> None:
    """Warn `InexactMapWarning` when ``certificate`` shows cells different from their crops.

    ``certificate`` is a `MapCertificate`, or a dict of them by output name
    (one warning per inexact output). ``stacklevel`` counts from the caller of
    this function (2: its caller's caller).
    """
    if isinstance(certificate, dict):
        for name, each in certificate.items():
            _warn_if_inexact(each, stacklevel + 1, f" (output '{name}')")
        return
    _warn_if_inexact(certificate, stacklevel + 1, "")


def _warn_if_inexact(certificate: MapCertificate, stacklevel: int, which: str) -> None:
    if certificate.exact:
        return
    warnings.warn(
        f"The map{which}{'' if certificate.precision == 'float32' else f' (computed at {certificate.precision})'} "
        f"differs from the sliding window it replaces: on {len(certificate.cells)} sampled cells, "
        f"max abs diff {certificate.max_abs_diff:.3g}, max rel diff {certificate.max_rel_diff:.3g} (tolerance "
        f"{certificate.tolerance:g}) against {certificate.against} on their crops, top class equal in "
        f"{100 * certificate.top_class_agreement:.0f}%. {certificate.reason}",
        InexactMapWarning,
        stacklevel=stacklevel + 1,
    )


def sample_cells(rows: range, cols: range, n: int, *, seed: int = 0, keep=None) -> list[tuple[int, int]]:
    """Up to ``n`` distinct cells of ``rows x cols`` (and of ``keep``, a boolean map over all cells, when given).

    Deterministic for a ``seed`` and spread over the region: the cells
    nearest its four corners first, then one random cell from each of a grid
    of about ``n - 4`` blocks (in random order), then random cells. All
    eligible cells when there are no more than ``n``.

    Returns:
        The cells, sorted row by row.
    """
    rng = np.random.default_rng(seed)
    if keep is None:
        kept = None
        total = len(rows) * len(cols)
    else:
        kept = np.asarray(keep[rows.start : rows.stop, cols.start : cols.stop], dtype=bool)
        total = int(np.count_nonzero(kept))
    if total <= n:
        if kept is None:
            return [(i, j) for i in rows for j in cols]
        return sorted((rows.start + int(i), cols.start + int(j)) for i, j in np.argwhere(kept))
    chosen: dict[tuple[int, int], None] = {}

    def pick(row_block: range, col_block: range):
        """A random eligible cell of the block, relative to the region, or None."""
        if kept is None:
            return int(rng.integers(row_block.start, row_block.stop)), int(
                rng.integers(col_block.start, col_block.stop)
            )
        inside = np.argwhere(kept[row_block.start : row_block.stop, col_block.start : col_block.stop])
        if not len(inside):
            return None
        i, j = inside[int(rng.integers(len(inside)))]
        return row_block.start + int(i), col_block.start + int(j)

    height, width = len(rows), len(cols)
    for corner in ((0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)):
        chosen[_nearest(corner, kept)] = None
    blocks = max(n - len(chosen), 1)
    across = min(height, math.ceil(math.sqrt(blocks)))
    along = min(width, math.ceil(blocks / across))
    row_edges = np.linspace(0, height, across + 1).astype(int)
    col_edges = np.linspace(0, width, along + 1).astype(int)
    grid = [(r, c) for r in range(across) for c in range(along)]
    for index in rng.permutation(len(grid)):
        if len(chosen) >= n:
            break
        r, c = grid[index]
        cell = pick(range(row_edges[r], row_edges[r + 1]), range(col_edges[c], col_edges[c + 1]))
        if cell is not None:
            chosen.setdefault(cell, None)
    if len(chosen) < n:  # blocks that fell on the corners or were empty: random cells fill up
        population = height * width if kept is None else total
        for index in rng.choice(population, size=min(population, 2 * n + 8), replace=False):
            if len(chosen) >= n:
                break
            if kept is None:
                cell = divmod(int(index), width)
            else:
                i, j = np.argwhere(kept)[int(index)]
                cell = (int(i), int(j))
            chosen.setdefault(cell, None)
    cells = list(chosen)[:n]
    return sorted((rows.start + i, cols.start + j) for i, j in cells)


def _nearest(corner: tuple[int, int], kept) -> tuple[int, int]:
    """The eligible cell nearest ``corner`` (region coordinates): the corner itself without a mask."""
    if kept is None:
        return corner
    cells = np.argwhere(kept)
    distances = np.abs(cells - np.asarray(corner)).sum(axis=1)
    i, j = cells[int(np.argmin(distances))]
    return int(i), int(j)


def what_runs(model, input_size=None, *, source=None) -> CropRun:
    """What a certificate of ``model``'s map runs (`CropRun`), for a classifier or an FCN.

    ``source``: the classifier an FCN was converted from, when the caller
    holds it (a `Mapper`); default: the one `source_of` knows in this process.
    """
    if not is_fully_convolutional(model):
        size = original_size(model, input_size)
        if size is None:
            raise InputError(
                f"Model '{model.name}' takes images of any size, so the crops its cells stand for are unknown: "
                "pass `input_size=(H, W)`, the size the classifier was trained at."
            )
        return CropRun(as_fcn(model, input_size=input_size), model, size, f"classifier '{model.name}'", model)
    known = source_of(model)[0]
    source = known if source is None else source
    if source is not None:
        source = traced_model(source)  # a subclassed classifier: its functional twin (same layers), with outputs
    recorded = source_input_size(model)  # the size also from a saved FCN's file
    if recorded is None and source is not None:
        recorded = original_size(source)
    if input_size is not None:
        size = (int(input_size[0]), int(input_size[1]))
    elif recorded is not None:
        size = recorded
    else:
        size = geometry(model).min_input_size
        unknown = "the classifier's is not known here: pass `input_size=(H, W)`"
        return CropRun(model, model, size, f"FCN '{model.name}' at its smallest input size ({unknown})")
    if source is not None and original_size(source) in (None, size) and len(source.outputs) == len(model.outputs):
        return CropRun(model, source, size, f"classifier '{source.name}'")
    return CropRun(model, model, size, f"FCN '{model.name}' at the classifier's input size")


def _at_crop_size(grid: Geometry, crop, fcn) -> Geometry:
    """The geometry at the crop size, which must give one cell (the classifier's one window)."""
    try:
        at_crop = grid.at(crop)
        # An FCN à trous has more cells on a crop (its finer cells whose window fits in it): its source's one.
        origin = origin_of(fcn)
        cells = (geometry(origin[0]).at(crop) if origin is not None else at_crop).output_size(crop)
    except ConversionError as error:
        raise UncertifiableMapError(
            f"Model '{fcn.name}' cannot run on {crop[0]}x{crop[1]} crops ({error}); give the classifier's "
            "input size as `input_size=(H, W)`."
        ) from error
    if tuple(cells) != (1, 1):
        raise UncertifiableMapError(
            f"At the classifier's input size {crop[0]}x{crop[1]}, model '{fcn.name}' gives a {cells[0]}x{cells[1]} "
            "map, not one cell: its cells are not the classifier on crops (a head='dense' conversion keeps a "
            "cell per feature position), so there is no sliding window to certify it against."
        )
    return at_crop


def _eligible(start: int, stride: int, length: int, side: int, cells: int) -> range:
    """The cells ``i`` whose crop ``[start + i * stride, ... + side)`` lies inside ``[0, length)``."""
    first = max(0, -(start // stride))
    last = (length - side - start) // stride
    return range(first, max(first, min(last + 1, cells)))


def _run_on_crops(model, image, spec: ImageSpec, origins, crop, preprocess) -> list[np.ndarray]:
    """Per output of ``model``, ``(n, K)`` float64 scores on the crops at ``origins``, in batches of about a
    million pixels."""
    dtype = runner.input_dtype(model)
    per_batch = max(1, runner.PIXELS_PER_BATCH // (crop[0] * crop[1]))
    batches: list = []

    def load(first):
        crops = [
            runner.read_tile(
                image,
                spec,
                tiling.AxisTile(top, top + crop[0], 0, 0, 0),
                tiling.AxisTile(left, left + crop[1], 0, 0, 0),
                preprocess,
                dtype,
            )
            for top, left in origins[first : first + per_batch]
        ]
        return np.stack(crops)

    def write(first, outputs):
        count = len(origins[first : first + per_batch])
        batches.append([np.asarray(output, dtype=np.float64).reshape(count, -1) for output in runner.as_maps(outputs)])

    forward = engines.forward(model, engines.native())
    runner.run_batches(forward, range(0, len(origins), per_batch), load, write, prefetch=True)
    return [np.concatenate(per_output) for per_output in zip(*batches)]


def _padding(at_crop: Geometry, crop) -> list[tuple[int, int]]:
    """How far the classifier's window reaches past its crop into padding, ``(before, after)`` pixels per axis;
    empty when it stays inside (a `valid`-padded network)."""
    overhang = [
        (max(0, -offset), max(0, offset + field - side))
        for offset, field, side in zip(at_crop.offset, at_crop.receptive_field, crop)
    ]
    return overhang if any(before or after for before, after in overhang) else []


def _why_inexact(grid: Geometry, at_crop: Geometry, crop) -> str:
    """Why cells of this network differ from the classifier on their crops."""
    if grid.global_context:
        return (
            "The network pools over the whole image (a global pooling inside, such as squeeze-and-excitation), "
            "so each cell depends on every pixel of the image, while the classifier sees only its crop."
        )
    overhang = _padding(at_crop, crop)
    if overhang:
        (top, bottom), (left, right) = overhang
        return (
            f"On its {crop[0]}x{crop[1]} crop the classifier's window reaches past the crop into padding "
            f"(top {top}, bottom {bottom}, left {left}, right {right} pixels: `same` padding or explicit "
            "padding), where it sees zeros but a map cell sees the neighbouring image pixels. That is how a "
            "`same`-padding network's map differs from its sliding window; the map is still exact as the "
            "FCN's (tiled or not). A `valid`-padding network has no such difference."
        )
    return (
        "Neither padding nor global context explains it: check that `preprocess` treats each pixel on its own "
        "and that the map was computed on this image by this model (in full precision); otherwise please "
        "report the model."
    )
