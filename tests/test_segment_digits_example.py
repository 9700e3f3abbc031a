"""examples/segment_digits.py: a shortened run in the default suite, the full one (FCN-8s beats FCN-32s) heavy."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import segment_digits  # noqa: E402


def test_canvases_label_stroke_pixels_with_their_digit():
    train, _ = segment_digits.load_digits()
    x, y = segment_digits.make_canvases(train, 4, 32, seed=0)
    assert x.shape == (4, 32, 32, 1) and y.shape == (4, 32, 32)
    stroke = y != segment_digits.BACKGROUND
    assert stroke.any()
    assert (x[..., 0][stroke] >= segment_digits.STROKE).all()
    assert (x[..., 0][~stroke] < segment_digits.STROKE + 0.7).all()
    for canvas in y:
        assert len(set(np.unique(canvas)) - {segment_digits.BACKGROUND}) >= 1


def test_both_segmenters_score_and_draw_without_training(tmp_path):
    classifier = segment_digits.build_classifier()
    _, test_digits = segment_digits.load_digits()
    test = segment_digits.make_canvases(test_digits, 3, 24, seed=2)
    models = {"FCN-32s": segment_digits.kfs.segmenter(classifier, skips=())}
    models["FCN-8s"] = segment_digits.kfs.segmenter(classifier)
    assert {"score_pool2", "score_pool1"} <= {layer.name for layer in models["FCN-8s"].layers}
    for model in models.values():
        assert 0 <= segment_digits.mean_iu(model, test) <= 1
    predictions = {name: model.predict(test[0], verbose=0).argmax(-1) for name, model in models.items()}
    figure = segment_digits.picture(test, predictions)
    assert figure.width == 4 * (24 * 4 + 4)


@pytest.mark.heavy
def test_short_run_trains_both_segmenters_and_writes_the_picture(tmp_path, capsys):
    out = tmp_path / "segment.png"
    assert segment_digits.main(["--short", "-o", os.fspath(out)]) == 0
    printed = capsys.readouterr().out
    assert "FCN-32s: mean IU" in printed and "FCN-8s: mean IU" in printed
    assert out.exists()


@pytest.mark.heavy
def test_full_run_fcn8s_beats_fcn32s():
    results = segment_digits.run()
    assert results["mean_iu"]["FCN-8s"] > results["mean_iu"]["FCN-32s"] + 0.05, results["mean_iu"]
