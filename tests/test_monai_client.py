"""A real PyTorch client (issue 40): MONAI's sliding-window inference with the exported `.pt2` FCN as its
predictor, in a process where Keras and TensorFlow cannot be imported, equals our map where both are defined.

docs/pytorch.md shows the same (under `-m heavy`); this one runs in the default suite, with a last batch of one
window (the program's batch is dynamic).
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from models import valid_gap_cnn

import keras_fcn_surgery as kfs

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("monai") is None:
    pytest.skip("the torch extra and monai are not installed", allow_module_level=True)

CLIENT = """
import importlib.machinery, sys

class NoKeras:  # importing Keras or TensorFlow fails here (MONAI would load TensorFlow through tensorboard)
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] in ("keras", "tensorflow") else None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

sys.meta_path.insert(0, NoKeras())
import numpy as np, torch
from monai.inferers import sliding_window_inference

program = torch.export.load(sys.argv[1]).module()
image = torch.from_numpy(np.load(sys.argv[2])).permute(2, 0, 1)[None]
roi = int(sys.argv[4])
with torch.inference_mode():
    scores = sliding_window_inference(
        image, roi_size=(roi, roi), sw_batch_size=5, overlap=0,
        predictor=lambda x: program(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
    )
np.save(sys.argv[3], scores[0].permute(1, 2, 0).numpy())
print("keras imported:", [name for name in sys.modules if name.split(".")[0] in ("keras", "tensorflow")])
"""


def test_monai_sliding_window_over_the_torch_export_equals_our_map(tmp_path):
    classifier = valid_gap_cnn(softmax=False)  # valid padding, stride 4: a window's cells are the image's
    grid = kfs.geometry(kfs.as_fcn(classifier))
    assert grid.stride == (4, 4)
    roi, cells = 48, grid.output_size((48, 48))[0]  # 7 cells a window, a window every 12 cells
    kfs.export(
        classifier,
        tmp_path / "fcn.pt2",
        format="torch",
        trace_size=(roi, roi),
        options=kfs.ExportOptions(check_sizes=[(roi, roi), (roi + 8, roi + 4)]),
    )
    image = np.random.default_rng(40).uniform(0, 1, (2 * roi, 3 * roi, 3)).astype("float32")  # 6 windows: 5 + 1
    np.save(tmp_path / "image.npy", image)
    done = subprocess.run(
        [sys.executable, "-I", "-c", CLIENT, *(str(tmp_path / f) for f in ("fcn.pt2", "image.npy", "monai.npy")),
         str(roi)],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "keras imported: []" in done.stdout, done.stdout
    monai = np.load(tmp_path / "monai.npy")
    ours = kfs.predict_map(classifier, image)
    step = roi // grid.stride[0]
    rows = [step * i + a for i in range(2) for a in range(cells)]
    cols = [step * j + b for j in range(3) for b in range(cells)]
    assert monai.shape == (2 * cells, 3 * cells, 4) and ours.shape[0] > rows[-1] and ours.shape[1] > cols[-1]
    np.testing.assert_allclose(monai, ours[np.ix_(rows, cols)], rtol=0, atol=1e-5 * np.abs(ours).max())
