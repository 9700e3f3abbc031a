"""`predict --format ome-zarr`: NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3) images that validate, open in ome-zarr's
reader, put each cell at its window's centre on the slide, and carry a pyramid and labels that agree with the
scores."""

import json
import os
import warnings

import numpy as np
import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.batch.run import predict_images

zarr = pytest.importorskip("zarr")
pytest.importorskip("tifffile")
pytest.importorskip("skimage")
models_v05 = pytest.importorskip("ome_zarr_models.v05")
models_v04 = pytest.importorskip("ome_zarr_models.v04")
pytest.importorskip("ome_zarr")

from test_batch_inputs import slide_picture, write_pyramid  # noqa: E402

CLASSES = ("stroma", "tumour", "glass")
MPP = 0.25
VERSIONS = ("0.4", "0.5")


def ome(group):
    """A group's NGFF attributes: under ``ome`` (0.5), or the attributes themselves (0.4)."""
    attributes = group.attrs.asdict()
    return attributes["ome"] if "ome" in attributes else attributes


def validate(group, version):
    """Validate the image and its labels against NGFF ``version``'s schemas; the labels' properties by value."""
    assert group.metadata.zarr_format == {"0.4": 2, "0.5": 3}[version]
    if version == "0.5":
        image = models_v05.Image.from_zarr(group)  # NGFF 0.5 schemas, arrays and labels checked
        assert image.labels.label_paths == ["classes"]
        label = image.labels.get_image_labels_group("classes")
        properties = label.attributes.ome.image_label.properties
    else:
        from ome_zarr_models.v04.image_label import ImageLabel

        image = models_v04.Image.from_zarr(group)  # NGFF 0.4 schemas and arrays checked
        assert image.labels.attributes.labels == ["classes"]
        label = ImageLabel.from_zarr(group["labels/classes"])
        properties = label.attributes.image_label.properties
        assert all(m["version"] == "0.4" for m in group.attrs["multiscales"])
    return {p.label_value: p.model_dump(by_alias=True) for p in properties}


@pytest.fixture(scope="module")
def classifier():
    import keras

    keras.utils.set_random_seed(11)
    return small_flatten_cnn(input_size=(32, 32), classes=len(CLASSES))


@pytest.fixture(scope="module")
def fcn(classifier):
    return kfs.convert(classifier)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    path = str(folder / "slide.tif")
    write_pyramid(path, slide_picture(size=(400, 600), patch=(slice(40, 260), slice(60, 420))), mpp=MPP)
    return path


@pytest.fixture(scope="module", params=VERSIONS)
def written(classifier, slide, tmp_path_factory, request):
    """``predict`` on the slide with a tissue mask: the OME-Zarr (of each NGFF version), the npz of the same run
    and the version."""
    folder = tmp_path_factory.mktemp("maps")
    model_file = str(folder / "classifier.keras")
    classifier.save(model_file)
    names = folder / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    out = folder / "out"
    arguments = ["predict", model_file, slide, "--out", str(out), "--format", "ome-zarr,npz", "--mask", "auto"]
    arguments += ["--class-names", str(names), "--tile", "128", "--ome-zarr-version", request.param]
    assert cli.main(arguments) == 0
    return out / "slide.ome.zarr", np.load(out / "slide.npz"), request.param


def levels_of(group):
    """The arrays of a multiscale group's levels, in the metadata's order, with their scale and translation."""
    found = []
    for dataset in ome(group)["multiscales"][0]["datasets"]:
        transforms = {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}
        found.append((group[dataset["path"]][:], np.array(transforms["scale"]), np.array(transforms["translation"])))
    return found


def nan_mean_of_blocks(array, side):
    """Means of ``side x side`` blocks of the last two axes (sizes rounded down), NaN left out."""
    *lead, height, width = array.shape
    height, width = height // side * side, width // side * side
    blocks = array[..., :height, :width].reshape(*lead, height // side, side, width // side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        return np.nanmean(blocks, axis=(-3, -1))


def test_predict_writes_ome_zarr_that_validates_and_opens_in_ome_zarr(written):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path, npz, version = written
    group = zarr.open_group(str(path), mode="r")
    properties = validate(group, version)
    assert [properties[k + 1]["class"] for k in range(3)] == list(CLASSES)
    assert ome(group)["multiscales"][0]["axes"][1:] == [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    assert group.attrs["keras_fcn_surgery"]["map"]["stride"] == list(npz["stride"])

    nodes = list(Reader(parse_url(str(path)))())
    scores_node = nodes[0]
    assert scores_node.metadata["channel_names"] == list(CLASSES)
    level0 = np.asarray(scores_node.data[0])
    np.testing.assert_array_equal(level0, np.moveaxis(npz["scores"], -1, 0))  # NaN outside the tissue in both
    assert np.isnan(level0).any() and not np.isnan(level0).all()
    (labels_node,) = [node for node in nodes if node.zarr.parts()[-2:] == ["labels", "classes"]]
    np.testing.assert_array_equal(np.asarray(labels_node.data[0]), group["labels/classes/0"][:])


def test_labels_are_the_top_class_of_the_scores_at_every_level(written):
    path, _, _ = written
    group = zarr.open_group(str(path), mode="r")
    scores = levels_of(group)
    labels = levels_of(group["labels/classes"])
    assert len(scores) == len(labels) >= 3
    for (level_scores, scale, translation), (level_labels, label_scale, label_translation) in zip(scores, labels):
        np.testing.assert_array_equal(scale, label_scale)
        np.testing.assert_array_equal(translation, label_translation)
        computed = ~np.isnan(level_scores).any(axis=0)
        expected = np.where(computed, np.nan_to_num(level_scores).argmax(axis=0) + 1, 0)
        assert level_labels.shape == (1, *level_scores.shape[1:])
        np.testing.assert_array_equal(level_labels[0], expected)
        assert computed.any() and not computed.all()


def test_each_pyramid_level_is_a_downsampling_of_level_zero(written):
    path, _, _ = written
    scores = [level for level, _, _ in levels_of(zarr.open_group(str(path), mode="r"))]
    for level in range(1, len(scores)):
        assert scores[level].shape[1:] == tuple(d // 2 for d in scores[level - 1].shape[1:])
        np.testing.assert_allclose(scores[level], nan_mean_of_blocks(scores[level - 1], 2), rtol=1e-6, atol=0)
    # Where every cell of level 0 was computed, level 2 is the plain mean of 4 x 4 cells of level 0.
    whole = nan_mean_of_blocks(scores[0], 4)
    full = ~np.isnan(scores[0]).any(axis=0)[: whole.shape[1] * 4, : whole.shape[2] * 4]
    full = full.reshape(whole.shape[1], 4, whole.shape[2], 4).all(axis=(1, 3))
    assert full.sum() > 10
    np.testing.assert_allclose(scores[2][:, full], whole[:, full], rtol=1e-6, atol=0)


def window_centre(fcn, level_size, downsample, row, col):
    """The centre of cell ``(row, col)``'s window in level-0 pixels, pixel centres at integers (NGFF's convention)."""
    top, left, bottom, right = kfs.geometry(fcn).at(level_size).input_box(row, col)
    # The window covers level-0 pixels [top * d, bottom * d): the mean of their centres.
    return np.array([(top + bottom) * downsample / 2 - 0.5, (left + right) * downsample / 2 - 0.5])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", ["tiff level 1, micrometres", "png, pixels"])
def test_a_cells_coordinate_is_its_windows_centre_on_the_slide(fcn, slide, tmp_path, case, version):
    if case.startswith("png"):
        source = str(tmp_path / "picture.png")
        Image.fromarray(slide_picture(size=(300, 340))).save(source)
        level, downsample, unit = 0, 1, 1.0
    else:
        source, level, downsample, unit = slide, 1, 2, MPP
    out = tmp_path / "out"
    summary = predict_images(fcn, [source], out, formats="ome-zarr", level=level, tile=96, ome_zarr_version=version)
    assert summary.ok, summary.failed
    group = zarr.open_group(str(out / (os.path.splitext(os.path.basename(source))[0] + ".ome.zarr")), mode="r")
    validate(group, version)
    level_size = tuple(group.attrs["keras_fcn_surgery"]["map"]["level_size"])
    assert group.attrs["keras_fcn_surgery"]["map"]["downsample"] == [downsample, downsample]
    levels = levels_of(group)
    assert len(levels) >= 2
    for pyramid_level, (row, col) in ((0, (5, 9)), (len(levels) - 1, (3, 7))):
        array, scale, translation = levels[pyramid_level]
        assert row < array.shape[1] and col < array.shape[2]
        physical = scale[1:] * [row, col] + translation[1:]  # NGFF: scale, then translation
        # A cell of pyramid level k covers 2**k x 2**k cells of level 0: its centre is the mean of theirs.
        factor = 2**pyramid_level
        first = window_centre(fcn, level_size, downsample, row * factor, col * factor)
        last = window_centre(fcn, level_size, downsample, row * factor + factor - 1, col * factor + factor - 1)
        np.testing.assert_allclose(physical, (first + last) / 2 * unit, rtol=1e-12, atol=1e-9)
    axes = ome(group)["multiscales"][0]["axes"]
    assert ("unit" in axes[1]) == (unit != 1.0)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_segmenters_labels_are_its_per_pixel_classes(tmp_path, version):
    from test_segment import pooled_net

    from keras_fcn_surgery.segmentation.predict import segment_image

    model = kfs.segmenter(pooled_net(), num_classes=3, keep_classes=[0, 1, 2])
    pixels = np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    out = tmp_path / "out"
    assert predict_images(model, [str(tmp_path / "image.png")], out, formats="ome-zarr", ome_zarr_version=version).ok
    group = zarr.open_group(str(out / "image.ome.zarr"), mode="r")
    validate(group, version)
    expected = segment_image(model, pixels.astype(np.float32))
    (scores, scale, translation), *_ = levels_of(group)
    scale_ = float(np.abs(expected).max())
    np.testing.assert_allclose(np.moveaxis(scores, 0, -1), expected, rtol=0, atol=1e-5 * scale_)
    np.testing.assert_array_equal(group["labels/classes/0"][0], scores.argmax(axis=0) + 1)
    # One cell per pixel: pixel (i, j) sits at (i, j), NGFF's pixel centres.
    np.testing.assert_array_equal(scale, [1, 1, 1])
    np.testing.assert_array_equal(translation, [0, 0, 0])


def test_ome_zarr_beside_zarr_holds_the_same_map(fcn, slide, tmp_path):
    assert predict_images(fcn, [slide], tmp_path, formats="zarr,ome-zarr", level=1, class_names=CLASSES).ok
    plain = zarr.open_group(str(tmp_path / "slide.zarr"), mode="r")["scores"][:]
    ome_group = zarr.open_group(str(tmp_path / "slide.ome.zarr"), mode="r")
    np.testing.assert_array_equal(ome_group["0"][:], np.moveaxis(plain, -1, 0))
    assert [c["label"] for c in ome(ome_group)["omero"]["channels"]] == list(CLASSES)


def test_the_default_is_ngff_0_4_on_zarr_v2_as_bio_formats_reads_it(fcn, slide, tmp_path):
    assert predict_images(fcn, [slide], tmp_path, formats="ome-zarr", level=1).ok
    store = tmp_path / "slide.ome.zarr"
    assert not list(store.rglob("zarr.json"))  # Zarr v2 only: .zgroup, .zattrs, .zarray
    assert (store / ".zattrs").is_file() and (store / "labels" / "classes" / ".zattrs").is_file()
    for array in ("0", "labels/classes/0"):
        metadata = json.loads((store / array / ".zarray").read_text())
        assert metadata["dimension_separator"] == "/" and metadata["compressor"]["id"] == "blosc"
    validate(zarr.open_group(str(store), mode="r"), "0.4")


def test_an_unknown_ome_zarr_version_is_refused_before_any_input(fcn, slide, tmp_path, capsys):
    with pytest.raises(kfs.errors.InputError, match=r"one of \('0.4', '0.5'\).*--ome-zarr-version"):
        predict_images(fcn, [slide], tmp_path / "out", formats="ome-zarr", ome_zarr_version="0.6")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as stop:
        cli.main(["predict", "model.keras", slide, "--out", str(tmp_path), "--ome-zarr-version", "0.3"])
    assert stop.value.code == 2 and "--ome-zarr-version" in capsys.readouterr().err


@pytest.mark.parametrize("version", VERSIONS)
def test_finishing_a_map_larger_than_the_memory_it_uses_streams_it_block_by_block(tmp_path, version):
    import tracemalloc

    from keras_fcn_surgery.batch.ome_zarr import finish
    from keras_fcn_surgery.batch.writers import MapInfo

    shape = (1024, 1536, 4)  # 24 MiB of float32, in a zarr array read block by block
    source = zarr.open_array(str(tmp_path / "map.zarr"), mode="w", shape=shape, chunks=(128, 128, 4), dtype="f4")
    rng = np.random.default_rng(0)
    for first in range(0, shape[0], 128):
        source[first : first + 128] = rng.random((128, shape[1], shape[2]), dtype=np.float32)
    info = MapInfo("slide.tif", 0, (1.0, 1.0), (4096, 6144), (4, 4), (0, 0), (32, 32), 1.0)
    tracemalloc.start()
    try:
        finish(str(tmp_path / "map.ome.zarr"), source, info, mpp=0.5, version=version)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak < 12, f"finishing a 24 MiB map allocated {peak:.1f} MiB at its peak"
    group = zarr.open_group(str(tmp_path / "map.ome.zarr"), mode="r")
    validate(group, version)
    np.testing.assert_array_equal(group["0"][:, 500:700, 900:1100], np.moveaxis(source[500:700, 900:1100], -1, 0))


def test_channels_last_view_reads_and_writes_slices(tmp_path):
    from keras_fcn_surgery.batch.ome_zarr import create_scores

    view = create_scores(str(tmp_path / "map.ome.zarr"), (5, 7, 3))
    assert view.shape == (5, 7, 3) and np.isnan(np.asarray(view)).all()
    block = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    view[1:3, 2:6, :] = block
    np.testing.assert_array_equal(view[1:3, 2:6], block)
    np.testing.assert_array_equal(view.array[:, 1:3, 2:6], np.moveaxis(block, -1, 0))
    view[:] = 0.5
    assert (np.asarray(view) == 0.5).all()
    with pytest.raises(TypeError, match="slices"):
        view[0, 1]
