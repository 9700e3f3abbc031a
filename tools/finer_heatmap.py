"""The docs' picture of maps finer than the network's stride: a face map of a real photo at S, S/2 and S/4.

mtcnn's RNet (trained weights, shipped in the `mtcnn` package; a 24 x 24 face
classifier of stride S = 4) on `skimage.data.astronaut()` scaled so that the
face is about one window. P(face), drawn by `kfs.heatmap` over the photo:

- at S = 4: its FCN, `predict_map(rnet, image)`;
- at S/2 = 2: its FCN à trous, `predict_map(rnet, image, stride=2)`;
- at S/4 = 1: the classifier on every crop, `sliding_window_predict(rnet,
  image, 1)`: RNet's first max pooling pads `same` with a stride, which cannot
  be removed exactly, so the plan has no à trous map at 1 (it says so by name).

Run::

    python tools/finer_heatmap.py [docs/images/finer-strides.png]

A few seconds of CPU; `tests/test_finer_picture.py` runs it.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402
from keras_fcn_surgery.grid.geometry import WindowGrid  # noqa: E402

OUTPUT = os.path.join(os.path.dirname(__file__), "..", "docs", "images", "finer-strides.png")
FACE_SIDE = 95  # the astronaut's face box (mtcnn finds 83 x 107 pixels) as RNet's 24-pixel window
SCALE = 3  # display magnification


def face_classifier() -> keras.Model:
    """mtcnn's RNet as a classifier of one output: P(face) and P(not face) of a 24 x 24 crop."""
    import warnings

    from mtcnn.stages.stage_rnet import StageRNet

    from keras_fcn_surgery.graph import traced_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = traced_model(StageRNet()._model)  # the subclassed model's functional twin, same layers
    return keras.Model(twin.inputs[0], twin.outputs[1], name="rnet_face")


def photo() -> np.ndarray:
    import skimage.data
    import skimage.transform

    image = skimage.data.astronaut().astype("float32")
    return skimage.transform.rescale(image, 24 / FACE_SIDE, channel_axis=-1, preserve_range=True, anti_aliasing=True)


def panels(classifier, image) -> list[tuple[str, np.ndarray, object]]:
    """``(caption, map, grid)`` at S, S/2 (à trous) and S/4 (every crop)."""
    pixels = (image - 127.5) / 128  # mtcnn's preprocessing
    coarse = kfs.prepare(classifier)
    fine = kfs.prepare(classifier, stride=2)
    assert fine.method == "fcn"  # à trous
    every = np.asarray(kfs.sliding_window_predict(classifier, pixels, 1))
    stride = kfs.geometry(coarse.runnable).stride[0]
    return [
        (f"stride {stride} (the FCN)", coarse.map(pixels), coarse.grid),
        ("stride 2 (a trous)", fine.map(pixels), fine.grid),
        ("stride 1 (every crop)", every, WindowGrid((1, 1), (24, 24), image.shape[:2])),
    ]


def picture(image, maps) -> Image.Image:
    """The probability panels of `kfs.heatmap` side by side, each captioned."""
    width = image.shape[1] * SCALE
    pieces = []
    for caption, scores, grid in maps:
        drawn = kfs.heatmap(image.astype("uint8"), scores, grid, 1, style=kfs.HeatmapStyle(scale=SCALE)).crop(
            (0, 0, width, image.shape[0] * SCALE)
        )
        framed = Image.new("RGB", (width, drawn.height + 22), "white")
        framed.paste(drawn, (0, 22))
        ImageDraw.Draw(framed).text(
            (4, 4), f"P(face), {caption}: {scores.shape[0]}x{scores.shape[1]} cells", fill="black"
        )
        pieces.append(framed)
    gap = 8
    out = Image.new("RGB", (len(pieces) * (width + gap) - gap, pieces[0].height), "white")
    for n, piece in enumerate(pieces):
        out.paste(piece, (n * (width + gap), 0))
    return out


def main(argv=None) -> int:
    path = (argv or sys.argv[1:] or [OUTPUT])[0]
    image = photo()
    made = picture(image, panels(face_classifier(), image))
    made.save(path, optimize=True)
    print(f"wrote {path}: {made.width}x{made.height}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
