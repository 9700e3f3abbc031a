"""`predict_images` and the `predict` command on images the tests make: folders, pyramids, slides with masks."""

import json
import os

import numpy as np
import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.batch.run import predict_images
from keras_fcn_surgery.batch.sources import find_sources

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("skimage")

from test_batch_inputs import slide_picture, write_pyramid  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    import keras

    keras.utils.set_random_seed(7)
    return small_flatten_cnn(input_size=(32, 32), classes=3)


@pytest.fixture(scope="module")
def fcn(classifier):
    return kfs.convert(classifier)


@pytest.fixture(scope="module")
def model_file(classifier, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "classifier.keras")
    classifier.save(path)
    return path


def pixels_of(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def assert_same_map(actual, expected):
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale)


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (64, 40), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (100, 52, 3), dtype=np.uint8)).save(folder / "more" / "tall.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def test_folder_of_mixed_images_with_a_corrupt_one(mixed_folder, model_file, fcn, tmp_path, capsys):
    out = tmp_path / "maps"
    code = cli.main(["predict", model_file, str(mixed_folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2  # the only failure is the input's own (an unreadable file): a usage/input error (issue 41)
    assert "3 done, 0 skipped, 1 failed" in captured.out
    assert "corrupt.jpg" in captured.err
    assert sorted(os.listdir(out)) == ["grey.npz", "more", "wide.npz"]
    for name, image in (("wide", "wide.png"), ("grey", "grey.png"), ("more/tall", "more/tall.jpg")):
        saved = np.load(out / f"{name}.npz")
        assert_same_map(saved["scores"], kfs.predict_map(fcn, pixels_of(mixed_folder / image)))
        assert str(saved["source"]) == str(mixed_folder / image)
        assert tuple(saved["stride"]) == kfs.geometry(fcn).stride
        assert int(saved["level"]) == 0


def test_rerun_skips_finished_inputs_and_overwrite_recomputes(mixed_folder, fcn, tmp_path):
    out = tmp_path / "maps"
    first = predict_images(fcn, [str(mixed_folder / "wide.png")], out)
    assert [r.status for r in first.results] == ["done"]
    written = os.stat(out / "wide.npz")
    again = predict_images(fcn, [str(mixed_folder)], out)
    assert {os.path.basename(r.source): r.status for r in again.results} == {
        "wide.png": "skipped",
        "grey.png": "done",
        "tall.jpg": "done",
        "corrupt.jpg": "failed",
    }
    assert os.stat(out / "wide.npz").st_mtime_ns == written.st_mtime_ns
    assert os.stat(out / "wide.npz").st_ino == written.st_ino
    replaced = predict_images(fcn, [str(mixed_folder / "wide.png")], out, overwrite=True)
    assert replaced.results[0].status == "done" and os.stat(out / "wide.npz").st_ino != written.st_ino


def test_an_interrupted_run_leaves_no_partial_output(mixed_folder, fcn, tmp_path):
    names = {(64, 40, 3): "grey", (100, 52, 3): "more/tall", (70, 90, 3): "wide"}  # by the shape of their pixels
    calls = []

    def interrupt_on_the_third_image_read(x):
        calls.append(names[tuple(x.shape)])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return x

    out = tmp_path / "maps"
    with pytest.raises(KeyboardInterrupt):
        predict_images(  # certify=0: the certificate's crops would go through `preprocess` too
            fcn,
            [str(mixed_folder)],
            out,
            formats="npz,zarr,geojson",
            preprocess=interrupt_on_the_third_image_read,
            certify=0,
        )
    left = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files)
    finished, interrupted = calls[:-1], calls[-1]
    # The inputs read before the interruption finished with all their outputs; the interrupted one left nothing.
    assert {path.split(".")[0] for path in left} == set(finished), left
    assert all(f"{name}.npz" in left and f"{name}.geojson" in left for name in finished)
    assert not [path for path in left if path.startswith(interrupted)]
    assert not [d for d, _, _ in os.walk(out) if ".partial-" in d]


def test_pyramid_level_one_with_zarr_geojson_and_csv(fcn, tmp_path):
    image = np.random.default_rng(3).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    write_pyramid(str(tmp_path / "slide.tif"), image, levels=3, tile=64)
    out = tmp_path / "maps"
    summary = predict_images(  # geojson="cells": one detection per cell, the GeoJSON written before regions
        fcn, [str(tmp_path / "slide.tif")], out, level=1, formats=["npz", "zarr", "geojson", "csv"], geojson="cells"
    )
    assert summary.ok and summary.results[0].megapixels == pytest.approx(128 * 160 / 1e6)
    level_one = image[::2, ::2].astype(np.float32)
    expected = kfs.predict_map(fcn, level_one)
    saved = np.load(out / "slide.npz")
    assert_same_map(saved["scores"], expected)
    assert tuple(saved["downsample"]) == (2.0, 2.0) and tuple(saved["level_size"]) == (128, 160)

    import zarr

    group = zarr.open_group(str(out / "slide.zarr"), mode="r")
    np.testing.assert_array_equal(group["scores"][:], saved["scores"])
    assert group.attrs["level"] == 1 and group.attrs["downsample"] == [2.0, 2.0]

    with open(out / "slide.geojson", encoding="utf-8") as handle:
        features = json.load(handle)["features"]
    assert len(features) == expected.shape[0] * expected.shape[1]
    grid = kfs.geometry(fcn).at((128, 160))
    for feature in features[:: max(1, len(features) // 40)]:
        props = feature["properties"]
        i, j = props["row"], props["col"]
        top, left, bottom, right = grid.input_box(i, j)  # the cell's window, in level-1 pixels
        centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
        half_y, half_x = grid.stride[0] / 2, grid.stride[1] / 2
        ring = feature["geometry"]["coordinates"][0]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        assert (min(xs), max(xs)) == pytest.approx((2 * (centre_x - half_x), 2 * (centre_x + half_x)))
        assert (min(ys), max(ys)) == pytest.approx((2 * (centre_y - half_y), 2 * (centre_y + half_y)))
        assert props["class"] == int(np.argmax(expected[i, j]))
        assert props["measurements"]["probability"] == pytest.approx(float(expected[i, j].max()), abs=1e-5)
        assert props["classification"]["name"] == f"class {props['class']}"
    rows = (out / "slide.csv").read_text().splitlines()
    assert rows[0].startswith("row,col,x0,y0,x1,y1,class") and len(rows) == len(features) + 1


def test_predict_command_writes_regions_or_cells_as_asked(mixed_folder, model_file, tmp_path):
    image = str(mixed_folder / "wide.png")
    for choice, kind in (
        ([], "annotation"),
        (["--geojson", "cells"], "detection"),
        (["--geojson", "regions"], "annotation"),
    ):
        out = tmp_path / (choice[-1] if choice else "default")
        assert cli.main(["predict", model_file, image, "--out", str(out), "--format", "geojson", *choice]) == 0
        features = json.loads((out / "wide.geojson").read_text())["features"]
        assert {f["properties"]["objectType"] for f in features} == {kind}
    with pytest.raises(SystemExit) as stop:
        cli.main(["predict", model_file, image, "--out", str(tmp_path / "x"), "--format", "geojson", "--geojson", "x"])
    assert stop.value.code == 2


def test_auto_mask_skips_empty_glass_and_keeps_cells_exact(fcn, tmp_path):
    picture = slide_picture(size=(512, 640), patch=(slice(40, 160), slice(60, 220)))
    path = str(tmp_path / "slide.tif")
    write_pyramid(path, picture, levels=3, tile=64)
    out = tmp_path / "maps"
    summary = predict_images(fcn, [path], out, mask="auto", tile=128, formats="npz,geojson")
    result = summary.results[0]
    assert result.status == "done"
    assert 0 < result.computed_fraction < 0.5
    scores = np.load(out / "slide.npz")["scores"]
    kept = ~np.isnan(scores).any(axis=-1)
    assert np.isnan(scores[~kept]).all()
    whole = kfs.predict_map(fcn, picture.astype(np.float32))
    assert_same_map(scores[kept], whole[kept])
    grid = kfs.geometry(fcn).at(picture.shape[:2])
    rows, cols = np.nonzero(kept)
    centres_y = grid.offset[0] + rows * grid.stride[0] + grid.receptive_field[0] / 2
    centres_x = grid.offset[1] + cols * grid.stride[1] + grid.receptive_field[1] / 2
    assert centres_y.min() > 40 - 16 and centres_y.max() < 160 + 16  # kept cells lie on the tissue
    assert centres_x.min() > 60 - 16 and centres_x.max() < 220 + 16
    assert kept.sum() > 0.8 * (120 * 160) / (grid.stride[0] * grid.stride[1])
    with open(out / "slide.geojson", encoding="utf-8") as handle:
        features = json.load(handle)["features"]  # regions of neighbouring cells of one class, by default
    assert sum(f["properties"]["measurements"]["cells"] for f in features) == kept.sum()
    assert len(features) < kept.sum() / 4


def test_mask_file_at_another_resolution(fcn, tmp_path):
    image = np.random.default_rng(5).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "scene.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:16, :] = 255  # the top quarter of the image
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "maps"
    summary = predict_images(fcn, [str(tmp_path / "scene.png")], out, mask=str(tmp_path / "mask.png"), tile=64)
    assert summary.results[0].computed_fraction <= 0.5
    scores = np.load(out / "scene.npz")["scores"]
    kept = ~np.isnan(scores).any(axis=-1)
    whole = kfs.predict_map(fcn, image.astype(np.float32))
    assert_same_map(scores[kept], whole[kept])
    assert kept[:10].all() and not kept[20:].any()


def test_bad_options_fail_before_any_work(mixed_folder, fcn, tmp_path, capsys):
    out = tmp_path / "maps"
    assert cli.main(["predict", "missing.keras", str(mixed_folder), "--out", str(out)]) == 2
    assert "missing.keras" in capsys.readouterr().err
    with pytest.raises(kfs.InputError, match="formats") as info:
        predict_images(fcn, [str(mixed_folder)], out, formats="png")
    assert not isinstance(info.value, kfs.ModelFileError)  # an option, not a file (issue 22)
    with pytest.raises(kfs.ModelFileError, match="nowhere.png"):
        predict_images(fcn, [str(mixed_folder)], out, mask=str(tmp_path / "nowhere.png"))
    assert not out.exists()
    summary = predict_images(fcn, [str(mixed_folder / "wide.png")], out, level=2)
    assert summary.failed and "level 2 does not exist" in summary.failed[0].message
    assert "wide.png" in summary.failed[0].message


def test_channels_first_model_with_a_mask(tmp_path):
    import keras

    keras.utils.set_random_seed(11)
    model = kfs.convert(small_flatten_cnn(input_size=(32, 32), classes=2, data_format="channels_first"))
    image = np.random.default_rng(9).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "cf.png")
    mask = np.zeros((200, 200), np.uint8)
    mask[:, 150:] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    summary = predict_images(
        model, [str(tmp_path / "cf.png")], tmp_path / "maps", mask=str(tmp_path / "mask.png"), tile=64
    )
    assert summary.ok
    scores = np.load(tmp_path / "maps" / "cf.npz")["scores"]
    kept = ~np.isnan(scores).any(axis=-1)
    whole = np.moveaxis(kfs.predict_map(model, np.moveaxis(image.astype(np.float32), -1, 0)), 0, -1)
    assert kept.any() and not kept.all()
    assert_same_map(scores[kept], whole[kept])


def test_sigterm_during_the_command_leaves_no_partial_output(mixed_folder, model_file, tmp_path, monkeypatch, capsys):
    import signal

    from keras_fcn_surgery.batch import job as batch_job

    calls = []

    def terminate_on_second_image(preprocess, layout):
        def hook(x):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return x

        return hook

    monkeypatch.setattr(batch_job, "preprocess_fn", terminate_on_second_image)
    out = tmp_path / "maps"
    before = signal.getsignal(signal.SIGTERM)
    code = cli.main(["predict", model_file, str(mixed_folder), "--out", str(out), "--format", "npz,zarr,csv"])
    assert code == 143 and "terminated (SIGTERM); no partial output left behind" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
    left = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files)
    assert all(path.startswith("grey.") for path in left), left
    assert not [d for d, _, _ in os.walk(out) if ".partial-" in d]


def test_zarr_output_is_replaced_whole_with_overwrite(mixed_folder, fcn, tmp_path):
    out = tmp_path / "maps"
    image = str(mixed_folder / "wide.png")
    predict_images(fcn, [image], out, formats="zarr")
    (out / "wide.zarr" / "stale").write_text("left from an older run")
    assert predict_images(fcn, [image], out, formats="zarr").results[0].status == "skipped"
    assert predict_images(fcn, [image], out, formats="zarr", overwrite=True).results[0].status == "done"
    assert not (out / "wide.zarr" / "stale").exists()
    import zarr

    scores = zarr.open_group(str(out / "wide.zarr"), mode="r")["scores"][:]
    assert_same_map(scores, kfs.predict_map(fcn, pixels_of(image)))
    assert sorted(os.listdir(out)) == ["wide.zarr"]


@pytest.mark.heavy
def test_sigterm_to_a_running_command_process(model_file, tmp_path):
    """A real SIGTERM, from outside, to the command while it writes a large slide's outputs."""
    import signal
    import subprocess
    import sys
    import time

    picture = np.random.default_rng(8).integers(0, 255, (3072, 3072, 3), dtype=np.uint8)
    write_pyramid(str(tmp_path / "slide.tif"), picture, levels=2, tile=256)
    out = tmp_path / "maps"
    command = [sys.executable, "-m", "keras_fcn_surgery.cli", "predict", model_file, str(tmp_path / "slide.tif")]
    process = subprocess.Popen(
        [*command, "--out", str(out), "--tile", "256", "--format", "zarr,npz"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        out.exists() and any(p.name.startswith(".partial-") for p in out.iterdir())
    ):
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    time.sleep(0.5)  # well inside the tiles
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "no partial output" in err
    assert not out.exists()  # the run made the folder and wrote nothing in it: it is gone too (issue 28)


def test_a_network_with_global_context_runs_whole_and_the_mask_still_applies(tmp_path):
    import keras
    from keras import layers

    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    gate = layers.Conv2D(4, 1, activation="sigmoid")(layers.GlobalAveragePooling2D(keepdims=True)(x))
    model = keras.Model(inputs, layers.Conv2D(2, 1)(layers.Multiply()([x, gate])))
    image = np.random.default_rng(6).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "scene.png")
    mask = np.zeros((96, 128), np.uint8)
    mask[:, :64] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    summary = predict_images(model, [str(tmp_path / "scene.png")], tmp_path / "maps", mask=str(tmp_path / "mask.png"))
    assert summary.ok and summary.results[0].computed_fraction == 1.0
    scores = np.load(tmp_path / "maps" / "scene.npz")["scores"]
    kept = ~np.isnan(scores).any(axis=-1)
    assert kept[:, :31].all() and not kept[:, 33:].any()
    assert_same_map(scores[kept], kfs.predict_map(model, image.astype(np.float32))[kept])


def test_a_run_that_writes_nothing_leaves_no_output_folder(fcn, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "maps"
    summary = predict_images(fcn, [str(tmp_path / "broken.png")], out)
    assert summary.failed and not out.exists()  # issue 28: an empty folder was left behind
    out.mkdir()
    predict_images(fcn, [str(tmp_path / "broken.png")], out)
    assert out.is_dir(), "a folder the user made is kept"


def test_an_interrupted_predict_says_how_many_inputs_finished(model_file, mixed_folder, tmp_path, capsys, monkeypatch):
    # Issue 28: after Ctrl-C the user could not tell how far the run had got.
    from keras_fcn_surgery.batch import run as batch_run

    real, calls = batch_run.predict_source, []

    def interrupted_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_run, "predict_source", interrupted_third)
    out = tmp_path / "maps"
    assert cli.main(["predict", model_file, str(mixed_folder), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    total, written = len(find_sources([str(mixed_folder)])), len(list(out.rglob("*.npz")))
    assert written == 1 and total == 4  # corrupt.jpg failed, grey.png done, then Ctrl-C
    assert f"interrupted (SIGINT); no partial output left behind. {written} of {total} inputs have their outputs" in err
