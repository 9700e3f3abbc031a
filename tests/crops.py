"""An independent reference for windowed maps: crops cut with plain numpy indexing, run through `model.predict`.

It shares nothing with the package (not `runner.pair`, `read_tile`, the layout
code or `sliding_window_predict`): a bug there that `sliding_window_predict`
would share (a swapped stride pair, a row/column mix-up) cannot hide here.
"""

import numpy as np


def crop_scores(model, image, stride, channels_first=False):
    """The classifier on the crop at ``(i * s_h, j * s_w)`` for every i, j where it fits: ``(H', W', K)``.

    ``stride`` is ``s`` or ``(s_h, s_w)``; ``image`` is ``(H, W, C)`` (``(C, H, W)`` with ``channels_first``, and
    so is the model's input). The map is channels last either way.
    """
    s_h, s_w = (stride, stride) if np.isscalar(stride) else (int(stride[0]), int(stride[1]))
    shape = tuple(model.inputs[0].shape)
    h, w = shape[2:4] if channels_first else shape[1:3]
    height, width = image.shape[1:] if channels_first else image.shape[:2]
    rows, cols = (height - h) // s_h + 1, (width - w) // s_w + 1
    crops = []
    for i in range(rows):
        for j in range(cols):
            top, left = i * s_h, j * s_w
            if channels_first:
                crops.append(image[:, top : top + h, left : left + w])
            else:
                crops.append(image[top : top + h, left : left + w, :])
    scores = np.asarray(model.predict(np.stack(crops), batch_size=64, verbose=0))
    return scores.reshape(rows, cols, -1)
