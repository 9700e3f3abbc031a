"""Peak resident memory of an ONNX export, above the loaded model, in units of the model's weight bytes.

    python benchmarks/onnx_memory.py [--model vgg16|caffenet] [--keep FILE]

Builds the model with random weights (``keras.applications.VGG16(weights=None)``:
nothing is downloaded), converts it and saves the FCN to a ``.keras`` file; a
fresh process then loads that file, notes its resident memory, exports the
ONNX file (``export_onnx(..., options=ExportOptions(convert=False))``) and reports its peak
resident memory (``ru_maxrss``) minus the memory after loading. (The fresh process that
checks the file with onnxruntime is not counted: a forked child's ru_maxrss
includes the parent's pages at fork time, so it cannot be read apart.)
Target (issue 14): export peak <= 3x the weight bytes.

Measured on 2 shared CPU cores, VGG16 as an FCN (528 MiB of weights):
before (tf2onnx on the frozen graph) the export process was killed by the
kernel's OOM killer at 17.2 GB resident; after (structure only through
tf2onnx, weights streamed): 834 MiB above the loaded model, 1.58x the
weights, 106 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MEASURE = r"""
import json, os, resource, sys, time
import numpy as np
import keras
import keras_fcn_surgery as kfs

def rss():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

fcn = kfs.load_model(sys.argv[1])
weights = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in fcn.weights)
size = int(sys.argv[3])
fcn(np.zeros((1, size, size, 3), "float32"))  # run it once, as a user who loaded it would have
import tensorflow, tf2onnx, onnx, onnxruntime  # noqa: E401 imports are not the export's memory
loaded = rss()
start = time.perf_counter()
as_is = kfs.ExportOptions(convert=False, input_size=(size, size))
result = kfs.export_onnx(fcn, sys.argv[2], options=as_is)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"weights": weights, "loaded_rss": loaded, "peak_rss": peak,
                  "seconds": seconds, "file_bytes": os.path.getsize(sys.argv[2]), "checks": str(result)}))
"""


SIZES = {"vgg16": 224, "caffenet": 227}


def build(name: str, path: str) -> None:
    import keras

    import keras_fcn_surgery as kfs

    if name == "vgg16":
        model = keras.applications.VGG16(weights=None)
    else:
        from keras_fcn_surgery.zoo import caffenet

        model = caffenet()
    kfs.convert(model, verify=False).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("vgg16", "caffenet"), default="vgg16")
    parser.add_argument("--keep", help="keep the ONNX file here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kfs-onnx-memory-") as scratch:
        source = os.path.join(scratch, "fcn.keras")
        build(args.model, source)
        target = args.keep or os.path.join(scratch, "fcn.onnx")
        process = subprocess.run(
            [sys.executable, "-c", MEASURE, source, target, str(SIZES[args.model])],
            capture_output=True,
            text=True,
            check=False,
        )
        if process.returncode != 0:
            sys.exit(process.stderr[-4000:])
        report = json.loads(process.stdout.strip().splitlines()[-1])
    mib = 1024 * 1024
    above = report["peak_rss"] - report["loaded_rss"]
    print(f"model {args.model}: weights {report['weights'] / mib:.0f} MiB, file {report['file_bytes'] / mib:.0f} MiB")
    print(f"RSS after loading {report['loaded_rss'] / mib:.0f} MiB, export peak {report['peak_rss'] / mib:.0f} MiB")
    print(f"peak above the loaded model: {above / mib:.0f} MiB = {above / report['weights']:.2f}x the weights")
    print(f"export time {report['seconds']:.1f} s")
    print(report["checks"])


if __name__ == "__main__":
    main()
