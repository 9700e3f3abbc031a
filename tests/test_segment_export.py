"""Serving a segmenter: SavedModel (reloaded by TensorFlow alone) and ONNX give (N, H, W, K) at any size."""

import os
import subprocess
import sys

import pytest
from conftest import random_images
from test_segment import pooled_net

import keras_fcn_surgery as kfs

RELOAD = """
import sys
import numpy as np
import tensorflow as tf

serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
(output,) = serve(tf.constant(np.zeros((1, 23, 19, 3), np.float32))).values()
print(tuple(output.shape))
"""


@pytest.mark.heavy
def test_savedmodel_serves_logits_at_the_input_size(tmp_path):
    model = kfs.segmenter(pooled_net(classes=3), num_classes=3, keep_classes=[0, 1, 2])
    result = kfs.export_savedmodel(model, tmp_path / "seg", options=kfs.ExportOptions(check_sizes=[(17, 17), (33, 41)]))
    assert all(check.passed for check in result.checks)
    shown = subprocess.run(
        [sys.executable, "-c", RELOAD, result.path], capture_output=True, text=True, timeout=300, check=True
    )
    assert shown.stdout.strip().splitlines()[-1] == "(1, 23, 19, 3)"


@pytest.mark.heavy
def test_onnx_export_matches_at_two_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    model = kfs.segmenter(pooled_net(classes=3), num_classes=3, keep_classes=[0, 1, 2])
    path = os.fspath(tmp_path / "seg.onnx")
    result = kfs.export_onnx(model, path, options=kfs.ExportOptions(check_sizes=[(17, 17), (33, 41)]))
    assert all(check.passed for check in result.checks)
    import onnxruntime

    session = onnxruntime.InferenceSession(path)
    (output,) = session.run(None, {session.get_inputs()[0].name: random_images((1, 23, 19, 3))})
    assert output.shape == (1, 23, 19, 3)


def test_export_check_sizes_of_a_segmenter_come_from_its_cells():
    from keras_fcn_surgery.exporting.pipeline import resolve_check_sizes
    from keras_fcn_surgery.segmentation.predict import minimum_size

    model = kfs.segmenter(pooled_net(classes=3), num_classes=3)
    sizes = resolve_check_sizes(model, None)
    assert sizes[0] == minimum_size(model) and sizes[1][0] > sizes[0][0] and sizes[1][1] > sizes[0][1]
    for height, width in sizes:
        assert tuple(model(random_images((1, height, width, 3))).shape) == (1, height, width, 3)
