"""Op graphs of a classifier and its FCN for TensorBoard, with the conversion plan as text.

Keras 3's TensorBoard callback writes no op graph, so the forward pass is
traced with `tf.function` and its graph written with `tf.summary.graph`.
The event files are written by TensorFlow alone (the text summary as
TensorBoard's text plugin reads it, without importing `tensorboard`, which
TensorFlow 2.21 no longer installs); viewing them takes TensorBoard:
``pip install "keras-fcn-surgery[tensorboard]"`` (or ``pip install tensorboard``).
"""

from __future__ import annotations

import os

from keras_fcn_surgery.errors import ConversionError, ModelFileError, first_line
from keras_fcn_surgery.graph import input_name
from keras_fcn_surgery.saving.atomic import make_temporary_dir, remove_stale_temporaries, remove_tree

SOURCE_RUN = "source"
FCN_RUN = "fcn"
PLAN_TAG = "conversion_plan"
# TensorBoard's text plugin: its name in a summary's metadata (the plugin's content, version 0, serialises empty).
TEXT_PLUGIN = "text"


def log_graphs(
    model, logdir, *, head: str = "window", input_size=None, custom_objects=None, overwrite: bool = False
) -> tuple[str, str]:
    """Write the op graphs of a classifier and of its converted FCN as two TensorBoard runs.

    ``<logdir>/source`` holds the classifier's graph traced at its own input
    shape; ``<logdir>/fcn`` holds the FCN's graph traced with free height and
    width, and the conversion plan table as the text summary
    ``conversion_plan``. ``tensorboard --logdir <logdir>`` shows both graphs
    side by side (Graphs tab, run selector) and the plan (Text tab).

    Args:
        model: a classifier, or a path to a ``.keras``/``.h5`` file.
        logdir: the folder for the two runs; created when missing.
        head: ``"window"`` or ``"dense"``, passed to `convert`.
        input_size: ``(H, W)`` the classifier was trained at, when it accepts
            any size.
        custom_objects: passed to `keras.models.load_model` for a path.
        overwrite: replace the event files of earlier runs in those two
            folders. Without it, a folder that already holds event files is
            refused: TensorBoard would show both graphs mixed in one run.

    Returns:
        The two run folders, ``(source, fcn)``.

    Raises:
        ConversionError: when the model cannot be converted.
        ModelFileError: when ``logdir`` cannot be written, or already holds
            these runs and ``overwrite`` is False.
    """
    from keras_fcn_surgery.saving.loading import as_model
    from keras_fcn_surgery.surgery.convert import convert, plan

    model = as_model(model, custom_objects, error_class=ConversionError)
    logdir = os.fspath(logdir)
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise ModelFileError(f"Log folder '{logdir}' is a file. Give a folder for the TensorBoard runs.")
    table = plan(model, head=head, input_size=input_size)
    fcn = convert(model, head=head, input_size=input_size, verify=False)
    runs = (os.path.join(logdir, SOURCE_RUN), os.path.join(logdir, FCN_RUN))
    earlier = [path for run in runs for path in _event_files(run)]
    if earlier and not overwrite:
        raise ModelFileError(
            f"Log folder '{logdir}' already holds the runs '{SOURCE_RUN}' and '{FCN_RUN}' "
            f"({len(earlier)} event files); pass overwrite=True (CLI: --overwrite) to replace them, "
            "or choose another folder."
        )
    graphs = (traced_graph(model), traced_graph(fcn))
    created = not os.path.exists(logdir)
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as error:
        raise ModelFileError(f"Cannot create log folder '{logdir}': {error.strerror or error}.") from error
    remove_stale_temporaries(logdir)
    work = make_temporary_dir(logdir, stem="runs", what="log folder")
    try:
        # Both runs are written in a hidden folder first and moved into place only when complete: a failure
        # leaves no run behind (and an earlier one untouched).
        written = [os.path.join(work, os.path.basename(run)) for run in runs]
        _write_run(written[0], graphs[0])
        _write_run(written[1], graphs[1], text={PLAN_TAG: plan_markdown(table)})
        for path in earlier:
            os.remove(path)
        for new, run in zip(written, runs):
            os.makedirs(run, exist_ok=True)
            for name in os.listdir(new):
                os.replace(os.path.join(new, name), os.path.join(run, name))
    except BaseException:
        remove_tree(work)
        if created:
            remove_tree(logdir)
        raise
    remove_tree(work)
    return runs


def traced_graph(model):
    """The `tf.Graph` of ``model``'s inference forward pass, traced at its input shape with a free batch."""
    import tensorflow as tf

    specs = [tf.TensorSpec((None, *tuple(t.shape)[1:]), t.dtype, name=input_name(t, "input")) for t in model.inputs]

    def forward(*inputs):
        return model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)

    return tf.function(forward).get_concrete_function(*specs).graph


def plan_markdown(conversion_plan) -> str:
    """The plan table as a fenced code block, so TensorBoard's Markdown keeps its alignment."""
    header = (
        f"{conversion_plan.model_name}: input {conversion_plan.input_size}, "
        f"{conversion_plan.data_format}, head '{conversion_plan.head}'"
    )
    return f"{header}\n\n```\n{conversion_plan.table()}\n```\n"


def _event_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.startswith("events.out.tfevents")]


def _write_run(folder: str, graph, text=None) -> None:
    import tensorflow as tf

    try:
        writer = tf.summary.create_file_writer(folder)
    except (OSError, tf.errors.OpError) as error:
        raise ModelFileError(f"Cannot write TensorBoard run '{folder}': {first_line(str(error))}.") from error
    try:
        with writer.as_default():
            tf.summary.graph(graph)
            for tag, value in (text or {}).items():
                _write_text(tf, tag, value)
        writer.flush()
    finally:
        writer.close()


def _write_text(tf, tag: str, value: str) -> None:
    """What ``tf.summary.text`` writes (a string tensor for TensorBoard's text plugin), without TensorBoard."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=TEXT_PLUGIN))
    tf.summary.write(tag, tf.constant(value, dtype=tf.string), step=0, metadata=metadata)
