"""Op graphs of a classifier and its FCN for TensorBoard, with the conversion plan as text.

Keras 3's TensorBoard callback writes no op graph, so the forward pass is
traced with `tf.function` and its graph written with `tf.summary.graph`.
"""

from __future__ import annotations

import os

from keras_fcn_surgery.errors import ConversionError, ModelFileError, first_line
from keras_fcn_surgery.graph import input_name

SOURCE_RUN = "source"
FCN_RUN = "fcn"
PLAN_TAG = "conversion_plan"


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
    for path in earlier:
        os.remove(path)
    _write_run(runs[0], traced_graph(model))
    _write_run(runs[1], traced_graph(fcn), text={PLAN_TAG: plan_markdown(table)})
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
                tf.summary.text(tag, value, step=0)
        writer.flush()
    finally:
        writer.close()
