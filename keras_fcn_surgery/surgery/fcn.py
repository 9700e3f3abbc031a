"""The one way in: what a fully convolutional model is, and `as_fcn`, which turns what a user gives into one.

Every function and command that runs a network over images (`predict_map`,
`predict_images`, `heatmap`, the exports, `segmenter`) accepts a classifier,
an FCN, or the path of a file holding either, and goes through `as_fcn`.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.graph import model_facts, model_layout, output_names, producer_of, traced_model
from keras_fcn_surgery.layout import ImageSpec
from keras_fcn_surgery.saving.loading import as_model
from keras_fcn_surgery.surgery.convert import convert as convert_model
from keras_fcn_surgery.surgery.verify import check_trace
from keras_fcn_surgery.taxonomy import squashing_activation


@dataclass(frozen=True)
class MapOutput:
    """One output of a fully convolutional model: one map per image.

    Attributes:
        name: its name (`graph.output_names`): the key `predict_map` returns
            its map under when the model has several outputs.
        classes: channels of its map.
        activation: ``"softmax"`` or ``"sigmoid"`` when the map ends in one
            (its values are probabilities), else None.
    """

    name: str
    classes: int
    activation: str | None = None


@dataclass(frozen=True)
class FcnSpec(ImageSpec):
    """What a fully convolutional model takes (its `ImageSpec`) and returns.

    Attributes:
        layout: where its images and maps keep their channels.
        channels: channels of the image it takes.
        classes: channels of the map it returns (of its first output, when it
            has several).
        outputs: every output's `MapOutput`, in the model's order.
    """

    classes: int
    outputs: tuple[MapOutput, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The outputs' names, in order."""
        return tuple(output.name for output in self.outputs)

    @property
    def several(self) -> bool:
        """Whether the model has more than one output (`predict_map` then returns a dict of maps)."""
        return len(self.outputs) > 1

    def output_index(self, output: str | None = None) -> int:
        """The position of the output named ``output``; None: the default (see `choose_output`).

        Raises:
            InputError: as `choose_output`.
        """
        return self.names.index(choose_output(self.outputs, output))


def choose_output(outputs, output: str | None = None) -> str:
    """The name of the output to show where one is shown (a heatmap, a per-cell table).

    Args:
        outputs: the `MapOutput` of each output, in the model's order.
        output: a name, or None for the default: the only output, else the
            first that ends in a softmax or sigmoid (its values are class
            probabilities).

    Raises:
        InputError: for a name among none of ``outputs``, or None when there
            are several and none ends in a softmax or sigmoid.
    """
    names = [o.name for o in outputs]
    listed = ", ".join(map(repr, names))
    if output is None:
        if len(outputs) == 1:
            return names[0]
        found = next((o.name for o in outputs if o.activation is not None), None)
        if found is None:
            raise InputError(
                f"The model has {len(names)} outputs ({listed}) and none ends in a softmax or sigmoid. "
                "Name the one to use: `output=NAME` (CLI: --output-name NAME)."
            )
        return found
    if output not in names:
        raise InputError(
            f"The model has no output named {output!r}; its outputs are {listed}. Use one of those: "
            "`output=NAME` (CLI: --output-name NAME)."
        )
    return output


class OutputMaps(dict):
    """The maps of a model with several outputs: a dict of arrays by output name, in the model's order.

    What `predict_map` returns for such a model. Beside the maps it keeps
    each output's `MapOutput` (``outputs``), so that `pick` (and `heatmap`)
    can choose the map of class probabilities by default.
    """

    def __init__(self, outputs, maps):
        super().__init__(zip((o.name for o in outputs), maps))
        self.outputs = tuple(outputs)

    def pick(self, output: str | None = None):
        """``(name, map)`` of the output named ``output``; None: see `choose_output`."""
        name = choose_output(self.outputs, output)
        return name, self[name]


def pick_map(maps, output: str | None = None):
    """``(name, map)``: the one map of ``maps`` to show.

    Args:
        maps: one map (an array; its name is then ``""``), an `OutputMaps`,
            or a dict of maps by output name.
        output: the name of the map in ``maps``; None: the default of
            `choose_output` (for a plain dict, which does not know which
            outputs end in a softmax or sigmoid, only a dict of one map).

    Raises:
        InputError: for an unknown name, a name given for a single map, or
            None for a plain dict of several maps.
    """
    if isinstance(maps, OutputMaps):
        return maps.pick(output)
    if isinstance(maps, dict):
        if output is None and len(maps) > 1:
            raise InputError(
                f"{len(maps)} maps were given ({', '.join(map(repr, maps))}): name the one to use with "
                "`output=NAME`. (The dict `predict_map` returns knows its class probabilities' map.)"
            )
        name = choose_output([MapOutput(str(name), 0) for name in maps], output)
        return name, maps[name]
    if output is not None:
        raise InputError(
            f"`output={output!r}` names one of several maps, but one map was given. Pass the dict of maps "
            "`predict_map` returns for a model with several outputs, or no `output`."
        )
    return "", maps


def is_fully_convolutional(model) -> bool:
    """True for a one-input model on images of any size whose every output is a rank-4 map.

    That is what `convert` returns (and what `segmenter` builds); anything else
    is a classifier to convert first.
    """
    return _why_not_fcn(model) is None


def fcn_spec(model) -> FcnSpec:
    """The `FcnSpec` of a fully convolutional model.

    Raises:
        ConversionError: for anything else, saying what the model takes and
            returns, and how to get an FCN.
    """
    if not isinstance(model, keras.Model):
        raise ConversionError(
            f"Expected a `keras.Model` (a classifier or the FCN `convert` returns). Received: {type(model).__name__}"
        )
    model = traced_model(model)
    problem = _why_not_fcn(model)
    if problem is not None:
        raise ConversionError(problem)
    layout = model_layout(model)
    channels = layout.channels(tuple(model.inputs[0].shape))
    if channels is None:
        raise ConversionError(
            f"Model '{model.name}' takes input {tuple(model.inputs[0].shape)} with an unknown number of channels; "
            "give its Input a fixed channel count."
        )
    outputs = map_outputs(model)
    return FcnSpec(layout, int(channels), outputs[0].classes, outputs)


def map_outputs(model) -> tuple[MapOutput, ...]:
    """Every output's `MapOutput`, in the model's order: an FCN's maps, or a classifier's score vectors."""
    layout = model_layout(model)
    found = []
    for name, tensor in zip(output_names(model), model.outputs):
        shape = tuple(tensor.shape)
        classes = layout.channels(shape) if len(shape) == 4 else shape[-1]
        operation = producer_of(tensor)
        activation = None if operation is None else squashing_activation(operation)
        found.append(MapOutput(name, int(classes) if classes is not None else 0, activation))
    return tuple(found)


def as_fcn(
    model,
    *,
    head: str = "window",
    input_size=None,
    custom_objects=None,
    convert: bool = True,
    verify: bool = True,
) -> keras.Model:
    """The fully convolutional model to run: ``model`` itself when it is one, else its conversion.

    Args:
        model: a classifier, an FCN (from `convert`, or a `segmenter`), or the
            path of a ``.keras``/``.h5`` file holding either.
        head: for a classifier with a global-pooling head, see `convert`.
        input_size: the classifier's original ``(H, W)`` when its input takes any size.
        custom_objects: passed to `keras.models.load_model` for a path.
        convert: convert a classifier; with False a classifier is refused.
        verify: verify the conversion (see `convert`).

    Returns:
        The FCN. An in-memory classifier is converted once per ``head`` and
        ``input_size``: later calls return the same FCN.

    Raises:
        ModelFileError: for a path that cannot be loaded.
        ConversionError: for a classifier that cannot be converted, or any
            classifier with ``convert=False``.
        VerificationError: when the conversion does not verify.
    """
    loaded = as_model(model, custom_objects, error_class=ConversionError)
    if is_fully_convolutional(loaded):
        check_trace(loaded)
        return loaded
    if not convert:
        raise ConversionError(f"{_why_not_fcn(loaded)} Let it be converted (drop convert=False / --no-convert).")
    # Kept on the classifier: `predict_map(classifier, ...)` in a loop converts (and verifies) once.
    key = (head, None if input_size is None else tuple(int(d) for d in input_size), verify)
    cached = model_facts(loaded).conversions
    if key not in cached:
        cached[key] = convert_model(loaded, head=head, input_size=input_size, verify=verify)
    return cached[key]


def original_size(model, input_size=None) -> tuple[int, int] | None:
    """The ``(H, W)`` a classifier was built for: ``input_size`` when given, else its fixed input size, or None."""
    if input_size is not None:
        return (int(input_size[0]), int(input_size[1]))
    model = traced_model(model)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        return None
    spatial = model_layout(model).spatial_shape(shape)
    return (int(spatial[0]), int(spatial[1])) if all(d is not None for d in spatial) else None


def _why_not_fcn(model) -> str | None:
    """Why ``model`` is not fully convolutional (one sentence), or None when it is."""
    model = traced_model(model)
    if len(model.inputs) != 1 or not model.outputs:
        return (
            f"Model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} outputs; a score map "
            "needs one image input and at least one output."
        )
    shape = tuple(model.inputs[0].shape)
    outputs = [tuple(tensor.shape) for tensor in model.outputs]
    spatial = model_layout(model).spatial_shape(shape) if len(shape) == 4 else (0,)
    if len(shape) != 4 or any(len(output) != 4 for output in outputs) or any(d is not None for d in spatial):
        returned = outputs[0] if len(outputs) == 1 else outputs
        return (
            f"Model '{model.name}' takes {shape} and returns {returned}: it is not fully convolutional. "
            "Convert the classifier first: `fcn = keras_fcn_surgery.convert(model)`."
        )
    return None
