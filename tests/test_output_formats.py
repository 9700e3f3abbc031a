"""The output-format registry (`batch.formats`): every format the CLI offers is a registered class with one
lifecycle (allocate, write, publish), an input that fails leaves nothing, and no batch module reaches into
another's private helpers."""

import ast
import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from keras_fcn_surgery.batch import formats, outputs
from keras_fcn_surgery.batch.job import BatchOptions
from keras_fcn_surgery.batch.writers import MapInfo
from keras_fcn_surgery.options import OUTPUT_FORMATS

zarr = pytest.importorskip("zarr")
pytest.importorskip("skimage")

ALL_BUT_DICOM = tuple(name for name in OUTPUT_FORMATS if name != "dicom")  # a DICOM map needs a DICOM slide
PACKAGE = pathlib.Path(formats.__file__).resolve().parents[1]
INFO = MapInfo(
    source="slide.tif",
    level=0,
    downsample=(1.0, 1.0),
    level_size=(40, 56),
    stride=(4, 4),
    offset=(0, 0),
    receptive_field=(8, 8),
    computed_fraction=1.0,
)


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory):
    """A DICOM slide (the input a DICOM map needs), 40 x 56 pixels at level 0."""
    pytest.importorskip("highdicom")
    from test_batch_inputs import slide_picture, write_pyramid
    from test_dicom_inputs import dicomize

    folder = tmp_path_factory.mktemp("dicom")
    write_pyramid(str(folder / "slide.tif"), slide_picture(size=(40, 56), patch=(slice(5, 30), slice(5, 40))), mpp=0.5)
    dicomize(str(folder / "slide.tif"), folder / "slide-dcm")
    return str(folder / "slide-dcm")


def source_for(name, request):
    """The input each format can describe: any for most, a DICOM slide for dicom."""
    return request.getfixturevalue("dicom_slide") if name == "dicom" else "slide.tif"


def test_every_format_the_cli_offers_is_a_registered_class():
    from keras_fcn_surgery import cli

    assert tuple(formats.FORMATS) == OUTPUT_FORMATS == outputs.FORMATS
    assert outputs.check_formats(",".join(OUTPUT_FORMATS)) == OUTPUT_FORMATS
    for name, kind in formats.FORMATS.items():
        assert issubclass(kind, formats.OutputFormat) and kind.name == name
        assert outputs.SUFFIXES[name] == kind.suffix
        # One lifecycle: every format writes; allocating and adopting a store are optional and consistent.
        assert kind.write is not formats.OutputFormat.write, name
        assert kind.adopts_store == (kind.adopt is not formats.OutputFormat.adopt), name
    assert len(set(outputs.SUFFIXES.values())) == len(OUTPUT_FORMATS)
    assert set(formats.ONE_MAP_FORMATS) == {"ome-zarr", "geojson", "csv", "dicom"}
    predict = cli.build_parser()._subparsers._group_actions[0].choices["predict"]
    (option,) = [action for action in predict._actions if "--format" in action.option_strings]
    assert ", ".join(OUTPUT_FORMATS) in option.help


def one_map(shape=(10, 14, 3), seed=0):
    """Class probabilities (a softmax of random logits), a few cells not computed (NaN)."""
    logits = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    scores[:2, :3] = np.nan
    return scores.astype(np.float32)


@pytest.mark.parametrize("name", OUTPUT_FORMATS)
def test_each_format_allocates_writes_and_is_published_only_at_the_end(tmp_path, name, request):
    expected = one_map()
    paths = outputs.output_paths(tmp_path, "slide", [name])
    chosen = formats.formats_for(BatchOptions(formats=(name,)))
    source = source_for(name, request)
    shapes = formats.MapShapes({"scores": expected.shape}, several=False, shown="scores", source=source)
    with formats.staged(paths, chosen, overwrite=False) as staged:
        maps = staged.allocate(shapes)
        assert list(maps) == ["scores"] and maps["scores"].shape == expected.shape
        assert np.isnan(np.asarray(maps["scores"][:])).all()
        maps["scores"][:] = expected  # the pass
        info = dataclasses.replace(INFO, source=source)
        staged.write(formats.FilledMaps(maps, False, "scores", info, class_names=("a", "b", "c")))
        assert not os.path.exists(paths[name])  # written, not yet published
        (work,) = [p for p in os.listdir(tmp_path) if p.startswith(".partial")]
    assert os.listdir(tmp_path) == [os.path.basename(paths[name])]
    path = paths[name]
    if name == "npz":
        np.testing.assert_array_equal(np.load(path)["scores"], expected)
    elif name == "zarr":
        np.testing.assert_array_equal(zarr.open_group(path, mode="r")["scores"][:], expected)
    elif name == "ome-zarr":
        np.testing.assert_array_equal(zarr.open_group(path, mode="r")["0"][:], np.moveaxis(expected, -1, 0))
    elif name == "geojson":
        features = json.loads(pathlib.Path(path).read_text())["features"]
        assert sum(f["properties"]["measurements"]["cells"] for f in features) == (~np.isnan(expected[..., 0])).sum()
    elif name == "dicom":
        import highdicom
        import pydicom

        from keras_fcn_surgery.batch.dicom import PARAMETRIC_MAP, SEGMENTATION, total_pixel_matrix

        written = pydicom.dcmread(os.path.join(path, PARAMETRIC_MAP))
        np.testing.assert_array_equal(total_pixel_matrix(written), expected)
        segmentation = highdicom.seg.segread(os.path.join(path, SEGMENTATION))
        top = np.where(np.isnan(expected).any(axis=-1), 0, np.nan_to_num(expected).argmax(axis=-1) + 1)
        assert set(np.unique(top)) == {0, 1, 2, 3}
        np.testing.assert_array_equal(segmentation.get_total_pixel_matrix(combine_segments=True), top)
    else:
        rows = pathlib.Path(path).read_text().splitlines()
        assert len(rows) == 1 + (~np.isnan(expected[..., 0])).sum()


def test_zarr_allocates_every_output_and_ome_zarr_only_what_is_left():
    shapes = formats.MapShapes({"a": (4, 5, 2), "b": (4, 5, 3)}, several=True, shown="b")
    assert formats.OmeZarrFormat().allocate("unused", shapes, taken=("a", "b")) == {}
    assert formats.NpzFormat().allocate("unused", shapes, taken=()) == {}


@pytest.mark.parametrize("name", OUTPUT_FORMATS)
def test_a_format_for_a_failing_input_leaves_nothing_behind(tmp_path, name, request):
    paths = outputs.output_paths(tmp_path / "out", "slide", [name])
    chosen = formats.formats_for(BatchOptions(formats=(name,)))
    source = source_for(name, request)
    shapes = formats.MapShapes({"scores": (10, 14, 3)}, several=False, shown="scores", source=source)
    with pytest.raises(RuntimeError, match="the pass failed"):
        with formats.staged(paths, chosen, overwrite=False) as staged:
            maps = staged.allocate(shapes)
            maps["scores"][:5] = one_map()[:5]
            raise RuntimeError("the pass failed")
    assert os.listdir(tmp_path / "out") == []


def test_a_failing_write_leaves_no_other_format_behind(tmp_path, monkeypatch):
    # The CSV writer fails after the npz, zarr and OME-Zarr were written: none of them is published.
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(formats.writers, "write_csv", broken)
    paths = outputs.output_paths(tmp_path, "slide", ALL_BUT_DICOM)
    chosen = formats.formats_for(BatchOptions(formats=ALL_BUT_DICOM))
    shapes = formats.MapShapes({"scores": (10, 14, 3)}, several=False, shown="scores")
    with pytest.raises(OSError, match="disk full"):
        with formats.staged(paths, chosen, overwrite=False) as staged:
            maps = staged.allocate(shapes)
            maps["scores"][:] = one_map()
            staged.write(formats.FilledMaps(maps, False, "scores", INFO))
    assert os.listdir(tmp_path) == []


def test_a_failing_input_of_a_batch_leaves_no_output_of_any_format(tmp_path, monkeypatch):
    from models import small_flatten_cnn
    from PIL import Image
    from test_batch_inputs import slide_picture

    import keras_fcn_surgery as kfs
    from keras_fcn_surgery.batch import job
    from keras_fcn_surgery.batch.sources import Source

    Image.fromarray(slide_picture(size=(60, 80), patch=(slice(10, 40), slice(10, 50)))).save(tmp_path / "picture.png")
    real = job._compute

    def failing(fcn, view, layout, grid, size, kept, scores, options):
        real(fcn, view, layout, grid, size, kept, scores, options)  # every allocated map written, then:
        raise RuntimeError("the network failed")

    monkeypatch.setattr(job, "_compute", failing)
    fcn = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))
    source = Source(str(tmp_path / "picture.png"), "picture")
    result = job.predict_source(kfs.prepare(fcn), source, str(tmp_path / "out"), BatchOptions(formats=ALL_BUT_DICOM))
    assert result.status == "failed" and "the network failed" in result.message
    assert os.listdir(tmp_path / "out") == []


# Helpers of the compute side that `shards` still shares with `job` (being rebuilt on the `mapper` branch).
_SHARED_COMPUTE = {("shards", "job", "_compute"), ("shards", "job", "_segment")}


def private_imports(module_path: pathlib.Path):
    """``(module, imported module, name)`` for every private name one package module takes from another."""
    tree = ast.parse(module_path.read_text())
    aliases = {}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keras_fcn_surgery"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.add((module_path.stem, node.module.rsplit(".", 1)[-1], alias.name))
                else:
                    aliases[alias.asname or alias.name] = alias.name
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keras_fcn_surgery."):
                    aliases[alias.asname or alias.name.rsplit(".", 1)[-1]] = alias.name.rsplit(".", 1)[-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_"):
            if node.value.id in aliases and not node.attr.startswith("__"):
                found.add((module_path.stem, aliases[node.value.id], node.attr))
    return found


def test_no_batch_module_imports_another_modules_private_helpers():
    found = set()
    for path in sorted((PACKAGE / "batch").glob("*.py")):
        found |= private_imports(path)
    assert found - _SHARED_COMPUTE == set()


def test_npz_deflates_only_what_shrinks_and_reads_back_exactly(tmp_path):
    """Computed float32 scores barely deflate (0.8-0.95 of their size) at some 20 s per GB, a sizeable share of
    a slide's pass: they are stored as they are. A masked map's NaN cells deflate to almost nothing: deflated.
    Either way `np.load` gives back every value, and the same map gives the same bytes."""
    import zipfile

    from keras_fcn_surgery.batch.writers import write_npz

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, (64, 64, 100)).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    masked = scores.copy()
    masked[:, 20:] = np.nan
    for name, cell_map, deflated in (("scores", scores, False), ("masked", masked, True)):
        path = tmp_path / f"{name}.npz"
        write_npz(str(path), cell_map, INFO)
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo("scores.npy")
        assert (member.compress_type == zipfile.ZIP_DEFLATED) is deflated, name
        assert (member.compress_size < 0.5 * member.file_size) is deflated, name
        with np.load(path) as stored:
            np.testing.assert_array_equal(stored["scores"], cell_map)
            assert tuple(stored["stride"]) == INFO.stride and str(stored["source"]) == INFO.source
        again = tmp_path / f"{name}-again.npz"
        write_npz(str(again), cell_map, INFO)
        assert again.read_bytes() == path.read_bytes()
