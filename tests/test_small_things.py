"""Issue 41, item 9: --version, a subcommand's own usage with "did you mean", each input's lines reported as
soon as it is done, compressed npz maps, the README's receptive field, the docs site's overflow and
signature formatting."""

import os
import re
import zipfile

import numpy as np
import pytest
import tomllib
import yaml
from models import small_flatten_cnn
from PIL import Image

from keras_fcn_surgery.batch import run as batch_run
from keras_fcn_surgery.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert re.fullmatch(r"keras-fcn-surgery \S+\n", capsys.readouterr().out)


def test_a_mistyped_flag_gets_the_subcommand_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "model.keras", "photo.png", "-o", "maps", "--formats", "npz"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: keras-fcn-surgery predict ")
    assert "unrecognized arguments: --formats npz (did you mean --format?)" in err


@pytest.fixture
def files(tmp_path):
    small_flatten_cnn(classes=5).save(tmp_path / "small.keras")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    return tmp_path


def test_a_finished_input_is_reported_before_the_job_is_interrupted(files, capsys, monkeypatch):
    real = batch_run.predict_source
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_run, "predict_source", interrupted_on_the_second)
    argv = ["predict", str(files / "small.keras"), str(files / "a.png"), str(files / "b.png")]
    assert main([*argv, "-o", str(files / "maps"), "--certify", "2"]) == 130
    out = capsys.readouterr().out
    assert f"{files / 'a.png'}: certificate: 2 of" in out  # the line of the input that was done


def test_npz_maps_are_compressed_where_it_pays(files):
    """Issue 41 item 9: a masked map (43 MB for a map 74% NaN) is deflated. Issue 35 stores what does not deflate:
    computed float32 scores shrink to 0.8-0.95 of their size at some 20 s per GB, 6% of a 4096² slide's job."""
    Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), ((0, 30), (0, 30)))).save(files / "mask.png")
    argv = ["predict", str(files / "small.keras"), str(files / "a.png"), "-o", str(files / "maps")]
    assert main([*argv, "--certify", "0", "--mask", str(files / "mask.png")]) == 0
    with zipfile.ZipFile(files / "maps" / "a.npz") as archive:
        scores = archive.getinfo("scores.npy")
        assert scores.compress_type == zipfile.ZIP_DEFLATED and scores.compress_size < 0.5 * scores.file_size
    stored = np.load(files / "maps" / "a.npz")["scores"]
    assert stored.dtype == np.float32 and np.isnan(stored).mean() > 0.5


def test_the_readme_states_the_receptive_field_the_tour_prints():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    assert "64-pixel window" not in text and "window of 62 pixels" in text


def test_the_docs_site_scrolls_long_code_and_formats_signatures():
    with open(os.path.join(REPO, "mkdocs.yml"), encoding="utf-8") as handle:
        site = yaml.safe_load(handle)
    (css,) = site["extra_css"]
    with open(os.path.join(REPO, "docs", css), encoding="utf-8") as handle:
        assert "overflow-x: auto" in handle.read()
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        extras = tomllib.load(handle)["project"]["optional-dependencies"]
    assert "ruff" in extras["docs"]  # mkdocstrings formats signatures with Black or Ruff
