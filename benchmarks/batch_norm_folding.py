"""bfloat16 passes with BatchNormalizations folded into the convolutions they read, against unfolded (issue 39).

A bfloat16 pass runs a copy of the FCN whose BatchNormalizations that read a
linear convolution's sole output are folded into its weights
(`engines.policy_clone`, `graph.batch_norm_folds`). ``--precisions
float32,bfloat16`` also times float32 passes run on a folded copy, which the
library does not do (a float32 pass runs the model itself, its weights as
they are now). For each model
(``weights=None``: nothing downloaded; moving statistics made non-trivial so
that the fold has something to fold) and precision, two FCNs of the same
classifier run side by side: one whose passes fold (the library as it is), one
whose passes run the FCN as converted (`batch_norm_folds` finding nothing to
fold in that FCN and its stages only). Each runs once untimed (tracing),
then round after round in turn, best of the rounds kept. Printed: seconds,
unfolded/folded, and each map's largest difference from the float32 map of the
model itself, relative to that map's scale (random weights: a difference of
the order of the precision's tolerance, 6e-2 at bfloat16, is the precision's).

Run (a few minutes on 2 CPU cores)::

    python benchmarks/batch_norm_folding.py [--size 1024] [--rounds 3] [--models resnet50,efficientnetb0,mobilenetv2]
        [--precisions bfloat16,float32]
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

MODELS = {
    "resnet50": lambda: keras.applications.ResNet50(weights=None),
    "efficientnetb0": lambda: keras.applications.EfficientNetB0(weights=None),
    "mobilenetv2": lambda: keras.applications.MobileNetV2(weights=None),
}


def with_statistics(classifier, seed: int = 0):
    """Moving means and variances, gammas and betas away from their initial 0 and 1."""
    rng = np.random.default_rng(seed)
    for layer in classifier.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            values = []
            for weight in layer.weights:
                size = tuple(weight.shape)
                if "variance" in weight.path or "gamma" in weight.path:
                    values.append(rng.uniform(0.5, 2.0, size))
                else:
                    values.append(rng.normal(0.0, 0.1, size))
            layer.set_weights(values)
    return classifier


def fcn_of(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: "the check proves little"
        return kfs.convert(with_statistics(MODELS[name]()), verify=False)


def unfolding(fcn):
    """`graph.batch_norm_folds` as if nothing folded, for ``fcn`` and its stage models (named after it) only."""
    folds = engines.batch_norm_folds

    def batch_norm_folds(model):
        return {} if model.name.startswith(fcn.name) else folds(model)

    return batch_norm_folds


def float32_folded(fcn):
    """The float32 passes of ``fcn`` on a folded copy (`engines.policy_copy` at "float32"), for this benchmark."""
    traced = engines._traced

    def _traced(model, jit_compile, precision):
        if precision is None and model.name.startswith(fcn.name):
            precision = "float32"
        return traced(model, jit_compile, precision)

    return _traced


def run_model(name: str, size: int, rounds: int, precisions) -> None:
    folded_fcn, unfolded_fcn = fcn_of(name), fcn_of(name)
    unfolded_fcn.name = f"unfolded_{name}"
    unfolded_fcn.set_weights(folded_fcn.get_weights())
    engines.batch_norm_folds = unfolding(unfolded_fcn)
    engines._traced = float32_folded(folded_fcn)
    image = np.random.default_rng(0).uniform(-1, 1, (size, size, 3)).astype("float32")
    reference = kfs.predict_map(unfolded_fcn, image, engine="tf")
    scale = float(np.abs(reference).max())
    for precision in precisions:
        runs = {"folded": folded_fcn, "unfolded": unfolded_fcn}
        maps = {key: kfs.predict_map(fcn, image, engine="tf", precision=precision) for key, fcn in runs.items()}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(rounds):
            for key, fcn in runs.items():
                start = time.perf_counter()
                kfs.predict_map(fcn, image, engine="tf", precision=precision)
                best[key] = min(best[key], time.perf_counter() - start)
        apart = {key: float(np.abs(found - reference).max()) / scale for key, found in maps.items()}
        print(
            f"{name} {size}x{size} {precision} (tf): unfolded {best['unfolded']:.3f} s, folded {best['folded']:.3f} s,"
            f" {best['unfolded'] / best['folded']:.2f}x; from the float32 map: unfolded {apart['unfolded']:.1e},"
            f" folded {apart['folded']:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="resnet50,efficientnetb0,mobilenetv2")
    parser.add_argument("--precisions", default="bfloat16")
    args = parser.parse_args()
    for name in args.models.split(","):
        run_model(name, args.size, args.rounds, args.precisions.split(","))


if __name__ == "__main__":
    main()
