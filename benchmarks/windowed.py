"""Windowed maps (issue 24) against the batched sliding window, side by side in one process.

For a ViT-B/16-sized keras-hub classifier (224 x 224, 12 layers of width 768,
random weights) and keras.applications' EfficientNetB0 (random weights), on
one image: the time of ``predict_map(model, image, stride=s,
method="windowed")`` (the exact map: a shared prefix once, the tail on every
window) and of ``sliding_window_predict(model, image, s)`` (the classifier on
every crop, batched), measured alternately, ``--rounds`` times each after a
warm-up on a small image (tracing). Printed per case: the windows, the split,
the share of the sliding window's multiply-accumulates the shared prefix
saves (`WindowedPlan.saved`), both times (best round) and the speedup, and the
largest difference between the two maps relative to their scale.

The issue's cases: EfficientNetB0 at stride 32 and the ViT at strides 16 and
64, on a 1024 x 1024 image. The ViT at stride 16 runs 2601 windows of 17.6
GMAC each, twice: about an hour on 2 CPU cores, so by default it runs on a
smaller image (``--vit16-size``, 416: 169 windows); pass ``--vit16-size 1024``
for the full case.

Run::

    python benchmarks/windowed.py [--size 1024] [--vit16-size 416] [--rounds 1] [--cases vit64,vit16,effnet32]

Measured (2026-12-02, 2 cores shared with other jobs, TensorFlow 2.21 CPU,
``--size 1024 --vit16-size 320 --rounds 2``; best of 2, alternating; maps
equal to the sliding window's bit for bit):

| case | windows | split (stride) | MACs saved | windowed | sliding | speedup |
|---|---|---|---|---|---|---|
| EfficientNetB0, 1024^2, stride 32 | 676 | block1a_activation (2), 6-px strips | 3.2% | 22.0 s | 22.6 s | 1.03x |
| ViT-B/16, 1024^2, stride 64 | 169 | patch_embedding (16), no strips | 0.9% | 52.3 s | 51.4 s | 0.98x |
| ViT-B/16, 320^2, stride 16 | 49 | patch_embedding (16), no strips | 1.0% | 14.9 s | 15.5 s | 1.04x |

What the prefix can share is small in both networks (a ViT-B/16's patch
embedding is 0.7% of its work; EfficientNetB0's stem before the first
squeeze-and-excitation block about 3%), so the windowed map costs what the
sliding window costs, within the noise of a shared machine: its gain is
exactness and the `predict_map` path (tiles, masks, `out=`, certificates),
not speed. The ViT at stride 16 on 1024^2 (2601 windows, about 46 TMAC per
map) would take about an hour here.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402


def vit_b16():
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(224, 224, 3), patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072
    )
    return keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=1000)


def efficientnet_b0():
    return keras.applications.EfficientNetB0(weights=None, classifier_activation=None)


CASES = {
    "vit64": ("ViT-B/16", vit_b16, 64),
    "vit16": ("ViT-B/16", vit_b16, 16),
    "effnet32": ("EfficientNetB0", efficientnet_b0, 32),
}


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--vit16-size", type=int, default=416, help="image side for the ViT at stride 16")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds of each method, alternating")
    parser.add_argument("--cases", default="effnet32,vit64,vit16", help=f"comma-separated among {', '.join(CASES)}")
    args = parser.parse_args()
    models: dict = {}
    rng = np.random.default_rng(0)
    for case in args.cases.split(","):
        label, build, stride = CASES[case]
        if label not in models:
            keras.utils.set_random_seed(0)
            models[label] = build()
        model = models[label]
        side = args.vit16_size if case == "vit16" else args.size
        image = rng.uniform(0, 255, (side, side, 3)).astype("float32")
        if label == "ViT-B/16":
            image = image / 127.5 - 1  # the classifier takes preprocessed pixels
        plan = kfs.plan_prediction(model, image.shape[:2], stride=stride, method="windowed")
        warm = image[: 224 + stride, : 224 + stride]  # traces both methods' functions
        kfs.predict_map(model, warm, stride=stride, method="windowed")
        kfs.sliding_window_predict(model, warm, stride, batch_size=plan.batch_size)
        windowed_times, sliding_times = [], []
        for _ in range(args.rounds):
            seconds, dense = timed(lambda: kfs.predict_map(model, image, stride=stride, method="windowed"))
            windowed_times.append(seconds)
            seconds, sliding = timed(
                lambda: kfs.sliding_window_predict(model, image, stride, batch_size=plan.batch_size)
            )
            sliding_times.append(seconds)
        scale = float(np.max(np.abs(sliding)))
        difference = float(np.max(np.abs(dense - sliding))) / scale
        best_windowed, best_sliding = min(windowed_times), min(sliding_times)
        print(
            f"{label} {side}x{side} stride {stride}: {plan.windows} windows, split after '{plan.split}' "
            f"(stride {plan.prefix_stride[0]}), strips {', '.join(plan.strips) or 'none'}; "
            f"{plan.macs / 1e9:.0f} GMAC vs {plan.sliding_macs / 1e9:.0f} GMAC sliding: {plan.saved:.2%} saved; "
            f"windowed {best_windowed:.1f} s, sliding window {best_sliding:.1f} s: "
            f"speedup {best_sliding / best_windowed:.2f}x; max rel diff {difference:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
