"""mtcnn 1.0.0's trained RNet and ONet, as the package ships them: subclassed models with a Permute before the
Flatten and a PReLU between Dense layers. They convert with no rewrite by hand, and their face maps find the face
mtcnn's own detector finds (issue 23)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import skimage.transform

import keras_fcn_surgery as kfs

pytest.importorskip("mtcnn")  # in the test extra; CI checks it imports (.ci/run)

from mtcnn import MTCNN  # noqa: E402
from mtcnn.stages.stage_onet import StageONet  # noqa: E402
from mtcnn.stages.stage_rnet import StageRNet  # noqa: E402

# The side of the astronaut's face box (mtcnn finds 83 x 107 pixels) that the nets should see as their input.
FACE_SIDE = 95


@pytest.fixture(scope="module")
def face_box():
    faces = MTCNN(device="CPU:0").detect_faces(skimage.data.astronaut())
    assert len(faces) == 1
    return faces[0]["box"]  # x, y, width, height


@pytest.mark.parametrize("stage, size, outputs", [(StageRNet, 24, 2), (StageONet, 48, 3)])
def test_mtcnn_nets_convert_and_their_face_maps_peak_inside_mtcnns_face_box(stage, size, outputs, face_box):
    model = stage()._model
    fcn = kfs.convert(model)  # verified against the subclassed model at its input size
    assert len(fcn.outputs) == outputs
    scale = size / FACE_SIDE
    image = skimage.data.astronaut().astype("float32")
    small = skimage.transform.rescale(image, scale, channel_axis=-1, preserve_range=True, anti_aliasing=True)
    face = np.asarray(fcn((small[None] - 127.5) / 128)[-1])[0, ..., 1]  # the softmax output: P(face)
    i, j = np.unravel_index(np.argmax(face), face.shape)
    top, left, bottom, right = kfs.geometry(fcn).input_box(i, j, small.shape[:2])
    centre_y, centre_x = (top + bottom) / 2 / scale, (left + right) / 2 / scale
    x, y, box_width, box_height = face_box
    assert face.max() > 0.9
    assert x <= centre_x <= x + box_width and y <= centre_y <= y + box_height


def test_mtcnn_rnet_converts_from_the_command_line(tmp_path):
    model = StageRNet()._model
    source = tmp_path / "rnet.keras"
    model.save(source)
    objects = tmp_path / "mtcnn_nets.py"
    objects.write_text("from mtcnn.network.rnet import RNet\n\nCUSTOM_OBJECTS = {'RNet': RNet}\n")
    target = tmp_path / "rnet_fcn.keras"
    result = subprocess.run(
        [sys.executable, "-m", "keras_fcn_surgery.cli", "convert", str(source), str(target)]
        + ["--custom-objects", str(objects)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "folded into the Dense after the Flatten" in result.stdout
    assert ": equal" in result.stdout
    assert target.exists()


def test_mtcnn_onet_three_maps_come_out_of_predict_map_predict_and_a_savedmodel(tmp_path):
    from PIL import Image

    model = StageONet()._model
    fcn = kfs.as_fcn(model)
    names = list(kfs.fcn_spec(fcn).names)
    assert len(names) == 3 and kfs.fcn_spec(fcn).outputs[2].activation == "softmax"
    image = skimage.data.astronaut()[40:360:2, 100:420:2].astype("float32")  # 160 x 160
    pixels = (image - 127.5) / 128
    whole = kfs.predict_map(fcn, pixels)
    assert list(whole) == names and whole.pick()[0] == names[2]
    for staged in (False, True):
        tiled = kfs.predict_map(fcn, pixels, tile=96, staged=staged)
        for name in names:
            scale = np.abs(whole[name]).max()
            assert np.abs(tiled[name] - whole[name]).max() <= 1e-5 * scale, (staged, name)
    Image.fromarray(image.astype(np.uint8)).save(tmp_path / "face.png")
    prepare = lambda p: (p - 127.5) / 128  # noqa: E731
    with pytest.warns(kfs.InexactMapWarning, match="'same'|`same`"):  # ONet pools with `same` padding
        summary = kfs.predict_images(model, [tmp_path / "face.png"], tmp_path / "maps", preprocess=prepare)
    assert summary.ok, summary.failed
    assert summary.results[0].certificate.startswith(f"certificate of '{names[2]}':")
    with np.load(tmp_path / "maps" / "face.npz") as stored:
        assert list(stored["outputs"]) == names
        for name in names:
            np.testing.assert_allclose(stored[name], whole[name], atol=1e-5 * np.abs(whole[name]).max())
    result = kfs.export_savedmodel(model, tmp_path / "onet", bytes_signature=False)
    assert [check.compared for check in result.checks] == [f"output '{name}'" for name in names] * 2
