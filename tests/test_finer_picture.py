"""The docs' picture of finer maps (`tools/finer_heatmap.py`): it runs as the docs name it, on mtcnn's trained RNet
and a real photo, and its maps are what they claim: the à trous map at S/2 holds the FCN's map at its cells, and
the face is brightest where mtcnn's own detector puts it, at every stride."""

import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("mtcnn")
pytest.importorskip("skimage")

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "finer_heatmap.py")


def _tool():
    spec = importlib.util.spec_from_file_location("finer_heatmap", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_picture_of_finer_maps_is_made_by_its_script(tmp_path):
    from PIL import Image

    tool = _tool()
    image = tool.photo()
    maps = tool.panels(tool.face_classifier(), image)
    (_, coarse, coarse_grid), (_, fine, fine_grid), (_, every, _) = maps
    assert coarse_grid.stride == (4, 4) and fine_grid.stride == (2, 2)
    assert fine.shape[0] >= 2 * coarse.shape[0] - 1 and every.shape[0] == image.shape[0] - 24 + 1
    np.testing.assert_allclose(fine[::2, ::2][: coarse.shape[0], : coarse.shape[1]], coarse, atol=1e-5)
    centres = []
    for _, scores, grid in maps:
        i, j = np.unravel_index(np.argmax(scores[..., 1]), scores.shape[:2])
        top, left, bottom, right = grid.input_box(i, j, image.shape[:2])
        centres.append(((top + bottom) / 2, (left + right) / 2))
    # mtcnn's face box on the astronaut (x 182..265, y 64..171 of 512 px: `MTCNN().detect_faces`), scaled.
    scale = 24 / tool.FACE_SIDE
    for y, x in centres:
        assert 182 * scale <= x <= 265 * scale and 64 * scale <= y <= 171 * scale
    path = tmp_path / "finer.png"
    assert tool.main([str(path)]) == 0
    with Image.open(path) as made:
        assert made.size[0] > 3 * image.shape[1] * tool.SCALE and made.size[1] > image.shape[0] * tool.SCALE
