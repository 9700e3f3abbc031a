"""``--overwrite`` replaces a previous output, never files the output did not write: every export format and
every command that takes the flag, run into a folder that also holds a user's files."""

import os

import numpy as np
import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli

EXIT_OK, EXIT_USAGE = 0, 2


@pytest.fixture
def work(tmp_path):
    """A folder holding the model, an image and a user's unrelated files (``a.txt``, ``sub/b.txt``)."""
    small_flatten_cnn().save(tmp_path / "small.keras")
    pixels = np.random.default_rng(0).integers(0, 255, (40, 44, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    (tmp_path / "a.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("mine too")
    return tmp_path


def _user_files_kept(folder):
    assert (folder / "a.txt").read_text() == "mine"
    assert (folder / "sub" / "b.txt").read_text() == "mine too"


def test_openvino_overwrite_refuses_a_folder_that_is_not_a_previous_export(work, capsys):
    pytest.importorskip("openvino")
    # The command: `cd work && keras-fcn-surgery export ../small.keras . --format openvino --overwrite`.
    model = str(work / "small.keras")
    assert cli.main(["export", model, str(work), "--format", "openvino", "--overwrite"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not a previous OpenVINO export" in err and "a.txt" in err and "sub" in err
    _user_files_kept(work)
    with pytest.raises(kfs.ModelFileError, match="not a previous OpenVINO export"):
        kfs.export(small_flatten_cnn(), work, format="openvino", overwrite=True)
    _user_files_kept(work)
    assert not [name for name in os.listdir(work) if "partial" in name]


def test_openvino_overwrite_replaces_a_previous_export(work):
    pytest.importorskip("openvino")
    target = work / "fcn_ov"
    kfs.export(small_flatten_cnn(), target, format="openvino")
    kfs.export(small_flatten_cnn(), target, format="openvino", overwrite=True)
    assert sorted(os.listdir(target)) == ["model.bin", "model.xml"]
    _user_files_kept(work)


def test_savedmodel_overwrite_refuses_a_version_folder_holding_other_files(work, capsys):
    base = work / "models"
    kfs.export(small_flatten_cnn(), base, format="savedmodel", version=1, bytes_signature=False)
    written = sorted(os.listdir(base / "1"))
    (base / "1" / "assets.extra").mkdir()  # TF Serving's warm-up requests: written by the user, not the export
    (base / "1" / "assets.extra" / "tf_serving_warmup_requests").write_text("mine")
    model = str(work / "small.keras")
    argv = ["export", model, str(base), "--version", "1", "--overwrite"]
    assert cli.main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not a previous SavedModel version" in err and "assets.extra" in err
    assert (base / "1" / "assets.extra" / "tf_serving_warmup_requests").read_text() == "mine"
    assert sorted(os.listdir(base / "1")) == sorted([*written, "assets.extra"])
    assert sorted(os.listdir(base)) == ["1"]


def test_savedmodel_overwrite_replaces_a_previous_version(work):
    base = work / "models"
    kfs.export(small_flatten_cnn(), base, format="savedmodel", version=1, bytes_signature=False)
    result = kfs.export(
        small_flatten_cnn(), base, format="savedmodel", version=1, bytes_signature=False, overwrite=True
    )
    assert result.path == str(base / "1") and "saved_model.pb" in os.listdir(base / "1")
    _user_files_kept(work)


@pytest.mark.parametrize("format, name", [("onnx", "fcn.onnx"), ("tflite", "fcn.tflite")])
def test_file_exports_overwrite_only_their_file(work, format, name):
    if format == "onnx":
        pytest.importorskip("tf2onnx")
    (work / name).write_bytes(b"previous export")
    assert cli.main(["export", str(work / "small.keras"), str(work / name), "--format", format, "--overwrite"]) == 0
    assert (work / name).read_bytes() != b"previous export"
    assert sorted(os.listdir(work)) == sorted(["a.txt", "sub", "small.keras", "photo.png", name])
    _user_files_kept(work)


def test_commands_writing_one_file_overwrite_only_that_file(work, capsys):
    model, image = str(work / "small.keras"), str(work / "photo.png")
    fcn = work / "fcn.keras"
    runs = [
        ["convert", model, str(fcn)],
        ["show", "filters", model, "-o", str(work / "filters.png")],
        ["heatmap", str(fcn), image, "--class", "1", "-o", str(work / "heat.png"), "--input-size", "32x32"],
    ]
    for argv in runs:
        assert cli.main(argv) == EXIT_OK, capsys.readouterr().err
        assert cli.main([*argv, "--overwrite"]) == EXIT_OK, capsys.readouterr().err
    assert sorted(os.listdir(work)) == sorted(
        ["a.txt", "sub", "small.keras", "photo.png", "fcn.keras", "filters.png", "heat.png"]
    )
    _user_files_kept(work)


def test_segment_overwrites_only_its_files(work, capsys):
    model = kfs.segmenter(small_flatten_cnn(), num_classes=5)
    model.save(work / "seg.keras")
    argv = ["segment", str(work / "seg.keras"), str(work / "photo.png"), "-o", str(work / "m.png")]
    argv += ["--labels", str(work / "labels.npy")]
    assert cli.main(argv) == EXIT_OK, capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == EXIT_OK, capsys.readouterr().err
    assert sorted(os.listdir(work)) == sorted(
        ["a.txt", "sub", "small.keras", "photo.png", "seg.keras", "m.png", "labels.npy"]
    )
    _user_files_kept(work)


def test_predict_overwrite_refuses_a_folder_that_is_not_a_previous_zarr_output(work, capsys):
    out = work / "maps"
    (out / "photo.zarr").mkdir(parents=True)
    (out / "photo.zarr" / "notes.txt").write_text("mine")
    (out / "other.txt").write_text("mine")
    argv = ["predict", str(work / "small.keras"), str(work / "photo.png"), "-o", str(out), "--format", "npz,zarr"]
    assert cli.main([*argv, "--overwrite"]) != EXIT_OK
    assert "not a previous zarr output" in capsys.readouterr().err
    assert (out / "photo.zarr" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["other.txt", "photo.zarr"]

    os.remove(out / "photo.zarr" / "notes.txt")
    os.rmdir(out / "photo.zarr")
    assert cli.main(argv) == EXIT_OK, capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == EXIT_OK, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["other.txt", "photo.npz", "photo.zarr"]
    assert (out / "other.txt").read_text() == "mine"
    _user_files_kept(work)


def test_graph_overwrite_replaces_only_its_event_files(work, capsys):
    pytest.importorskip("tensorboard")
    logdir = work / "logs"
    (logdir / "source").mkdir(parents=True)
    (logdir / "source" / "notes.txt").write_text("mine")
    (logdir / "other_run").mkdir()
    (logdir / "other_run" / "events.out.tfevents.1.mine").write_text("mine")
    argv = ["graph", str(work / "small.keras"), "--logdir", str(logdir)]
    assert cli.main(argv) == EXIT_OK, capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == EXIT_OK, capsys.readouterr().err
    assert (logdir / "source" / "notes.txt").read_text() == "mine"
    assert (logdir / "other_run" / "events.out.tfevents.1.mine").read_text() == "mine"
    assert sorted(os.listdir(logdir)) == ["fcn", "other_run", "source"]
    _user_files_kept(work)
