"""Export a Keras classifier (converted to an FCN) as a TensorFlow Serving SavedModel.

    python tools/export_savedmodel.py --model classifier.keras --export_dir /models/fcn \
        [--version 3] [--head window|dense] [--preprocess none|caffe|tf|torch] [--overwrite] [--noconvert]
        [--format savedmodel|onnx|tflite|openvino] [--quantize float16|dynamic] [--exporter streamed|keras]

A thin wrapper over `keras-fcn-surgery export` (the same code, output and
exit codes). Writes <export_dir>/<version>/ (next version by default) with the
signatures serving_default (float32 model-ready images [-1, -1, -1, C] ->
scores), serving_pixels (raw 0..255 pixels, --preprocess applied; with a
--preprocess) and serving_bytes (encoded JPEG/PNG strings of one size per
request -> scores), after reloading it in a fresh TensorFlow process and
checking it against Keras at two sizes.

Exit codes: 0 written, 1 conversion or check failure, 2 file or usage error,
130/143 interrupted by SIGINT/SIGTERM (nothing left behind).
"""

from __future__ import annotations

import argparse

from absl import app, flags

from keras_fcn_surgery.commands.absl_tool import flags_parser, run_tool
from keras_fcn_surgery.options import EXPORT_FORMATS, HEADS, ONNX_EXPORTERS, PREPROCESS_MODES, QUANTIZE_MODES

flags.DEFINE_string("model", None, "Source model file (.keras or .h5).")
flags.DEFINE_string("export_dir", None, "SavedModel base folder; versions are its numbered subfolders.")
flags.DEFINE_integer("version", None, "Version folder to write (default: the next integer).", lower_bound=0)
flags.DEFINE_enum("head", "window", list(HEADS), "What a global-pooling head becomes.")
flags.DEFINE_enum("preprocess", "none", list(PREPROCESS_MODES), "Preprocessing serving_pixels and serving_bytes apply.")
flags.DEFINE_bool("overwrite", False, "Replace an existing version folder (or file).")
flags.DEFINE_enum(
    "format", "savedmodel", list(EXPORT_FORMATS), "savedmodel, onnx, tflite (export_dir: a file), openvino (a folder)."
)
flags.DEFINE_enum("quantize", None, [m for m in QUANTIZE_MODES if m], "tflite only: float16 or dynamic.")
flags.DEFINE_enum("exporter", None, list(ONNX_EXPORTERS), "onnx only: streamed (default) or keras (Keras's exporter).")
flags.DEFINE_enum(
    "precision", "float32", ["float32", "bfloat16", "float16"], "What the written network computes at (as --precision)."
)
flags.DEFINE_bool("convert", True, "Convert the model first; --noconvert exports an FCN file as it is.")
flags.DEFINE_string("input_size", None, "Original input size HxW, for a classifier that takes any size.")
flags.mark_flags_as_required(["model", "export_dir"])

FLAGS = flags.FLAGS


def main(argv) -> int:
    def export(input_size):
        from keras_fcn_surgery.commands import export as export_command

        # The CLI's own `export` subcommand does the work: same checks, output and guarantees.
        args = argparse.Namespace(
            model=FLAGS.model,
            export_dir=FLAGS.export_dir,
            version=FLAGS.version,
            head=FLAGS.head,
            preprocess=FLAGS.preprocess,
            overwrite=FLAGS.overwrite,
            format=FLAGS.format,
            quantize=FLAGS.quantize,
            exporter=FLAGS.exporter,
            precision=FLAGS.precision,
            no_convert=not FLAGS.convert,
            input_size=input_size,
            stride=None,  # the CLI's --stride (an FCN at a finer stride): `keras-fcn-surgery export --stride`
        )
        return export_command.run(args)

    return run_tool(argv, export, input_size_flag=FLAGS.input_size)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(FLAGS))
