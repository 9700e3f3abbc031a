"""The export checks of OpenVINO and both ONNX writers on keras.applications models: difference from Keras, time.

Each model (random weights, nothing downloaded) is converted once and
exported as OpenVINO IR, ONNX by Keras's exporter and ONNX by the streamed
writer; each export is checked by `kfs.export` at its two default sizes (the
original and seven output strides more). Prints the largest relative
difference of the logits from Keras at each size and the time of the whole
export (write, fresh-process check, publish). Under ``KERAS_BACKEND=jax`` the
files are written in a TensorFlow process and checked against JAX.

    python benchmarks/exports.py [--only resnet50@64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

CASES = {
    "mobilenetv2@96": ("MobileNetV2", dict(alpha=0.35)),
    "resnet50@64": ("ResNet50", {}),
}
EXPORTS = (("openvino", {}), ("onnx", {"exporter": "keras"}), ("onnx", {"exporter": "streamed"}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(CASES), help="run only these cases")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import keras_fcn_surgery as kfs

    print(f"backend: {keras.backend.backend()}")
    print("| model | export | check sizes | max rel diff (logits) | time |")
    print("|---|---|---|---|---|")
    for case in args.only or CASES:
        constructor, options = CASES[case]
        size = int(case.split("@")[1])
        keras.utils.set_random_seed(0)
        classifier = getattr(keras.applications, constructor)(input_shape=(size, size, 3), weights=None, **options)
        fcn = kfs.as_fcn(classifier)
        with tempfile.TemporaryDirectory() as folder:
            for n, (format, export_options) in enumerate(EXPORTS):
                path = os.path.join(folder, f"export{n}" + (".onnx" if format == "onnx" else ""))
                started = time.perf_counter()
                result = kfs.export(
                    fcn, path, format=format, options=kfs.ExportOptions(input_size=(size, size)), **export_options
                )
                seconds = time.perf_counter() - started
                name = format + (f" ({export_options['exporter']})" if export_options else "")
                sizes = ", ".join(f"{c.input_shape[1]}x{c.input_shape[2]}" for c in result.checks)
                diffs = ", ".join(f"{c.max_rel_diff:.2g}" for c in result.checks)
                print(f"| {case} | {name} | {sizes} | {diffs} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
