"""Exit codes: an input error is exit 2 in every command (`predict` included), and is found before the work."""

import numpy as np
import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.commands.common import EXIT_CONVERSION, EXIT_OK, EXIT_USAGE


@pytest.fixture
def files(tmp_path):
    small_flatten_cnn(classes=5).save(tmp_path / "small.keras")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    return tmp_path


def test_predict_on_an_input_smaller_than_the_network_exits_2(files, capsys):
    argv = ["predict", str(files / "small.keras"), str(files / "tiny.png"), "-o", str(files / "maps")]
    assert main([*argv, "--certify", "0"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert "smaller than the network" in captured.err and "0 done, 0 skipped, 1 failed" in captured.out
    assert (
        main(
            ["heatmap", str(files / "small.keras"), str(files / "tiny.png"), "--class", "0", "-o", str(files / "h.png")]
        )
        == EXIT_USAGE
    )  # the same input, the same code


def test_predict_with_one_input_error_among_others_still_finishes_them(files, capsys):
    argv = ["predict", str(files / "small.keras"), str(files / "tiny.png"), str(files / "photo.png")]
    assert main([*argv, "-o", str(files / "maps"), "--certify", "0"]) == EXIT_USAGE
    assert "1 done, 0 skipped, 1 failed" in capsys.readouterr().out
    assert (files / "maps" / "photo.npz").exists()
    assert EXIT_CONVERSION == 1 and EXIT_OK == 0


def test_heatmap_refuses_a_class_out_of_range_before_computing_the_map(files, capsys, monkeypatch):
    def no_map(*args, **kwargs):
        raise AssertionError("the map was computed before --class was checked")

    monkeypatch.setattr(kfs, "predict_map", no_map)
    argv = ["heatmap", str(files / "small.keras"), str(files / "photo.png"), "--class", "7"]
    assert main([*argv, "-o", str(files / "h.png")]) == EXIT_USAGE
    assert "--class 7 is out of range: the model has 5 classes" in capsys.readouterr().err
    assert not (files / "h.png").exists()
