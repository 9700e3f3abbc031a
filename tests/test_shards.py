"""Region shards: any number of regions gives the local map's bytes; an interrupted region is redone alone."""

import os
from dataclasses import replace

import numpy as np
import pytest
from conftest import strided_fcn
from models import small_flatten_cnn
from PIL import Image
from test_batch_inputs import slide_picture
from test_segment import pooled_net
from test_windowed import se_classifier

import keras_fcn_surgery as kfs
from keras_fcn_surgery.batch import shards as shards_module
from keras_fcn_surgery.batch.shards import RegionView, cut_regions, work_folder
from keras_fcn_surgery.batch.sources import Source
from keras_fcn_surgery.inference.predict import plan_prediction

pytest.importorskip("zarr")
pytest.importorskip("skimage")

FORMATS = "npz,geojson,csv,zarr,ome-zarr"
# (regions, the order they run in): on Ray regions finish in any order, so a region that writes outside its
# rows must not be hidden by the next region overwriting them (in order) -- hence reversed and shuffled runs.
RUNS = ((1, "forward"), (2, "reversed"), (3, "shuffled"), (7, "forward"), (7, "reversed"))


def run_order(count: int, order: str) -> list[int]:
    """The region indices in the order a run computes them: forward, reversed or a fixed shuffle."""
    if order == "forward":
        return list(range(count))
    if order == "reversed":
        return list(range(count))[::-1]
    shuffled = [int(i) for i in np.random.default_rng(5).permutation(count)]
    assert shuffled not in (run_order(count, "forward"), run_order(count, "reversed")), shuffled
    return shuffled


def _in_order(monkeypatch, order: str):
    """Make the local sharded run compute its pending regions in ``order``."""
    real = shards_module.plan_input

    def reordered(*args):
        plan = real(*args)
        if not isinstance(plan, shards_module.InputPlan):
            return plan
        by_index = {r.index: r for r in plan.pending}
        wanted = [by_index[i] for i in run_order(len(plan.regions), order) if i in by_index]
        return replace(plan, pending=tuple(wanted))

    monkeypatch.setattr(shards_module, "plan_input", reordered)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 200 x 300 image with a tissue patch, and a mask of the patch."""
    folder = tmp_path_factory.mktemp("shards")
    pixels = slide_picture(size=(200, 300), patch=(slice(40, 150), slice(60, 250)))
    Image.fromarray(pixels).save(folder / "img.png")
    Image.fromarray(((pixels.mean(-1) < 220) * 255).astype(np.uint8)).save(folder / "mask.png")
    return folder


def _files(folder):
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = path
    return found


def _assert_same_outputs(got, expected):
    """Every output file the same bytes (an npz: its arrays' bytes); the zarr store's chunks may differ (its chunk
    rows are the shards'), its arrays and attributes may not."""
    import zarr

    files, reference = _files(got), _files(expected)
    plain = {name for name in reference if not name.startswith("img.zarr")}
    assert plain <= set(files) and not [n for n in files if n.startswith(".")], sorted(files)
    differences = []
    for name in sorted(plain):
        if name.endswith(".npz"):  # the zip records each entry's time of writing: its arrays' bytes, then
            a, b = np.load(files[name]), np.load(reference[name])
            assert a.files == b.files
            differences += [
                (name, key, a[key], b[key])
                for key in b.files
                if a[key].dtype != b[key].dtype or a[key].tobytes() != b[key].tobytes()
            ]
            continue
        with open(files[name], "rb") as a, open(reference[name], "rb") as b:
            written, expected_bytes = a.read(), b.read()
            if written != expected_bytes:
                differences.append((name, _first_difference(written, expected_bytes)))
    assert not differences, differences
    a, b = zarr.open_group(os.path.join(got, "img.zarr"), mode="r"), zarr.open_group(os.path.join(expected, "img.zarr"))
    assert dict(a.attrs) == dict(b.attrs)
    for name, array in b.arrays():
        assert np.array_equal(a[name][:], array[:], equal_nan=True), name


def _first_difference(got: bytes, want: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"at {at}: {got[max(0, at - 200) : at + 60]!r} against {want[max(0, at - 200) : at + 60]!r}"


def _run(model, picture, out, **options):
    options.setdefault("certify", 0)
    summary = kfs.predict_images(model, [str(picture / "img.png")], out, formats=FORMATS, execution="tf", **options)
    assert summary.ok, summary.failed
    return summary


@pytest.mark.parametrize(
    "case",
    ["classifier", "classifier-masked", "staged-masked", "segmenter-masked", "windowed-masked"],
    ids=lambda case: case,
)
def test_sharded_outputs_are_the_bytes_of_the_local_outputs(picture, tmp_path, monkeypatch, case):
    options = {"mask": str(picture / "mask.png")} if case.endswith("masked") else {}
    classifier = small_flatten_cnn(input_size=(32, 32), classes=3)  # held: certificates run it (a weak record)
    if case.startswith("classifier"):
        model, rows = kfs.convert(classifier), 4
        options["certify"] = 4 if case.endswith("masked") else 0  # certified from the completed store
        options["tile"] = 64  # (without a mask or tiles, an image this small is one pass, in one region)
    elif case.startswith("staged"):
        model, rows = strided_fcn("same", (2, 2, 2), channels=3, head=3), 2
        options["tile"] = 48
        assert plan_prediction(model, (200, 300), tile=48).staged  # each region runs a staged plan
    elif case.startswith("windowed"):  # a classifier without an exact FCN: its windowed map
        model, rows = se_classifier(), 1
        options.update(stride=8, tile=96)
    else:
        model, rows = kfs.segmenter(pooled_net(), num_classes=3, keep_classes=[0, 1, 2]), 16
    _run(model, picture, tmp_path / "local", **options)
    real, regions = shards_module.run_region, []
    monkeypatch.setattr(shards_module, "run_region", lambda *a: (regions.append(a[-1]), real(*a))[1])
    for count, order in RUNS:
        out = tmp_path / f"shards{count}-{order}"
        regions.clear()
        _in_order(monkeypatch, order)
        _run(model, picture, out, shards=count, shard_rows=rows, **options)
        _assert_same_outputs(out, tmp_path / "local")
        # cut as often as asked, every region computed once, in the order asked
        assert [r.index for r in regions] == run_order(count, order), (count, order)


def test_regions_are_bands_of_whole_chunk_rows_balanced_by_kept_cells():
    kept = np.zeros((40, 10), dtype=bool)
    kept[10:30] = True
    regions = cut_regions(kept, (40, 10), 2, chunk_rows=4)
    assert [(r.start, r.stop, r.cells) for r in regions] == [(0, 20, 100), (20, 40, 100)]
    assert [(r.start, r.stop) for r in cut_regions(None, (10, 3), 7, chunk_rows=4)] == [(0, 4), (4, 8), (8, 10)]
    assert len(cut_regions(np.zeros((8, 8), bool), (8, 8), 3, chunk_rows=2)) == 1  # nothing kept: one region
    kept[:] = False
    kept[:8] = True  # the rows after the last kept one join the last region
    assert [(r.start, r.stop) for r in cut_regions(kept, (40, 10), 3, chunk_rows=4)] == [(0, 4), (4, 40)]


def test_a_region_writes_only_its_rows():
    array = np.zeros((10, 4, 2), np.float32)
    view = RegionView(array, 4, 8)
    view[0:10] = np.nan  # the NaN fill of a masked pass: only the region's rows
    view[2:6, 1:3] = np.ones((4, 2, 2))  # a tile across the region's top edge
    assert np.isnan(array[4:8]).sum() == 4 * 4 * 2 - 2 * 2 * 2 and not np.isnan(array[:4]).any()
    assert (array[4:6, 1:3] == 1).all() and (array[2:4] == 0).all() and not np.isnan(array[8:]).any()


def test_an_interrupted_region_is_redone_alone_and_outputs_wait_for_every_region(picture, tmp_path, monkeypatch):
    model = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    options = {"mask": str(picture / "mask.png"), "shards": 3, "shard_rows": 4}
    _run(model, picture, tmp_path / "local", mask=options["mask"])
    real, computed, failures = shards_module.run_region, [], []

    def failing_second(fcn, source, out_dir, batch_options, region):
        if region.index == 1 and not failures:
            failures.append(region.index)
            computed.append("failed")
            raise RuntimeError("worker lost")
        computed.append(region.index)
        return real(fcn, source, out_dir, batch_options, region)

    monkeypatch.setattr(shards_module, "run_region", failing_second)
    out = tmp_path / "sharded"
    first = kfs.predict_images(
        model, [str(picture / "img.png")], out, formats=FORMATS, execution="tf", certify=0, **options
    )
    assert first.count("failed") == 1 and "worker lost" in first.failed[0].message
    assert computed == [0, "failed"]
    work = work_folder(str(out), Source(str(picture / "img.png"), "img"))
    assert sorted(os.listdir(out)) == [os.path.basename(work)]  # no output before every region is done
    assert sorted(os.listdir(os.path.join(work, "done"))) == ["0.json"]
    computed.clear()
    _run(model, picture, out, **options)
    assert computed == [1, 2]  # region 0 is not computed again
    _assert_same_outputs(out, tmp_path / "local")
    computed.clear()
    assert _run(model, picture, out, **options).count("skipped") == 1 and not computed


def test_another_model_starts_the_regions_again(picture, tmp_path, monkeypatch):
    model = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    other = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))  # the same shapes, other weights
    out = tmp_path / "sharded"
    calls = []
    real = shards_module.run_region

    def stop_after_first(fcn, source, out_dir, batch_options, region):
        if region.index == 1:
            raise KeyboardInterrupt
        calls.append(region.index)
        return real(fcn, source, out_dir, batch_options, region)

    monkeypatch.setattr(shards_module, "run_region", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        _run(model, picture, out, shards=2, shard_rows=4, tile=64)
    monkeypatch.setattr(shards_module, "run_region", lambda *a: (calls.append(a[-1].index), real(*a)))
    _run(other, picture, out, shards=2, shard_rows=4, tile=64)
    assert calls == [0, 0, 1]  # the first model's region 0 is not taken for the other's
    _run(other, picture, tmp_path / "local", tile=64)
    _assert_same_outputs(out, tmp_path / "local")


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_shard_counts_are_refused(picture, tmp_path, value):
    model = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    with pytest.raises(kfs.InputError, match="shards"):
        kfs.predict_images(model, [str(picture / "img.png")], tmp_path / "out", shards=value)
    with pytest.raises(kfs.InputError, match="shard_rows"):
        kfs.predict_images(model, [str(picture / "img.png")], tmp_path / "out", shards=2, shard_rows=value)
    assert not (tmp_path / "out").exists()


def _peak_bytes(function):
    import tracemalloc

    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_masks_over_large_maps_take_a_few_bytes_per_cell():
    from keras_fcn_surgery.batch.masks import cell_mask
    from keras_fcn_surgery.grid import tiling
    from keras_fcn_surgery.grid.geometry import WindowGrid

    side = 3000  # 9 M cells: the integral image of the old tile test alone took 72 MB
    mask = np.zeros((side, side), dtype=bool)
    mask[1000:1200, 500:2500] = True
    edges = [tiling.AxisTile(a, min(a + 100, side), 0, min(100, side - a), a) for a in range(0, side, 100)]
    rows = cols = edges
    touched = tiling.tiles_touching(mask, rows, cols)
    assert touched.sum() == 2 * 20 and touched[10:12, 5:25].all()
    assert _peak_bytes(lambda: tiling.tiles_touching(mask, rows, cols)) < side * 40  # a few bytes per column
    picture = np.zeros((30, 30), dtype=bool)
    picture[10:12] = True
    kept = cell_mask(picture, (side, side), WindowGrid.per_pixel(), (side, side))
    assert kept[1000:1200].all() and kept.sum() == 200 * side
    # the kept cells (1 byte each) and a band of look-ups, not four int64 temporaries per cell
    assert _peak_bytes(lambda: cell_mask(picture, (side, side), WindowGrid.per_pixel(), (side, side))) < side * side * 6


def test_a_masked_plan_of_one_stage_needs_no_mask_of_the_image(monkeypatch):
    from keras_fcn_surgery.inference import staged

    model = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    calls = []
    real = staged._cells_read
    monkeypatch.setattr(staged, "_cells_read", lambda *a: (calls.append(a[1]), real(*a))[1])
    size = (400, 300)
    keep = np.zeros(kfs.geometry(model).output_size(size), dtype=bool)
    keep[5:9, 3:7] = True
    plan = plan_prediction(model, size, tile=128, keep=keep, staged=False)
    assert len(plan.stages) == 1 and calls == []  # an image-sized mask (8 bytes a pixel) was built and dropped


def test_the_cells_a_stage_reads_take_a_few_bytes_per_cell():
    from keras_fcn_surgery.grid import tiling

    side = 3000  # a stage map of a large slide, in miniature
    edges = [tiling.AxisTile(a, min(a + 120, side), 0, 100, a) for a in range(0, side, 100)]
    selected = np.zeros((len(edges), len(edges)), dtype=bool)
    selected[3:5, 7:9] = True
    read = tiling.pixels_read((side, side), edges, edges, selected)
    assert read.sum() == 220 * 220 and read[300:520, 700:920].all()
    assert _peak_bytes(lambda: tiling.pixels_read((side, side), edges, edges, selected)) < side * side * 6


def test_region_counts_follow_the_workers_and_the_memory_budget():
    from keras_fcn_surgery.batch.shards import region_count

    assert region_count((1000, 500), None, 10, workers=1) == (2, 125)  # two a worker, four chunk rows each
    assert region_count((1000, 500), None, 10, workers=3)[0] == 6
    # 1000 x 500 cells x 1000 classes x 4 bytes = 2000 MB: 30 regions of at most 64 MiB each
    assert region_count((1000, 500), None, 1000, workers=2) == (30, 16)
    assert region_count((1000, 500), None, 1000, workers=2, budget=1000 * 500 * 1000)[0] == 4
    kept = np.zeros((1000, 500), bool)
    kept[:10] = True  # few kept cells: the workers decide
    assert region_count((1000, 500), kept, 1000, workers=2)[0] == 4


def test_a_large_input_is_cut_into_regions_without_shards_and_resumed(picture, tmp_path, monkeypatch):
    """Issue 39: locally, an input above a size (here: any, the size lowered) is computed by regions without
    `shards`, each at the execution fixed once for the input ("auto" resolved before any region, not in each);
    an interrupted run resumes the regions not done, and the outputs are the bytes of a run in one piece."""
    from keras_fcn_surgery.batch import run as batch_run
    from keras_fcn_surgery.inference import engines

    model = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    options = {"mask": str(picture / "mask.png")}
    local = tmp_path / "local"
    assert kfs.predict_images(model, [str(picture / "img.png")], local, formats=FORMATS, certify=0, **options).ok
    # a small picture stands for a large one (raising=False: main has none of these, and must fail below)
    monkeypatch.setattr(batch_run, "LOCAL_REGION_PIXELS", 1, raising=False)
    monkeypatch.setattr(shards_module, "REGIONS_PER_WORKER", 4, raising=False)
    monkeypatch.setattr(shards_module, "MIN_CHUNK_ROWS", 4, raising=False)
    real, real_choose = shards_module.run_region, engines.choose_engine
    computed, asked, state = [], [], {"in_region": False, "stop_at": 3}

    def choose(model, shape, engine="auto", precision=None):
        if state["in_region"]:
            asked.append(engine)
        return real_choose(model, shape, engine, precision)

    def counting(fcn, source, out_dir, batch_options, region):
        if len(computed) == state["stop_at"]:
            raise KeyboardInterrupt
        computed.append(region.index)
        state["in_region"] = True
        try:
            return real(fcn, source, out_dir, batch_options, region)
        finally:
            state["in_region"] = False

    monkeypatch.setattr(engines, "choose_engine", choose)
    monkeypatch.setattr(shards_module, "run_region", counting)
    out = tmp_path / "regions"
    with pytest.raises(KeyboardInterrupt):
        kfs.predict_images(model, [str(picture / "img.png")], out, formats=FORMATS, certify=0, **options)
    work = work_folder(str(out), Source(str(picture / "img.png"), "img"))
    regions = len(shards_module._read_json(os.path.join(work, "plan.json"))["regions"])
    assert regions == 4 and computed == [0, 1, 2]  # interrupted after most regions
    assert sorted(shards_module.region_records(work)) == [0, 1, 2]
    computed.clear()
    state["stop_at"] = None
    assert kfs.predict_images(model, [str(picture / "img.png")], out, formats=FORMATS, certify=0, **options).ok
    assert computed == [3]  # regions 0 to 2 are not computed again
    _assert_same_outputs(out, tmp_path / "local")
    assert asked and "auto" not in asked  # every region ran the execution fixed for the input


@pytest.mark.parametrize(("chosen", "fixed"), [("xla", "xla"), ("tf+blas", "blas"), ("tf+xla", "tf")])
def test_auto_is_fixed_once_per_input_as_its_whole_plan_would_run(picture, tmp_path, monkeypatch, chosen, fixed):
    """The execution every region of an input runs: what `auto` chooses for the whole input's plan, as one name
    ("blas": the native execution with the BLAS head), or the native one where one name cannot say it; recorded in
    the plan, so that a resumed run keeps it."""
    from keras_fcn_surgery.batch.job import BatchOptions, prepare_mapper
    from keras_fcn_surgery.inference import engines
    from keras_fcn_surgery.inference.mapper import MapMethod

    model = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    options = BatchOptions(formats=("npz",), tile=64, execution="auto", shard_rows=4)
    mapper = prepare_mapper(model, options, MapMethod())
    monkeypatch.setattr(engines, "with_engine", lambda plan, *a, **k: replace(plan, engine=chosen))
    source = Source(str(picture / "img.png"), "img")
    plan = shards_module.plan_input(mapper, source, str(tmp_path), options, 2)
    assert plan.options.execution == fixed and plan.options.tile == 64
    assert shards_module._read_json(os.path.join(plan.work, "plan.json"))["execution"] == fixed
    monkeypatch.setattr(engines, "with_engine", lambda plan, *a, **k: replace(plan, engine="jax"))
    assert shards_module.plan_input(mapper, source, str(tmp_path), options, 2).options.execution == fixed  # kept
