"""The CLI speaks like a command line: one clean error line, flags not Python, exit codes 0/1/2."""

import os
import re
import subprocess
import sys

import pytest
from models import small_flatten_cnn

from keras_fcn_surgery.cli import main
from keras_fcn_surgery.commands.common import EXIT_USAGE, cli_message

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env_drop=("TF_CPP_MIN_LOG_LEVEL",)):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    code = "import sys; from keras_fcn_surgery.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )


def test_an_error_is_one_clean_line_with_tensorflow_logging_unset(tmp_path):
    # TensorFlow starts before the command runs: the whole stderr must be our one line, none of
    # TensorFlow's C++ start-up log.
    result = _cli("convert", str(tmp_path / "missing.keras"), str(tmp_path / "fcn.keras"))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "cuda" not in result.stderr.lower() and "absl" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_tensorflow_is_quiet_after_real_work(tmp_path):
    source = tmp_path / "classifier.keras"
    small_flatten_cnn().save(source)
    result = _cli("convert", str(source), str(tmp_path / "fcn.keras"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_a_users_own_log_level_is_respected(tmp_path):
    env_level = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}
    code = (
        "import os, sys; from keras_fcn_surgery.cli import main; main(sys.argv[1:]); "
        "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "convert", str(tmp_path / "m.keras"), str(tmp_path / "o.keras")],
        capture_output=True,
        text=True,
        env=env_level,
        timeout=300,
    )
    assert result.stdout.strip() == "0"


@pytest.mark.parametrize(
    "python, flags",
    [
        ("Output 'x' exists; pass overwrite=True (CLI: --overwrite) to replace it.", "pass --overwrite to replace"),
        ("Pass `input_size=(H, W)`, the size the classifier was trained at.", "Pass --input-size HxW, the size"),
        ("or pass `input_size=(H, W)` to `convert`.", "or pass --input-size HxW."),
        ("Pass `verify=False` (CLI: `--no-verify`) to convert it anyway.", "Pass --no-verify to convert"),
        ("verify on a device that has it, or pass `verify=False`; otherwise", "or pass --no-verify; otherwise"),
        ("no tiling is exact. Use `tile=None`.", "Use no --tile."),
        ("the `head='window'` pooling is unknown", "the --head window pooling"),
    ],
)
def test_library_advice_is_spelt_as_flags(python, flags):
    assert flags in cli_message(python)
    assert not re.search(r"\w+=(True|False|None|\(H)", cli_message(python))


@pytest.mark.parametrize(
    "argv",
    [
        ["heatmap", "m.keras", "x.png", "--class", "1", "-o", "o.png", "--tile", "0"],
        ["heatmap", "m.keras", "x.png", "--class", "1", "-o", "o.png", "--tile", "-5"],
        ["demo", "--size", "0"],
        # One rule for every command's tile (issue 28: `predict` and `segment` took 0 and failed later).
        ["predict", "m.keras", "slides", "--out", "maps", "--tile", "0"],
        ["segment", "m.keras", "x.png", "-o", "mask.png", "--tile", "0"],
    ],
)
def test_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == EXIT_USAGE
    assert "expected a positive integer" in capsys.readouterr().err


def test_demo_image_smaller_than_the_network_is_an_input_error(capsys):
    assert main(["demo", "--size", "100"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --size 100 is smaller than CaffeNet's smallest input, 227")


def test_unknown_input_size_without_the_flag_is_a_usage_error(tmp_path, capsys):
    import keras
    from keras import layers

    model = keras.Sequential(
        [keras.Input((None, None, 3)), layers.Conv2D(4, 3), layers.GlobalAveragePooling2D(), layers.Dense(2)]
    )
    source = tmp_path / "any_size.keras"
    model.save(source)
    assert main(["convert", str(source), str(tmp_path / "fcn.keras")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "original size is unknown" in err and "--input-size HxW" in err and "input_size=" not in err
    assert sorted(os.listdir(tmp_path)) == ["any_size.keras"]


@pytest.fixture
def flatten_model_file(tmp_path):
    path = tmp_path / "classifier.keras"
    small_flatten_cnn().save(path)
    return path


def _png(path, size):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_heatmap_of_an_image_smaller_than_the_network_is_an_input_error(flatten_model_file, tmp_path, capsys):
    image = _png(tmp_path / "small.png", (16, 16))
    output = tmp_path / "map.png"
    assert main(["heatmap", str(flatten_model_file), str(image), "--class", "1", "-o", str(output)]) == EXIT_USAGE
    assert "smaller than the network's minimum input of 32x32" in capsys.readouterr().err
    assert not output.exists()


def test_heatmap_tile_below_the_minimum_is_an_input_error(flatten_model_file, tmp_path, capsys):
    image = _png(tmp_path / "large.png", (96, 96))
    output = tmp_path / "map.png"
    argv = ["heatmap", str(flatten_model_file), str(image), "--class", "1", "-o", str(output), "--tile", "8"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Use tiles of at least" in err
    assert not output.exists()


def test_channels_first_without_onednn_is_one_clean_line(tmp_path):
    # With oneDNN off, TensorFlow's CPU Conv2D has no channels-first kernel: the source itself cannot run.
    import keras
    from keras import layers

    model = keras.Sequential(
        [keras.Input((3, 16, 16)), layers.Conv2D(4, 3, data_format="channels_first"), layers.Flatten(), layers.Dense(2)]
    )
    source = tmp_path / "nchw.keras"
    model.save(source)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    code = "import sys; from keras_fcn_surgery.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "convert", str(source), str(tmp_path / "fcn.keras")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "TF_ENABLE_ONEDNN_OPTS=1" in result.stderr and "--no-verify" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["nchw.keras"]


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "missing.keras", "out.keras"],
        ["heatmap", "missing.keras", "x.png", "--class", "1", "-o", "map.png"],
        ["show", "filters", "missing.keras", "-o", "f.png"],
        ["export", "missing.keras", "models"],
        ["predict", "missing.keras", "slides", "--out", "maps"],
    ],
)
def test_a_wrong_path_is_answered_before_tensorflow_starts(argv, tmp_path):
    # Issue 28: every answer took ~9 s, TensorFlow starting before the paths were looked at.
    code = (
        "import sys\n"
        "from keras_fcn_surgery import cli\n"
        f"code = cli.main({argv!r})\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow started'\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.strip() == "error: Model file 'missing.keras' does not exist. Check the path."


def test_a_predict_rerun_with_nothing_to_do_answers_before_tensorflow_starts(tmp_path):
    import keras
    from PIL import Image

    keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(), keras.layers.Dense(2)]
    ).save(tmp_path / "m.keras")
    (tmp_path / "images").mkdir()
    for n in range(2):
        Image.new("RGB", (16, 16), (n, 0, 0)).save(tmp_path / "images" / f"i{n}.png")
    assert main(["predict", str(tmp_path / "m.keras"), str(tmp_path / "images"), "--out", str(tmp_path / "maps")]) == 0
    code = (
        "import sys\n"
        "from keras_fcn_surgery import cli\n"
        "code = cli.main(['predict', 'm.keras', 'images', '--out', 'maps'])\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow started'\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("predict: 0 done, 2 skipped, 0 failed in ")


def test_an_image_smaller_than_the_network_is_a_usage_error_in_every_command(tmp_path, capsys):
    # Issue 28: exit 2 in heatmap, but 1 in segment and show activations.
    import keras
    from PIL import Image

    from keras_fcn_surgery.segmentation.segmenter import segmenter

    classifier = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(4, 3, name="conv2"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    classifier.save(tmp_path / "clf.keras")
    segmenter(classifier, num_classes=2, skips=()).save(tmp_path / "seg.keras")
    Image.new("RGB", (5, 6)).save(tmp_path / "tiny.png")
    tiny, out = str(tmp_path / "tiny.png"), str(tmp_path / "out.png")
    for argv in (
        ["segment", str(tmp_path / "seg.keras"), tiny, "-o", out],
        ["show", "activations", str(tmp_path / "clf.keras"), tiny, "--layer", "conv2", "-o", out],
        ["heatmap", str(tmp_path / "clf.keras"), tiny, "--class", "0", "-o", out],
    ):
        assert main(argv) == EXIT_USAGE, (argv, capsys.readouterr().err)
        assert capsys.readouterr().err.startswith("error: ")
