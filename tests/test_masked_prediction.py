"""A keep-mask stages sparsely: each stage runs only the tiles the kept cells need, and kept cells stay exact."""

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers

import keras_fcn_surgery as kfs
from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.cost import pass_cost
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.inference import runner
from keras_fcn_surgery.layout import ImageSpec, Layout


def assert_kept_cells_exact(model, image, whole, keep, data_format) -> None:
    """The masked map (tile 64) equals the whole map on the kept cells and is NaN elsewhere."""
    masked = kfs.predict_map(model, image, tile=64, keep=keep)
    channel_axis = -1 if data_format == "channels_last" else 0
    kept_cells = np.moveaxis(masked, channel_axis, -1)
    expected = np.moveaxis(whole, channel_axis, -1)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(kept_cells[keep], expected[keep], atol=1e-5 * scale, rtol=0)
    assert np.isnan(kept_cells[~keep]).all()


def _vgg_like(data_format="channels_last", head=4, head_filters=8):
    """Two conv-conv-pool blocks, then a ``head`` x ``head`` valid conv (a converted fc6) and a 1x1 classifier:
    stageable."""
    shape = (None, None, 3) if data_format == "channels_last" else (3, None, None)
    inputs = keras.Input(shape)
    x = inputs
    for filters in (4, 6):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", data_format=data_format)(x)
        x = layers.MaxPooling2D(2, data_format=data_format)(x)
    x = layers.Conv2D(head_filters, head, activation="relu", data_format=data_format)(x)
    return keras.Model(inputs, layers.Conv2D(5, 1, data_format=data_format)(x), name="vgg_like")


def _disc(map_size, fraction):
    rows, cols = np.mgrid[: map_size[0], : map_size[1]]
    centre = (0.4 * map_size[0], 0.55 * map_size[1])
    radius = np.sqrt(fraction * map_size[0] * map_size[1] / np.pi)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_kept_cells_equal_the_unmasked_map_and_the_rest_is_nan(data_format):
    model = _vgg_like(data_format)
    size = (200, 232)
    image = random_images((*size, 3) if data_format == "channels_last" else (3, *size))
    whole = np.asarray(model(image[None], training=False))[0]
    map_size = kfs.geometry(model).output_size(size)
    keep = _disc(map_size, 0.3)
    assert_kept_cells_exact(model, image, whole, keep, data_format)


def test_the_plan_follows_the_kept_area_and_runs_only_the_planned_tiles(monkeypatch):
    model = _vgg_like()
    size = (384, 416)
    map_size = kfs.geometry(model).output_size(size)
    keep = _disc(map_size, 0.3)
    dense = kfs.plan_prediction(model, size, tile=96)
    sparse = kfs.plan_prediction(model, size, tile=96, keep=keep)
    assert dense.staged and sparse.staged
    assert sparse.kept_fraction == pytest.approx(keep.mean())
    assert "kept" in str(sparse)
    # Tiles and work follow the tissue: well under the unmasked pass, at most what tiles the kept cells need.
    assert sparse.macs < 0.8 * dense.macs  # 0.73 here: at this small size, tiles round the disc up
    assert all(s.tiles <= d.tiles or s.tile != d.tile for s, d in zip(sparse.stages, dense.stages))
    # Tiles are cropped to the cells they must write: some run shorter than the stage's tile.
    cropped = [
        (rows.stop - rows.start, cols.stop - cols.start) != tuple(stage.tile)
        for stage, run in zip(sparse.stages, sparse._runs)
        for rows, cols in run.tiles
    ]
    assert any(cropped)
    calls = []
    real = runner.run_tiles

    def counting(forward, source, job, *args, **kwargs):
        calls.append(None if job.tiles is None else len(job.tiles))
        return real(forward, source, job, *args, **kwargs)

    monkeypatch.setattr(runner, "run_tiles", counting)
    kfs.predict_map(model, random_images((*size, 3)), tile=96, keep=keep)
    assert calls == [stage.tiles for stage in sparse.stages]


def test_an_empty_mask_computes_nothing_and_a_full_one_everything():
    model = _vgg_like()
    size = (200, 232)
    map_size = kfs.geometry(model).output_size(size)
    empty = kfs.plan_prediction(model, size, tile=64, keep=np.zeros(map_size, bool))
    assert empty.macs == 0 and all(stage.tiles == 0 for stage in empty.stages)
    assert np.isnan(kfs.predict_map(model, random_images((*size, 3)), tile=64, keep=np.zeros(map_size, bool))).all()
    full = kfs.plan_prediction(model, size, tile=64, keep=np.ones(map_size, bool))
    plain = kfs.plan_prediction(model, size, tile=64)
    assert full.macs == plain.macs > 0  # a mask keeping every cell computes what no mask does, no more, no less
    assert [stage.tiles for stage in full.stages] == [stage.tiles for stage in plain.stages]


def test_a_mask_of_the_wrong_shape_is_refused():
    model = _vgg_like()
    with pytest.raises(kfs.InputError, match=r"`keep` has shape \(3, 3\).*cells"):
        kfs.predict_map(model, random_images((64, 64, 3)), tile=32, keep=np.ones((3, 3), bool))


def test_tiles_touching_and_pixels_read_are_rectangle_sums():
    rows = tiling.plan_axis(40, 16, 4, 4, 1, 1)
    cols = tiling.plan_axis(48, 16, 4, 4, 1, 1)
    mask = np.zeros((rows[-1].out_stop, cols[-1].out_stop), bool)
    mask[2, 7] = True
    touching = tiling.tiles_touching(mask, rows, cols)
    expected = np.array([[r.out_start <= 2 < r.out_stop and c.out_start <= 7 < c.out_stop for c in cols] for r in rows])
    np.testing.assert_array_equal(touching, expected)
    assert touching.sum() == 1
    read = tiling.pixels_read((40, 48), rows, cols, touching)
    (i,), (j,) = np.nonzero(touching)
    box = np.zeros((40, 48), bool)
    box[rows[i].start : rows[i].stop, cols[j].start : cols[j].stop] = True
    np.testing.assert_array_equal(read, box)


def test_crop_tile_drops_whole_strides_outside_the_margins():
    tile = tiling.plan_axis(200, 64, 4, 14, 2, 2)[1]
    assert tile == tiling.AxisTile(40, 104, 2, 12, 12)  # cells 10..23 of the map, keeps 12..21
    cropped = tiling.crop_tile(tile, 14, 17, 19, 4, 2, 2)
    assert cropped == tiling.AxisTile(60, 92, 2, 4, 17)  # 5 strides off the start, 3 off the end
    assert tiling.crop_tile(tile, 14, 17, 19, 4, 2, 2, quantum=4) == tiling.AxisTile(56, 104, 3, 5, 17)
    with pytest.raises(ValueError, match="not kept"):
        tiling.crop_tile(tile, 14, 10, 12, 4, 2, 2)


def _masks(map_size):
    """Masks whose plans take the new shapes: holes, thin strips, one cell, cells on the map's edges."""
    rows, cols = np.mgrid[: map_size[0], : map_size[1]]
    disc = _disc(map_size, 0.5)
    holes = disc & ~_disc(map_size, 0.08) & ((rows // 3 + cols // 3) % 4 != 0)
    strips = np.zeros(map_size, bool)
    strips[map_size[0] // 3] = True  # one row of cells across the whole map
    strips[:, map_size[1] // 2 : map_size[1] // 2 + 2] = True  # a strip two cells wide, edge to edge
    one = np.zeros(map_size, bool)
    one[map_size[0] // 2, map_size[1] // 3] = True
    edges = (rows < 2) | (cols >= map_size[1] - 1) | ((rows >= map_size[0] - 3) & (cols < 4))
    return {"holes": holes, "strips": strips, "one cell": one, "edges": edges}


@pytest.mark.parametrize(
    ("name", "data_format"),
    [
        ("holes", "channels_last"),
        ("strips", "channels_last"),
        ("one cell", "channels_last"),
        ("edges", "channels_last"),
        ("holes", "channels_first"),
        ("edges", "channels_first"),
    ],
)
def test_masked_plans_of_their_own_keep_every_kept_cell_exact(name, data_format):
    # Issue 39: cuts chosen for the mask, crops by single cells and tiles split along the mask's edges.
    model = _vgg_like(data_format, head=7)
    size = (232, 248)
    image = random_images((*size, 3) if data_format == "channels_last" else (3, *size))
    whole = np.asarray(model(image[None], training=False))[0]
    map_size = kfs.geometry(model).output_size(size)
    keep = _masks(map_size)[name]
    plan = kfs.plan_prediction(model, size, tile=64, keep=keep)
    assert plan.macs > 0 and plan.kept_fraction == pytest.approx(keep.mean())
    assert_kept_cells_exact(model, image, whole, keep, data_format)


def test_a_masked_plan_computes_little_more_per_kept_cell_than_the_whole_pass():
    # Issue 39, counted: with the unmasked plan's cuts and quarter-tile crops a 30% disc cost 1.60x the
    # staged whole pass per kept cell here; with cuts of its own and single-cell crops 1.23x.
    model = _vgg_like(head=7)
    size = (384, 416)
    keep = _disc(kfs.geometry(model).output_size(size), 0.3)
    dense = kfs.plan_prediction(model, size, tile=96)
    sparse = kfs.plan_prediction(model, size, tile=96, keep=keep)
    assert sparse.macs / keep.mean() / dense.macs < 1.4
    # what the plan reports is what its tiles compute
    macs = sum(
        pass_cost(run.model, run.spec.layout.batch_shape(1, r.stop - r.start, c.stop - c.start, run.spec.channels)).macs
        for run in sparse._runs
        for r, c in run.tiles
    )
    assert macs == sparse.macs


@pytest.mark.parametrize(
    ("timings", "instead"),
    [({}, "tf"), ({"tf": 1.7, "xla": 1.0, "blas": 1.13}, "blas")],
    ids=["nothing else timed", "blas timed"],
)
def test_auto_keeps_a_masked_stage_of_many_tile_shapes_off_xla(monkeypatch, timings, instead):
    # XLA compiles every call shape (0.5-1 s a shape for a VGG16 stage here): a masked stage of many shapes runs
    # the fastest other execution its probe timed, else the backend's own. A masked VGG16 head at 4096^2 ran
    # traced ("tf") at 30 ms a GMAC, three times "blas" (numpy products of any shape), which its probe had timed at
    # 1.13x XLA's time against "tf"'s 1.7x.
    from keras_fcn_surgery.inference import engines, staged

    model = _vgg_like(head=7)
    size = (384, 416)
    keep = _masks(kfs.geometry(model).output_size(size))["holes"]
    plan = kfs.plan_prediction(model, size, tile=96, keep=keep)
    calls = staged.stage_calls(plan)
    assert any(shapes > engines.COMPILED_SHAPES for _, _, shapes in calls)
    measured = engines.EngineChoice("xla", "fastest measured", timings)
    monkeypatch.setattr(engines, "choose_engine", lambda *args, **kwargs: measured)
    chosen = engines.with_engine(plan, model, "auto", calls=calls)
    for stage, (_, _, shapes) in zip(chosen.stages, calls):
        assert stage.engine == (instead if shapes > engines.COMPILED_SHAPES else "xla")
    assert "call shapes" in chosen.engine_reason and "the fastest other" in chosen.engine_reason
    asked = engines.with_engine(plan, model, "xla", calls=calls)  # asked for: as asked
    assert {stage.engine for stage in asked.stages} == {"xla"}
    failed = {"tf": 1.7, "xla": 1.0, "blas": float("inf")}  # a candidate that failed its probe is not one
    assert engines.without_compiling(engines.EngineChoice("xla", "", failed), 9).engine == "tf"


def test_a_slide_too_large_for_masks_at_every_cut_keeps_the_unmasked_cuts(monkeypatch):
    # Finding the needed cells at every candidate cut takes 4 bytes a cell: past a size, the unmasked plan's cuts.
    from keras_fcn_surgery.inference import staged

    model = _vgg_like(head=7)
    size = (384, 416)
    keep = _disc(kfs.geometry(model).output_size(size), 0.3)
    dense = kfs.plan_prediction(model, size, tile=96)
    own = kfs.plan_prediction(model, size, tile=96, keep=keep)
    monkeypatch.setattr(staged, "_MAX_MASK_CELLS", 100)
    kept = kfs.plan_prediction(model, size, tile=96, keep=keep)
    assert [s.stop for s in own.stages] != [s.stop for s in dense.stages]  # its own cuts, where allowed
    assert [s.stop for s in kept.stages] == [s.stop for s in dense.stages]
    assert dense.macs * keep.mean() < kept.macs < dense.macs


def test_a_second_masked_plan_of_a_model_infers_no_shape_and_runs_no_geometry_again(monkeypatch):
    """Planning a masked slide asks a stage's tile arithmetic and geometry thousands of times (seconds for VGG16
    at 4096²): what one plan learned serves the next (the next slide of a job, another mask), kept on the model."""
    from keras_fcn_surgery.grid import geometry as geometry_module
    from keras_fcn_surgery.inference import staged

    model = _vgg_like(head=7)
    size = (384, 416)
    map_size = kfs.geometry(model).output_size(size)
    first = kfs.plan_prediction(model, size, tile=96, keep=_disc(map_size, 0.3))
    asked = {"shapes": 0, "geometry": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            asked[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(staged, "layer_costs", counted("shapes", staged.layer_costs))
    monkeypatch.setattr(geometry_module, "_run_steps", counted("geometry", geometry_module._run_steps))
    again = kfs.plan_prediction(model, size, tile=96, keep=_disc(map_size, 0.3))
    assert asked == {"shapes": 0, "geometry": 0}
    assert str(again) == str(first) and again.macs == first.macs


def _counting_cells(monkeypatch, products: list) -> None:
    """`blas.split_forward`, its ``cells`` counting the cells of each product into ``products``."""
    from keras_fcn_surgery.inference import blas, engines

    made = blas.split_forward

    def spied(model, forward_fn):
        forward = made(model, forward_fn)
        cells = getattr(forward, "cells", None)
        if cells is not None:

            def counted(windows):
                products.append(len(windows))
                return cells(windows)

            counted.window = cells.window  # type: ignore[attr-defined]
            forward.cells = counted
        return forward

    monkeypatch.setattr(engines, "split_forward", spied)


def test_a_masked_blas_head_computes_its_kept_cells_only(monkeypatch):
    # The last stage of a masked plan starting at the head convolution: under "blas" its kept cells alone go through
    # matrix products (as tiles, the cells at a tissue's edge came in thin strips, each product streaming the head's
    # whole kernel: 30% slower a multiply-accumulate for VGG16 at 4096²). The map stays exact.
    model = _vgg_like(head=5, head_filters=taxonomy.LARGE_KERNEL_FILTERS)
    size = (384, 416)
    image = random_images((*size, 3))
    whole = np.asarray(model(image[None], training=False))[0]
    keep = _masks(kfs.geometry(model).output_size(size))["holes"]
    assert kfs.plan_prediction(model, size, tile=96, keep=keep).stages[-1].start != "input"
    products: list = []
    _counting_cells(monkeypatch, products)
    masked = kfs.predict_map(model, image, tile=96, keep=keep, engine="blas")
    assert sum(products) == keep.sum()
    np.testing.assert_allclose(masked[keep], whole[keep], atol=1e-5 * np.abs(whole).max(), rtol=0)
    assert np.isnan(masked[~keep]).all()


def test_the_kept_cells_of_many_head_tiles_go_through_few_products(monkeypatch):
    from keras_fcn_surgery.inference import engines

    inputs = keras.Input((None, None, 6))
    x = layers.Conv2D(taxonomy.LARGE_KERNEL_FILTERS, 5, activation="relu")(inputs)
    head = keras.Model(inputs, layers.Conv2D(3, 1, activation="softmax")(x), name="head")
    features = np.random.default_rng(1).normal(size=(60, 68, 6)).astype("float32")
    whole = np.asarray(head(features[None]))[0]
    keep = _masks(whole.shape[:2])["holes"]
    spec = ImageSpec(Layout("channels_last"), 6)
    axis_plans = runner.plan_tiles(features.shape[:2], kfs.geometry(head), (14, 14))
    tiles = [(r, c) for r in axis_plans[0] for c in axis_plans[1]]
    touched = int(tiling.tiles_touching(keep, *axis_plans).sum())
    products: list = []
    _counting_cells(monkeypatch, products)
    monkeypatch.setattr(runner, "_CELL_WINDOW_ELEMENTS", 5 * 5 * 6 * 200)  # a product past 200 cells' windows
    out = np.zeros(whole.shape, "float32")
    job = runner.TileJob(spec, axis_plans, 1, tiles=tiles, keep=keep)
    runner.run_tiles(
        engines.forward(head, "blas"),
        features,
        job,
        out,
        preprocess=None,
        dtype="float32",
        bar=runner.NoBar(),
        prefetch=False,
    )
    assert sum(products) == keep.sum() and 1 < len(products) < touched / 2 and max(products) <= 200
    np.testing.assert_allclose(out[keep], whole[keep], atol=1e-5, rtol=0)
    assert np.isnan(out[~keep]).all()
