"""Maps at reduced precision against float32: time ratio, certificate figures, top-class agreement (issue 39).

For VGG16 and ResNet50 (``weights=None``: nothing downloaded) FCN maps of a
1024x1024 image (``--large``: 2048x2048 too), one whole-image `predict_map`
per call:

- float32: every execution `auto` chooses among (tf, xla, and blas where it
  runs), the best of them: what `auto` would pick at best;
- bfloat16, and float16 where the processor computes it natively (AVX512-FP16
  or AMX-FP16 on a CPU, any GPU): tf and xla under Keras's mixed policy, the
  best of them.

All configurations run once untimed (tracing, XLA compiling), then round after
round in a new random order each round (a slow spell of a shared machine falls
on all), best of the rounds kept. Printed: seconds, float32/precision ratio;
the reduced map's largest difference from the float32 map relative to its
scale and its top-class agreement with it; and the certificate
(`Mapper.certify`: 8 cells against the float32 classifier on their crops, at
the precision's tolerance, `certificate.precision_tolerance`).

Random weights say nothing about top classes that matter, so a small CNN is
trained here on scikit-learn's digits (8x8 upscaled to 16x16, a few epochs),
and its map of a mosaic of test digits at each precision is compared with its
float32 map: top-class agreement over every cell, and the certificate; then
the same CNN with a BatchNormalization after each convolution (folded into it
at bfloat16).

Run (minutes on 2 CPU cores; ``--quick`` uses 256x256 images and one round)::

    python benchmarks/precision.py [--rounds 3] [--large] [--models vgg16,resnet50] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fcn_surgery as kfs  # noqa: E402
from keras_fcn_surgery.inference import engines  # noqa: E402
from keras_fcn_surgery.inference.certificate import precision_tolerance  # noqa: E402

MODELS = {
    "vgg16": lambda: keras.applications.VGG16(weights=None),
    "resnet50": lambda: keras.applications.ResNet50(weights=None),
}


def native_float16() -> bool:
    """Whether float16 runs natively here: a GPU, or a CPU with AVX512-FP16 or AMX-FP16."""
    if engines.accelerators():
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_fp16" in flags or "amx_fp16" in flags


def precisions() -> list[str]:
    return ["bfloat16", "float16"] if native_float16() else ["bfloat16"]


def relative(reduced, full) -> tuple[float, float]:
    """Largest difference relative to the float32 map's scale, and the share of cells with its top class."""
    scale = float(np.abs(full).max())
    difference = float(np.abs(reduced - full).max()) / scale
    agreement = float(np.mean(np.argmax(reduced, -1) == np.argmax(full, -1)))
    return difference, agreement


def time_configs(fcn, image, configs: dict, rounds: int) -> dict:
    """Best seconds of each ``name -> (engine, precision)``: one untimed call each, then ``rounds`` rounds."""
    best = dict.fromkeys(configs, float("inf"))
    for engine, precision in configs.values():
        kfs.predict_map(fcn, image, engine=engine, precision=precision)
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for name in order.permutation(list(configs)):
            engine, precision = configs[name]
            start = time.perf_counter()
            kfs.predict_map(fcn, image, engine=engine, precision=precision)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def run_model(name: str, size: int, rounds: int) -> None:
    classifier = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: "the check proves little"
        mapper = kfs.prepare(classifier)
    fcn = mapper.runnable
    image = np.random.default_rng(0).uniform(-1, 1, (size, size, 3)).astype("float32")
    configs = {f"float32 {e}": (e, "float32") for e in engines.candidates(fcn)}
    for precision in precisions():
        configs.update({f"{precision} {e}": (e, precision) for e in engines.candidates(fcn, precision)})
    best = time_configs(fcn, image, configs, rounds)
    full_name = min((n for n in best if n.startswith("float32")), key=best.get)
    full = kfs.predict_map(fcn, image, engine=configs[full_name][0])
    auto = kfs.plan_prediction(fcn, (size, size), engine="auto").engine
    print(f"{name} at {size}x{size}: float32 best {full_name} {best[full_name]:.2f} s (auto picks {auto})")
    for key in sorted(best):
        print(f"    {key:18s} {best[key]:7.2f} s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = mapper.certify(image, full, 8)
    print(f"  float32 certificate (the reference: a same-padded net differs at crop edges): {reference}")
    for precision in precisions():
        own = min((n for n in best if n.startswith(precision)), key=best.get)
        reduced = kfs.predict_map(fcn, image, engine=configs[own][0], precision=precision)
        difference, agreement = relative(reduced, full)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an inexact certificate is printed below, not warned
            certificate = mapper.with_options(precision=precision).certify(image, reduced, 8)
        print(
            f"  {precision}: best {own} {best[own]:.2f} s, {best[full_name] / best[own]:.2f}x faster than float32; "
            f"map vs float32 map: max rel diff {difference:.2e} (tolerance {precision_tolerance(precision):g}), "
            f"top class equal in {100 * agreement:.1f}% of {full.shape[0] * full.shape[1]} cells"
        )
        print(f"    certificate: {certificate}")


def digits_cnn(batch_norm: bool):
    """Two convolutions and two Dense layers; with ``batch_norm``, each convolution followed by a
    BatchNormalization (folded into it at bfloat16, `engines.policy_clone`) before its ReLU."""
    layers = keras.layers

    def block(filters):
        if not batch_norm:
            return [layers.Conv2D(filters, 3, activation="relu")]
        return [layers.Conv2D(filters, 3, use_bias=False), layers.BatchNormalization(momentum=0.9), layers.ReLU()]

    x = keras.Input((16, 16, 1))
    y = x
    for layer in [*block(16), layers.MaxPooling2D(2), *block(32), layers.Flatten()]:
        y = layer(y)
    y = layers.Dense(10)(layers.Dense(64, activation="relu")(y))
    return keras.Model(x, y, name="digits_bn" if batch_norm else "digits")


def digits_agreement(epochs: int, batch_norm: bool = False) -> None:
    """A small CNN trained on scikit-learn's digits: its map of a mosaic of test digits at each precision."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.repeat(digits.images / 16.0, 2, axis=1), 2, axis=2)[..., None].astype("float32")
    labels = digits.target
    train, test = slice(0, 1500), slice(1500, None)
    keras.utils.set_random_seed(0)
    classifier = digits_cnn(batch_norm)
    classifier.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    # the moving statistics of a BatchNormalization need a few more epochs to settle
    epochs = epochs + 5 if batch_norm else epochs
    classifier.fit(images[train], labels[train], epochs=epochs, batch_size=32, verbose=0)
    accuracy = classifier.evaluate(images[test], labels[test], verbose=0)[1]
    # A 16 x 16 mosaic of test digits (256 x 256 pixels): the map has a cell every 2 pixels.
    tiles = images[test][:256].reshape(16, 16, 16, 16, 1)
    mosaic = tiles.transpose(0, 2, 1, 3, 4).reshape(256, 256, 1)
    mapper = kfs.prepare(classifier)
    full = mapper.map(mosaic)
    kind = "with BatchNormalization" if batch_norm else "without BatchNormalization"
    print(
        f"digits CNN {kind} ({epochs} epochs, test accuracy {accuracy:.3f}): map of a 256x256 mosaic, {full.shape[:2]}"
    )
    for precision in ["bfloat16", "float16"]:
        at = mapper.with_options(precision=precision)
        reduced = at.map(mosaic)
        difference, agreement = relative(reduced, full)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            certificate = at.certify(mosaic, reduced, 64)
        print(
            f"  {precision}: top class equal to float32's in {100 * agreement:.2f}% of "
            f"{full.shape[0] * full.shape[1]} cells; max rel diff {difference:.2e}"
        )
        print(f"    certificate (64 cells): {certificate}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="2048x2048 too")
    parser.add_argument("--quick", action="store_true", help="256x256 images, one round (a smoke run)")
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the digits CNN")
    args = parser.parse_args()
    sizes = [256] if args.quick else [1024, 2048] if args.large else [1024]
    rounds = 1 if args.quick else args.rounds
    print(f"backend {keras.backend.backend()}; precisions {['float32', *precisions()]}; rounds {rounds}")
    digits_agreement(args.epochs)
    digits_agreement(args.epochs, batch_norm=True)
    for size in sizes:
        for name in args.models.split(","):
            run_model(name, size, rounds)


if __name__ == "__main__":
    main()
