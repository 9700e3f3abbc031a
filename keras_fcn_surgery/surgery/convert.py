"""`convert` and `plan`: the public entry points of the surgery.

Both go through one `Conversion`: a single planning pass over the classifier,
which then gives the plan table, builds the FCN and verifies it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import keras

from keras_fcn_surgery.errors import ConversionError, IgnoredHeadWarning, NonFiniteWeightsWarning, VerificationError
from keras_fcn_surgery.graph import (
    describe,
    graph_of,
    input_name,
    is_graph_model,
    iter_layers,
    model_layout,
    producer_of,
    remember_source,
)
from keras_fcn_surgery.names import runtime_name
from keras_fcn_surgery.options import HEADS
from keras_fcn_surgery.saving.loading import as_model
from keras_fcn_surgery.surgery.engine import GraphPlan, Surgeon
from keras_fcn_surgery.surgery.plan import ConversionPlan
from keras_fcn_surgery.surgery.rules.base import SPATIAL, Context, FlattenedMap, RewriteKind, Spatial
from keras_fcn_surgery.surgery.verify import (
    VerificationResult,
    check_inputs,
    check_trace,
    compare_models,
    random_inputs,
    source_input_shapes,
    warn_if_uninformative,
)


def plan(model, *, head: str = "window", input_size=None, custom_objects=None) -> ConversionPlan:
    """The rewrites `convert` would make, without building anything.

    Args:
        model: a Sequential or functional `keras.Model`, or a path to a
            ``.keras``/``.h5`` file.
        head: what a global-pooling head becomes: ``"window"`` (a pooling as
            large as the original feature map: one classification per
            original-size window) or ``"dense"`` (no pooling: the classifier at
            every feature-map position).
        input_size: ``(H, W)`` the classifier was trained at, needed only when
            the model accepts any size.
        custom_objects: passed to `keras.models.load_model` for a path.

    Returns:
        A `ConversionPlan`; ``print(plan)`` shows it as a table.

    Raises:
        ConversionError: as `convert`.

    Warns:
        IgnoredHeadWarning: for ``head="dense"`` on a model without a
            global-pooling head.
    """
    return Conversion.of(model, head=head, input_size=input_size, custom_objects=custom_objects).plan()


def convert(
    model,
    *,
    head: str = "window",
    input_size=None,
    verify: bool = True,
    verify_inputs=None,
    tolerance=None,
    custom_objects=None,
) -> keras.Model:
    """Turn an image classifier into an equivalent fully convolutional network.

    Flatten + Dense becomes a ``Conv2D`` whose kernel covers the flattened map
    (``valid`` padding); later Dense layers become 1x1 convolutions; global
    pooling heads follow ``head``. Weights are copied, layer names kept, and the
    input's height and width become ``None``: the result takes any image at
    least as large as the original and returns a map of class scores, shaped
    ``(N, H', W', K)`` (``(N, K, H', W')`` for channels-first models). The
    source model is not modified.

    Args:
        model: a Sequential or functional `keras.Model` (nested models
            allowed), or a path to a ``.keras``/``.h5`` file.
        head: ``"window"`` or ``"dense"``, for global-pooling heads (see `plan`).
        input_size: ``(H, W)`` the classifier was trained at, for a model whose
            input takes any size. A model with a fixed input size is converted
            at that size; an ``input_size`` that contradicts it is refused.
        verify: run both models on a batch at the original size (comparing
            the logits where the model ends in a softmax or sigmoid) and raise
            `VerificationError` if they differ.
        verify_inputs: the batch to verify on, ``(N, H, W, C)`` at the
            original size; default: random numbers. Real images make the
            check meaningful even where random inputs are not.
        tolerance: relative tolerance of that check; default by dtype.
        custom_objects: passed to `keras.models.load_model` for a path.

    Returns:
        A new functional `keras.Model` made only of built-in Keras layers.

    Raises:
        ConversionError: for a model that cannot be converted faithfully (the
            message names the layer and the way out), an ``input_size`` that
            contradicts the model's fixed input, or ``verify_inputs`` of the
            wrong shape.
        VerificationError: when ``verify`` finds the result different from
            the source, or cannot compare them (every source output NaN or
            Inf).
        ModelFileError: for a path that cannot be loaded.

    Warns:
        NonFiniteWeightsWarning: when the source holds NaN or Inf weights
            (the message names the layers); they are copied as they are.
        UninformativeVerificationWarning: when the source's scores hardly vary
            across the check batch (an untrained network), so the check proves
            little; pass real images as ``verify_inputs``.
        IgnoredHeadWarning: for ``head="dense"`` on a model without a
            global-pooling head.

    Example:

    ```python
    fcn = keras_fcn_surgery.convert(keras.applications.VGG16(weights=None))
    fcn.predict(np.zeros((1, 320, 320, 3))).shape  # (1, 4, 4, 1000)
    ```
    """
    if verify_inputs is not None and not verify:
        raise ConversionError("`verify_inputs` was given with `verify=False`; drop one of them.")
    conversion = Conversion.of(model, head=head, input_size=input_size, custom_objects=custom_objects)
    if verify_inputs is not None:
        verify_inputs = check_inputs(conversion.model, verify_inputs, input_size=input_size)
    fcn = conversion.build()
    conversion.warn_nonfinite(stacklevel=3)
    if verify:
        conversion.verify(inputs=verify_inputs, tolerance=tolerance, stacklevel=3)
    return fcn


@dataclass
class Conversion:
    """One planning pass over a classifier, shared by `plan`, `convert` and `verify`.

    Make it with `Conversion.of`; ``plan()`` gives the table, ``build()`` the
    FCN (built once), ``verify()`` checks it against the source.

    Attributes:
        model: the source classifier.
        head: ``"window"`` or ``"dense"``.
        input_size: the ``input_size`` given, or None.
        size: ``(H, W)`` of the original input.
        surgeon: the engine that planned the model and builds its FCN.
        graph_plan: the planned steps.
    """

    model: keras.Model
    head: str
    input_size: tuple[int, int] | None
    size: tuple[int, int]
    surgeon: Surgeon
    graph_plan: GraphPlan
    _fcn: keras.Model | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls, model, *, head: str = "window", input_size=None, custom_objects=None, warn: bool = True, stacklevel=3
    ) -> Conversion:
        """Plan the conversion of ``model`` (a `keras.Model` or a model file).

        Raises:
            ConversionError: for a model that cannot be converted (see `convert`).

        Warns:
            IgnoredHeadWarning: for ``head="dense"`` on a model without a
                global-pooling head (unless ``warn`` is False).
        """
        model = as_model(model, custom_objects, error_class=ConversionError)
        check_trace(model)
        if head not in HEADS:
            raise ConversionError(f"Expected `head` to be one of {HEADS}. Received: head={head!r}")
        graph = graph_of(model)
        context = Context(layout=model_layout(model), head=head)
        for tensor in graph.inputs:
            _check_image_input(tensor, context)
        shapes = [(None, *shape) for shape in source_input_shapes(model, input_size)]
        recorded = [tuple(t.shape) for t in graph.inputs]
        size = tuple(int(d) for d in context.spatial_shape(shapes[0]))
        surgeon = Surgeon(context)
        graph_plan = surgeon.plan(model, shapes, [SPATIAL] * len(shapes), use_recorded_shapes=shapes == recorded)
        _check_outputs(model, graph_plan, surgeon.context)
        given = tuple(int(d) for d in input_size) if input_size is not None else None
        conversion = cls(model, head, given, (size[0], size[1]), surgeon, graph_plan)  # type: ignore[arg-type]
        if warn and head == "dense" and not conversion.removes_global_pooling:
            warnings.warn(
                f"head='dense' changes nothing in model '{model.name}': it has no global-pooling head (its "
                "classifier is already evaluated at every window). Leave `head` out (CLI: no --head).",
                IgnoredHeadWarning,
                stacklevel=stacklevel,
            )
        return conversion

    @property
    def removes_global_pooling(self) -> bool:
        """True when the head's global pooling is dropped (``head="dense"``)."""
        return any(rewrite.kind is RewriteKind.POOLING_REMOVED for rewrite in self.graph_plan.rewrites)

    def plan(self) -> ConversionPlan:
        """The `ConversionPlan`: every rewrite, printable as a table."""
        return ConversionPlan(
            model_name=self.model.name,
            input_size=self.size,
            data_format=self.surgeon.context.data_format,
            head=self.head,
            rewrites=tuple(self.graph_plan.rewrites),
        )

    def build(self) -> keras.Model:
        """The FCN: a new functional model on inputs of any height and width (built on the first call)."""
        if self._fcn is None:
            context = self.surgeon.context
            inputs = [_relaxed_input(source, context) for source in self.graph_plan.graph.inputs]
            outputs = self.surgeon.build(self.graph_plan, inputs)
            self._fcn = keras.Model(_single(inputs), _single(outputs), name=runtime_name(self.model.name, "fcn"))
            remember_source(self._fcn, self.model, self.size)
        return self._fcn

    def reference(self, fcn=None) -> keras.Model:
        """The model to compare with the source at the original size.

        A ``head="dense"`` FCN of a global-pooling classifier has a map of
        several cells there; it differs from the ``head="window"`` conversion
        only by the removed pooling (every other layer and weight comes from
        the same rules), so that conversion is compared instead.
        """
        if self.removes_global_pooling:
            return Conversion.of(self.model, head="window", input_size=self.input_size).build()
        return fcn if fcn is not None else self.build()

    def verify(
        self, fcn=None, *, inputs=None, tolerance=None, raise_on_failure: bool = True, stacklevel: int = 2
    ) -> VerificationResult:
        """Compare the FCN (``fcn``, default: `build`'s) with the source at the original size.

        Args:
            fcn: an FCN of this conversion; default: the one `build` makes.
            inputs: the check batch (see `convert`'s ``verify_inputs``);
                default: random numbers.
            tolerance: relative tolerance; default by dtype.
            raise_on_failure: raise `VerificationError` instead of returning a
                result that did not pass.
            stacklevel: of the warning, counted from the caller.

        Warns:
            UninformativeVerificationWarning: when the check batch proves little.
        """
        if inputs is None:
            inputs = random_inputs(self.model, input_size=self.input_size)
        else:
            inputs = check_inputs(self.model, inputs, input_size=self.input_size)
        result = compare_models(self.model, self.reference(fcn), inputs, tolerance=tolerance)
        if raise_on_failure:
            _raise_if_failed(self.model, result)
        warn_if_uninformative(self.model, result, stacklevel=stacklevel)
        return result

    def warn_nonfinite(self, stacklevel: int = 2) -> None:
        """Warn `NonFiniteWeightsWarning` when the source holds NaN or Inf weights."""
        nonfinite = nonfinite_weights(self.model)
        if nonfinite:
            warnings.warn(_nonfinite_message(self.model, nonfinite), NonFiniteWeightsWarning, stacklevel=stacklevel)


def verify(
    source,
    fcn,
    *,
    head: str = "window",
    inputs=None,
    input_size=None,
    batch_size: int = 2,
    seed: int = 0,
    tolerance=None,
) -> VerificationResult:
    """Run a classifier and its FCN on the same batch at the original size and compare.

    Where the source ends in a softmax or sigmoid (a Dense or Activation with
    that activation, or a Softmax layer), the logits before it are compared:
    the activation would hide differences (a softmax ignores a shift of every
    logit). ``result.compared`` says which tensors were compared.

    Args:
        source: the classifier (a subclassed one is compared through its
            traced twin, itself compared with the model).
        fcn: what `convert` returned for it.
        head: the ``head`` it was converted with. A ``head="dense"`` FCN of a
            global-pooling classifier gives a map at the original size; it
            differs from the ``head="window"`` conversion only by the removed
            pooling (every other layer and weight comes from the same rules),
            so that conversion is the one compared.
        inputs: the batch to compare on, ``(N, H, W, C)`` at the original
            size (a list of batches for several inputs); default: random
            numbers. Real images make the check meaningful for any network.
        input_size: ``(H, W)`` the classifier was trained at, when its input
            takes any size.
        batch_size: images in the random batch (more than one catches batch
            mixing).
        seed: seed of the random batch.
        tolerance: allowed ``max_rel_diff``; default from the compute dtype.

    Returns:
        A `VerificationResult`; ``result.passed`` tells whether they agree.
        NaN (or the same infinity) in both models at the same place counts
        as equal; a source whose outputs are all NaN or Inf cannot be
        verified (``passed`` is False: nothing was compared).

    Raises:
        ConversionError: when ``fcn`` takes another number of channels than
            ``source``, its output does not reduce to the source's at the
            original size, or ``inputs`` do not fit the source.
        VerificationError: when ``fcn`` fails to run where ``source`` runs.

    Warns:
        UninformativeVerificationWarning: when the source's scores hardly
            vary across the batch, so the check proves little.
    """
    source = as_model(source, error_class=ConversionError)
    check_trace(source)
    reference = fcn
    if head == "dense":
        reference = Conversion.of(source, head="dense", input_size=input_size, warn=False).reference(fcn)
    elif head != "window":
        raise ConversionError(f"Expected `head` to be 'window' or 'dense'. Received: head={head!r}")
    if inputs is None:
        inputs = random_inputs(source, input_size=input_size, batch_size=batch_size, seed=seed)
    else:
        inputs = check_inputs(source, inputs, input_size=input_size, argument="inputs")
    result = compare_models(source, reference, inputs, tolerance=tolerance)
    warn_if_uninformative(source, result, stacklevel=2)
    return result


def nonfinite_weights(model) -> dict[str, list[str]]:
    """The weights holding NaN or Inf, by layer: ``{"'fc1' (Dense)": ["kernel"], ...}``, nested layers included."""
    found: dict[str, list[str]] = {}
    for layer in iter_layers(model):
        if is_graph_model(layer):
            continue
        for weight in layer.weights:
            if not bool(keras.ops.all(keras.ops.isfinite(weight.value))):
                found.setdefault(describe(layer), []).append(weight.name)
    return found


def _nonfinite_message(model, nonfinite: dict[str, list[str]]) -> str:
    listed = "; ".join(f"{layer}: {', '.join(names)}" for layer, names in nonfinite.items())
    return (
        f"Model '{model.name}' has NaN or Inf weights ({listed}). The converted model copies them, so its "
        "outputs are NaN or Inf wherever the source's are. Fix the weights (reload a good checkpoint) to "
        "get a usable model."
    )


def _raise_if_failed(model, result: VerificationResult) -> None:
    if result.finite_compared == 0:
        nonfinite = nonfinite_weights(model)
        raise VerificationError(
            f"Every output of '{model.name}' at its original size is NaN or Inf, so the conversion cannot "
            f"be verified ({result}). "
            + (f"{_nonfinite_message(model, nonfinite)} " if nonfinite else "")
            + "Pass `verify=False` (CLI: `--no-verify`) to convert it anyway."
        )
    if not result.passed:
        raise VerificationError(
            f"The converted '{model.name}' differs from the source at its original size: {result}. "
            "This is a bug in keras_fcn_surgery or an unsupported layer; please report the model."
        )


def _check_image_input(tensor, context: Context) -> None:
    shape = tuple(tensor.shape)
    name = input_name(tensor)
    if len(shape) != 4:
        raise ConversionError(
            f"Input '{name}' has shape {shape}; only rank-4 image inputs (batch, height, width, "
            "channels) can take a larger size. Models on sequences or vectors are not image classifiers."
        )
    if context.channels(shape) is None:
        raise ConversionError(
            f"Input '{name}' has shape {shape} with an unknown number of channels; give the model's "
            "Input a fixed channel count."
        )


def _check_outputs(model, graph_plan: GraphPlan, context: Context) -> None:
    for tensor, mode, shape in zip(graph_plan.graph.outputs, graph_plan.output_modes, graph_plan.output_shapes):
        producer = producer_of(tensor)
        if isinstance(mode, FlattenedMap):
            raise ConversionError(
                f"Model '{model.name}' ends at {describe(producer)}: a Flatten with no Dense after it. "
                "Remove the Flatten to get the feature map itself."
            )
        if isinstance(mode, Spatial) and len(shape) != 4:
            raise ConversionError(
                f"Output of {describe(producer)} has shape {shape} and does not come from a Flatten + Dense "
                "or global-pooling head, so it cannot become a score map. Supported heads: Flatten then "
                "Dense layers, or GlobalAveragePooling2D/GlobalMaxPooling2D then Dense layers."
            )


def _relaxed_input(source, context: Context):
    channels = context.channels(tuple(source.shape))
    shape = context.layout.image_shape(None, None, channels)
    return keras.Input(shape=shape, dtype=source.dtype, name=input_name(source))


def _single(items):
    return items[0] if len(items) == 1 else items
