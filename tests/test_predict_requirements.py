"""`predict` names every package its formats and options need, all at once and before any work, with the one
`pip install` line that brings them (the README tour's line after the README's own `pip install .`)."""

import os

import numpy as np
import pytest
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.batch import requirements
from keras_fcn_surgery.cli import main


@pytest.fixture
def without_slides_and_ome(monkeypatch):
    installed = requirements._installed
    monkeypatch.setattr(
        requirements, "_installed", lambda module: module not in ("zarr", "skimage") and installed(module)
    )


@pytest.fixture
def job(tmp_path):
    small_flatten_cnn().save(tmp_path / "fcn.keras")
    (tmp_path / "slides").mkdir()
    for name in ("a", "b"):
        pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "slides" / f"{name}.png")
    return tmp_path


def test_the_tour_line_names_every_missing_package_at_once(job, without_slides_and_ome, capsys):
    out = job / "maps"
    argv = ["predict", str(job / "fcn.keras"), str(job / "slides"), "--out", str(out)]
    assert main([*argv, "--format", "npz,ome-zarr,geojson", "--mask", "auto"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "zarr (for --format ome-zarr)" in line
    assert "scikit-image (for --format geojson (regions), --mask auto)" in line
    assert "pip install 'keras-fcn-surgery[ome,slides]'" in line and "0 done" not in captured.out
    assert not out.exists()  # refused before any work

    with pytest.raises(kfs.InputError, match=r"scikit-image \(for --mask auto\).*\[slides\]"):
        kfs.predict_images(job / "fcn.keras", [job / "slides"], out, mask="auto")
    assert not out.exists()


def test_nothing_is_asked_for_what_is_not_used(job, without_slides_and_ome, capsys):
    out = job / "maps"
    argv = ["predict", str(job / "fcn.keras"), str(job / "slides"), "--out", str(out), "--input-size", "32x32"]
    assert main([*argv, "--format", "npz,geojson", "--geojson", "cells"]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["a.geojson", "a.npz", "b.geojson", "b.npz"]
