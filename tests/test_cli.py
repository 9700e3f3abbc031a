"""``keras-fcn-surgery convert``: exit codes 0 / 1 / 2, and files written only on success."""

import os

import keras
import pytest
from keras import layers
from models import small_flatten_cnn, valid_gap_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.commands.common import EXIT_CONVERSION, EXIT_OK, EXIT_USAGE


@pytest.fixture
def classifier_file(tmp_path):
    path = tmp_path / "classifier.keras"
    small_flatten_cnn().save(path)
    return path


def _unconvertible_file(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = layers.Flatten(name="flat")(layers.Conv2D(4, 3, strides=2)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.LayerNormalization(name="flat_ln")(x)))
    path = tmp_path / "unconvertible.keras"
    model.save(path)
    return path


def test_success_writes_the_fcn(classifier_file, tmp_path, capsys):
    output = tmp_path / "fcn.keras"
    assert main(["convert", str(classifier_file), str(output)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "fc1" in out and "equal" in out and f"wrote {output}" in out
    fcn = kfs.load_model(output)
    assert tuple(fcn.inputs[0].shape) == (None, None, None, 3)
    assert [name for name in os.listdir(tmp_path) if name.startswith(".partial")] == []


def test_dense_head_with_verification(tmp_path, capsys):
    source = tmp_path / "gap.keras"
    valid_gap_cnn().save(source)
    output = tmp_path / "cam.keras"
    assert main(["convert", str(source), str(output), "--head", "dense"]) == EXIT_OK
    assert "equal" in capsys.readouterr().out
    assert kfs.load_model(output).outputs[0].shape[1] is None


def test_missing_input(tmp_path, capsys):
    output = tmp_path / "fcn.keras"
    assert main(["convert", str(tmp_path / "missing.keras"), str(output)]) == EXIT_USAGE
    assert "missing.keras' does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_unconvertible_model(tmp_path, capsys):
    source = _unconvertible_file(tmp_path)
    output = tmp_path / "fcn.keras"
    assert main(["convert", str(source), str(output)]) == EXIT_CONVERSION
    assert "'flat_ln' (LayerNormalization)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["unconvertible.keras"]


def test_existing_output_is_kept_without_overwrite(classifier_file, tmp_path, capsys):
    output = tmp_path / "fcn.keras"
    output.write_bytes(b"precious")
    assert main(["convert", str(classifier_file), str(output)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "exists; pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert output.read_bytes() == b"precious"


def test_existing_output_is_kept_when_conversion_fails(tmp_path, capsys):
    source = _unconvertible_file(tmp_path)
    output = tmp_path / "fcn.keras"
    output.write_bytes(b"precious")
    assert main(["convert", str(source), str(output), "--overwrite"]) == EXIT_CONVERSION
    assert output.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["fcn.keras", "unconvertible.keras"]


def test_overwrite_replaces_the_output(classifier_file, tmp_path, capsys):
    output = tmp_path / "fcn.keras"
    output.write_bytes(b"old")
    assert main(["convert", str(classifier_file), str(output), "--overwrite"]) == EXIT_OK
    assert output.read_bytes() != b"old"
    assert kfs.load_model(output).get_layer("fc1").__class__ is layers.Conv2D


@pytest.mark.parametrize(
    "output, message",
    [("fcn.h5", "must end in `.keras`"), ("no_such_folder/fcn.keras", "does not exist"), (".", "must end")],
)
def test_bad_output_path(classifier_file, tmp_path, capsys, output, message):
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(classifier_file), str(tmp_path / output)]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_usage_errors_exit_2(classifier_file, tmp_path, capsys):
    for argv in (
        ["convert", str(classifier_file)],
        ["convert", str(classifier_file), str(tmp_path / "fcn.keras"), "--head", "global"],
        ["convert", str(classifier_file), str(tmp_path / "fcn.keras"), "--input-size", "0x3"],
        ["no-such-command"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == EXIT_USAGE
    assert "fcn.keras" not in os.listdir(tmp_path)
