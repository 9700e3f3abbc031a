"""DICOM whole-slide images (a folder of instances, or one of them) read through OpenSlide 4, and OME-TIFF's
pixel size from its OME-XML: the same maps and the same ``--mpp`` levels as the TIFF they came from."""

import os
import shutil

import numpy as np
import pytest
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.batch.readers import choose_level, open_reader
from keras_fcn_surgery.batch.run import predict_images
from keras_fcn_surgery.batch.sources import find_sources
from keras_fcn_surgery.errors import ModelFileError

tifffile = pytest.importorskip("tifffile")
openslide = pytest.importorskip("openslide")
pytest.importorskip("skimage")

from test_batch_inputs import slide_picture, write_pyramid  # noqa: E402

MPP = 0.5


def dicomize(tiff: str, folder) -> list[str]:
    """The TIFF as DICOM WSI instances (VL Whole Slide Microscopy, one per level, uncompressed) in ``folder``."""
    pytest.importorskip("wsidicomizer")
    from wsidicom.codec import NumpySettings
    from wsidicomizer import WsiDicomizer

    os.makedirs(folder, exist_ok=True)
    files = WsiDicomizer.convert(
        tiff,
        str(folder),
        tile_size=64,
        encoding=NumpySettings(),
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
        workers=1,
    )
    return sorted(str(f) for f in files)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A pyramidal TIFF (3 levels, 0.5 microns per pixel), its DICOM folder and the pixels of level 0."""
    folder = tmp_path_factory.mktemp("dicom")
    pixels = slide_picture(size=(300, 420), patch=(slice(30, 250), slice(40, 380)))
    tiff = str(folder / "slide.tif")
    write_pyramid(tiff, pixels, mpp=MPP)
    instances = dicomize(tiff, folder / "scan" / "slide-dcm")
    return tiff, str(folder / "scan" / "slide-dcm"), instances, pixels


@pytest.fixture(scope="module")
def fcn():
    import keras

    keras.utils.set_random_seed(3)
    return kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=3))


def test_a_folder_of_instances_is_one_input_named_after_the_folder(slides, tmp_path):
    tiff, folder, instances, _ = slides
    assert len(instances) == 3  # one instance per pyramid level
    assert [(s.path, s.name) for s in find_sources([folder])] == [(folder, "slide-dcm")]
    scan = os.path.dirname(folder)
    assert [(s.path, s.name) for s in find_sources([scan])] == [(folder, "slide-dcm")]
    # Instances are often named by UID, with no suffix: they are found by DICOM's marker.
    unnamed = tmp_path / "archive" / "case 7"
    unnamed.mkdir(parents=True)
    for number, instance in enumerate(instances):
        shutil.copy(instance, unnamed / f"1.2.826.0.{number}")
    (unnamed / "notes.txt").write_text("not an image")
    assert [(s.path, s.name) for s in find_sources([str(tmp_path / "archive")])] == [(str(unnamed), "case 7")]
    with open_reader(str(unnamed)) as reader:
        assert [lv.size for lv in reader.levels] == [(300, 420), (150, 210), (75, 105)]


def test_dicom_levels_regions_and_resolution_equal_the_tiffs(slides):
    tiff, folder, instances, pixels = slides
    with open_reader(tiff) as expected:
        for path in (folder, instances[-1]):
            with open_reader(path) as reader:
                assert [lv.size for lv in reader.levels] == [lv.size for lv in expected.levels]
                assert [lv.downsample for lv in reader.levels] == [lv.downsample for lv in expected.levels]
                assert reader.mpp == pytest.approx(expected.mpp) and reader.mpp == pytest.approx(MPP)
                for level in range(3):
                    region = reader.read_region(level, 13, 21, 40, 50)[..., :3]  # OpenSlide gives RGBA
                    np.testing.assert_array_equal(region, expected.read_region(level, 13, 21, 40, 50))
                for mpp in (0.4, 0.9, 1.1, 2.5):
                    assert choose_level(reader, mpp=mpp) == choose_level(expected, mpp=mpp)
                assert choose_level(reader, mpp=1.0) == 1


@pytest.mark.parametrize("which", ["folder", "one instance"])
def test_a_dicom_slide_gives_the_map_of_the_tiff_it_came_from(slides, fcn, tmp_path, which):
    tiff, folder, instances, _ = slides
    source = folder if which == "folder" else instances[0]
    name = "slide-dcm" if which == "folder" else os.path.splitext(os.path.basename(source))[0]
    for mpp in (None, 1.0):
        out = tmp_path / f"mpp {mpp}"
        summary = predict_images(fcn, [tiff, source], out, mpp=mpp, tile=96, formats="npz")
        assert summary.ok, summary.failed
        from_tiff, from_dicom = np.load(out / "slide.npz"), np.load(out / f"{name}.npz")
        np.testing.assert_array_equal(from_dicom["scores"], from_tiff["scores"])
        assert int(from_dicom["level"]) == int(from_tiff["level"]) == (1 if mpp else 0)
        np.testing.assert_array_equal(from_dicom["downsample"], from_tiff["downsample"])


def test_predict_command_reads_a_dicom_folder(slides, fcn, tmp_path, capsys):
    _, folder, _, pixels = slides
    model_file = str(tmp_path / "fcn.keras")
    fcn.save(model_file)
    out = tmp_path / "maps"
    assert cli.main(["predict", model_file, folder, "--out", str(out), "--mpp", "0.5"]) == 0
    with np.load(out / "slide-dcm.npz") as written:
        expected = kfs.predict_map(fcn, pixels.astype(np.float32))
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(written["scores"], expected, rtol=0, atol=1e-5 * scale)
        assert str(written["source"]) == folder


def test_a_folder_without_a_readable_dicom_slide_is_named(tmp_path):
    folder = tmp_path / "not a slide"
    folder.mkdir()
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    assert [s.path for s in find_sources([str(folder)])] == [str(folder)]
    with pytest.raises(ModelFileError, match="not a slide.*OpenSlide 4 reads DICOM WSI"):
        open_reader(str(folder))


@pytest.mark.parametrize(("size", "unit", "microns"), [(0.25, "µm", 0.25), (500.0, "nm", 0.5), (0.5, None, 0.5)])
def test_ome_tiff_pixel_size_comes_from_its_ome_xml(tmp_path, size, unit, microns):
    image = slide_picture(size=(256, 320))
    path = str(tmp_path / "slide.ome.tif")
    metadata = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit is not None:
        metadata |= {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:  # no TIFF resolution tags: OME-XML only
        options = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
        tif.write(image, subifds=2, metadata=metadata, **options)
        for level in (1, 2):
            tif.write(image[:: 2**level, :: 2**level], subfiletype=1, metadata=None, **options)
    with tifffile.TiffFile(path) as written:
        tags = written.pages[0].tags
        assert "ResolutionUnit" not in tags or tags["ResolutionUnit"].value == 1  # no resolution in the TIFF tags
    with open_reader(path) as reader:
        assert reader.mpp == pytest.approx(microns)
        assert [lv.size for lv in reader.levels] == [(256, 320), (128, 160), (64, 80)]
        assert choose_level(reader, mpp=2 * microns) == 1
        assert choose_level(reader, mpp=4 * microns) == 2
