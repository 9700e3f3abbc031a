"""The prepared mapper: a model made ready once for its maps, and the options that say how they run.

`prepare` decides once what runs for a model and a map request: the method
(`windowed.route`, the one place that chooses it), the runnable model (an
FCN, or the classifier itself for a windowed map), the map's spec and grid,
the source classifier its certificates run (held strongly) and the choices
of tiling and execution. `predict_map`, `plan_prediction`, `certify_map`,
`predict_images` and the commands are thin callers of a `Mapper`.

Options are grouped as the command line groups them: `Tiling` (tiles and
memory), `Execution` (how each forward pass runs), `Inputs` (what is done to
the pixels first) and `MapMethod` (which map of a classifier). Every entry
point also takes them as the flat keywords it always took (``tile=1024``),
turned into these objects once, at the entry (`MapOptions.of`).

A mapper pickles as its `MapperRecipe` (the model file's bytes and the
options), so it can be shipped to a Ray worker and rebuilt there, source
classifier included, with no table of this process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field, fields, replace

import keras
import numpy as np

from keras_fcn_surgery.errors import InputError, UncertifiableMapError, UninformativeVerificationWarning
from keras_fcn_surgery.graph import source_of
from keras_fcn_surgery.grid.geometry import MapGrid, WindowGrid, geometry
from keras_fcn_surgery.inference import engines, fragments, runner, staged, stitch, windowed
from keras_fcn_surgery.inference.certificate import (
    DEFAULT_CELLS,
    CertificateOptions,
    CertifiedMap,
    check_cell_count,
    crop_certificate,
    warn_if_inexact,
    what_runs,
    windowed_certificate,
)
from keras_fcn_surgery.inference.store import DiskMap, file_backed
from keras_fcn_surgery.layout import ImageSpec
from keras_fcn_surgery.saving.arguments import public_arguments
from keras_fcn_surgery.saving.loading import load_model
from keras_fcn_surgery.surgery.atrous import finer_stride_cost, origin_of
from keras_fcn_surgery.surgery.fcn import OutputMaps, fcn_spec


@dataclass(frozen=True)
class Tiling:
    """Tiles and memory (the CLI's ``--tile``, ``--batch-size``...): see `predict_map` for each.

    Attributes:
        tile: None (one pass) or the largest tile side, ``T`` or ``(T_h, T_w)``.
        batch_size: tiles (or windows) per forward pass; None: chosen.
        staged: None (stage where that computes less), True or False.
        memory_budget: bytes of stored stage maps kept in memory (None: 64 MiB).
        spill_dir: the folder for maps past the budget (None: the system's).
        prefetch: read the next batch on a background thread.
    """

    tile: int | tuple[int, int] | None = None
    batch_size: int | None = None
    staged: bool | None = None
    memory_budget: int | None = None
    spill_dir: str | None = None
    prefetch: bool = True


@dataclass(frozen=True)
class Execution:
    """How each forward pass runs (the CLI's ``--execution`` and ``--precision``): see `predict_map`.

    Attributes:
        engine: ``"auto"``, ``"tf"``, ``"xla"``, ``"blas"``, a backend's own
            (``"jax"``, ``"torch"``), or for a map finer than the network's
            stride ``"stitch"`` (shift-and-stitch of the tail) or
            ``"fragments"`` (multi-pooling fragments): `engines.ENGINES`.
        precision: the arithmetic of the passes: ``"float32"`` (default),
            ``"bfloat16"`` or ``"float16"`` (a copy of the model under Keras's
            mixed policy: float32 variables, reduced-precision compute). The
            map is stored in float32 either way; its certificate is held to the
            precision's tolerance (`certificate.precision_tolerance`). ``engine="auto"``
            never lowers the precision on its own.
        mixed_precision: an alias of ``precision="float16"`` (the older flag),
            turned into it here.

    Raises:
        InputError: for an unknown precision, or ``mixed_precision=True`` with
            a precision other than float16.
    """

    engine: str = "auto"
    precision: str = "float32"
    mixed_precision: bool = False

    def __post_init__(self):
        engines.check_precision(self.precision)
        if self.mixed_precision:
            if self.precision not in ("float32", "float16"):
                raise InputError(
                    f"`mixed_precision=True` is an alias of precision='float16'; it contradicts "
                    f"precision={self.precision!r}: give `precision` alone."
                )
            object.__setattr__(self, "precision", "float16")
            object.__setattr__(self, "mixed_precision", False)  # one spelling kept: `replace` stays consistent

    @property
    def policy(self) -> str | None:
        """The Keras dtype policy of the forward passes (None: the model's own, at float32)."""
        return engines.policy_of(self.precision)


@dataclass(frozen=True)
class Inputs:
    """What is done to an image's pixels before the model (the CLI's ``--preprocess``).

    Attributes:
        preprocess: None, or a function of a float32 pixel array (each pixel
            on its own), as for `predict_map`.
    """

    preprocess: object = None


@dataclass(frozen=True)
class MapMethod:
    """Which map of a classifier (the CLI's ``--method``, ``--stride``, ``--head``, ``--input-size``).

    Attributes:
        method: ``"auto"``, ``"fcn"`` or ``"windowed"`` (see `predict_map`).
        stride: pixels between windows of a windowed map, ``s`` or ``(s_h, s_w)``.
        head: the conversion's head for a global-pooling classifier (see `convert`).
        input_size: the classifier's ``(H, W)`` when it takes any size.
    """

    method: str = "auto"
    stride: int | tuple[int, int] | None = None
    head: str = "window"
    input_size: tuple[int, int] | None = None


_GROUPS = {"tiling": Tiling, "execution": Execution, "inputs": Inputs, "method": MapMethod}
_FLAT = {f.name: group for group, cls in _GROUPS.items() for f in fields(cls) if f.name != "method"}


@dataclass(frozen=True)
class MapOptions:
    """The four option groups of a map request, as one object."""

    method: MapMethod = field(default_factory=MapMethod)
    tiling: Tiling = field(default_factory=Tiling)
    execution: Execution = field(default_factory=Execution)
    inputs: Inputs = field(default_factory=Inputs)

    @classmethod
    def of(cls, entry: str = "prepare", **options) -> MapOptions:
        """The option objects of ``options``: groups (``tiling=Tiling(...)``) and flat keywords (``tile=1024``).

        A flat keyword overrides its group's field; ``method`` is a `MapMethod`
        or the method's name; ``jit_compile`` (deprecated) is turned into an
        ``engine`` here.

        Raises:
            TypeError: for a keyword none of the groups has, naming ``entry``.
            InputError: for ``engine`` and ``jit_compile`` given together.
        """
        groups: dict = {}
        method = options.pop("method", None)
        if isinstance(method, MapMethod):
            groups["method"] = method
        elif method is not None:
            options["method_name"] = method
        for name in ("tiling", "execution", "inputs"):
            given = options.pop(name, None)
            if given is not None:
                if not isinstance(given, _GROUPS[name]):
                    raise TypeError(f"{entry}() expects `{name}` to be a {_GROUPS[name].__name__}; got {given!r}")
                groups[name] = given
        jit_compile = options.pop("jit_compile", None)
        flat: dict = {}
        for key, value in options.items():
            if key == "method_name":
                flat.setdefault("method", {})["method"] = value
            elif key in _FLAT:
                flat.setdefault(_FLAT[key], {})[key] = value
            else:
                known = ", ".join(sorted({*_FLAT, "jit_compile", *_GROUPS}))
                raise TypeError(f"{entry}() got an unexpected keyword argument {key!r}; it takes {known}")
        made = {name: replace(groups.get(name) or cls_(), **flat.get(name, {})) for name, cls_ in _GROUPS.items()}
        if jit_compile is not None:
            engine = engines.engine_from_options(made["execution"].engine, jit_compile)
            made["execution"] = replace(made["execution"], engine=engine)
        return cls(**made)


@dataclass(frozen=True)
class MapperRecipe:
    """What rebuilds a `Mapper` anywhere (a Ray worker): the model file's bytes and the options.

    Attributes:
        model: the ``.keras`` bytes of the model the mapper was prepared for.
        classifier: those of the classifier an FCN was converted from, when
            the mapper knows it (its certificates run it), else None.
        options: the `MapOptions`.
    """

    model: bytes
    classifier: bytes | None
    options: MapOptions

    def build(self) -> Mapper:
        """The mapper, rebuilt from the files (converting a classifier again, as `prepare` does)."""
        with tempfile.TemporaryDirectory(prefix="kfs-mapper-") as folder:
            model = _load_bytes(self.model, os.path.join(folder, "model.keras"))
            source = None
            if self.classifier is not None:
                source = _load_bytes(self.classifier, os.path.join(folder, "classifier.keras"))
        return Mapper(model, self.options, source=source)


def prepare(model, **options) -> Mapper:
    """A `Mapper`: ``model`` made ready once for its maps, the method chosen, the options set.

    Args:
        model: a classifier, an FCN from `convert`, or the path of a file
            holding either.
        **options: `MapOptions.of`: the option groups (``tiling=Tiling(...)``,
            ``execution=``, ``inputs=``, ``method=MapMethod(...)`` or a
            method's name) and their fields as flat keywords (``tile=1024``,
            ``engine="xla"``, ``stride=32``...), as `predict_map` takes them.

    Returns:
        The `Mapper`; ``mapper.method`` says which method runs.

    Raises:
        TypeError: for an unknown keyword.
        InputError, ConversionError: as `predict_map` for the method, stride
            and model.

    Example:

    ```python
    mapper = kfs.prepare(classifier, tile=1024)
    print(mapper.method, mapper.plan((2048, 2048)).macs)
    scores = mapper.map(image)
    print(mapper.certify(image, scores))
    ```
    """
    return Mapper(model, MapOptions.of("prepare", **options))


class Mapper:
    """A model prepared for its maps: the method routed once, what runs, the source classifier, the options.

    Made by `prepare`. Attributes:

    - ``model``: the model as given (a classifier or an FCN).
    - ``method``: ``"fcn"`` or ``"windowed"``.
    - ``runnable``: what computes the map: the FCN, or the classifier (its
      traced twin) for a windowed map.
    - ``classifier``: the classifier the map's cells stand for (held
      strongly), or None for an FCN whose classifier is unknown.
    - ``stride``: a windowed map's ``(s_h, s_w)``; None for an FCN's map.
    - ``options``: the `MapOptions` (``tiling``, ``execution``, ``inputs``).
    """

    def __init__(self, model, options: MapOptions | None = None, *, source=None, _fcn=None):
        self.options = options or MapOptions()
        # One rule for what the API takes: a model or its file's path, ``preprocess`` as a function or a CLI name.
        model, _, preprocess = public_arguments(model, None, self.options.inputs.preprocess)
        if preprocess is not self.options.inputs.preprocess:
            self.options = replace(self.options, inputs=replace(self.options.inputs, preprocess=preprocess))
        self.model = model
        how = self.options.method
        if _fcn is not None:  # a windowed map's shared prefix: an FCN already, nothing to route
            chosen, fcn = "fcn", _fcn
        else:
            chosen, fcn = windowed.route(model, how.stride, how.method, head=how.head, input_size=how.input_size)
        self.method: str = chosen
        self.stride: tuple[int, int] | None = None
        self._prefixes: dict = {}
        self._plans: dict = {}  # shared by the copies `with_options` makes: keyed by the tiling too
        self.analysis: windowed._Analysis | None = None
        if chosen == "windowed":
            self.analysis = windowed.analysis(model)
            self.stride = windowed.check_stride(model, how.stride)
            self.runnable = self.analysis.model
            self.classifier = model
            self._fcn = None
            return
        self._fcn = fcn
        self.runnable = fcn
        known, _ = source_of(fcn) if isinstance(fcn, keras.Model) else (None, None)
        if source is not None:
            self.classifier = source
        elif fcn is not model:
            self.classifier = model
        else:
            self.classifier = known

    @property
    def tiling(self) -> Tiling:
        return self.options.tiling

    @property
    def execution(self) -> Execution:
        return self.options.execution

    @property
    def inputs(self) -> Inputs:
        return self.options.inputs

    @functools.cached_property
    def spec(self):
        """The `FcnSpec` of the maps (layout, channels, classes, outputs)."""
        if self.method == "windowed":
            return windowed.map_spec(self.model)
        return fcn_spec(self._fcn)

    @functools.cached_property
    def grid(self) -> MapGrid:
        """Where the map's cells look on the image (`Geometry`, or a windowed map's `WindowGrid`)."""
        if self.method == "windowed":
            return WindowGrid(self.stride, self.analysis.window)  # type: ignore[arg-type, union-attr]
        return geometry(self._fcn)

    def grid_of(self, output: str | None = None) -> MapGrid:
        """The grid of one output's map (``output``: its name, for an FCN with several outputs)."""
        return self.grid if output is None or self.method == "windowed" else geometry(self._fcn, output=output)

    def with_options(self, **options) -> Mapper:
        """This mapper with other tiling, execution or inputs options (flat keywords or groups); the method,
        the models and what was prepared for them stay.

        Raises:
            TypeError: for an unknown keyword, or one of the method's (prepare another mapper for those).
        """
        if "method" in options or any(_FLAT.get(key) == "method" for key in options):
            raise TypeError("with_options() cannot change the method, stride, head or input size: `prepare` again")
        base = {"tiling": self.tiling, "execution": self.execution, "inputs": self.inputs}
        made = MapOptions.of("with_options", **{**base, **options})
        mapper = Mapper.__new__(Mapper)
        mapper.__dict__.update(self.__dict__)
        preprocess = public_arguments(self.model, None, made.inputs.preprocess)[2]
        made = replace(made, inputs=replace(made.inputs, preprocess=preprocess))
        mapper.options = replace(made, method=self.options.method)
        mapper._prefixes = {}
        return mapper

    # --- plans -------------------------------------------------------------------------------------------------

    def plan(self, image_size, *, keep=None, engine: str | None = None):
        """The plan of a map of an image of ``image_size`` ``(H, W)``: a `PredictionPlan` or a `WindowedPlan`.

        Args:
            image_size: ``(H, W)``.
            keep: None, or a boolean mask over the map's cells (see `predict_map`).
            engine: None (the plan says nothing of executions), or as
                `predict_map`'s ``engine``: each stage's execution, measured
                for ``"auto"``.
        """
        size = tuple(int(d) for d in image_size)
        # The precision too: a windowed plan holds the classifier its windows run at it (`_windows_model`).
        key = (size, self.tiling, engine, None if keep is None else _digest(keep), self.execution.policy)
        plan = self._plans.pop(key, None)
        if plan is None:
            plan = self._plan(size, keep, engine)
        self._plans[key] = plan  # the most recent last: a slide's plan is made once, whoever asks for it
        while len(self._plans) > _PLANS_KEPT:
            self._plans.pop(next(iter(self._plans)))
        return plan

    def _plan(self, image_size, keep, engine):
        tiling = self.tiling
        if self.method == "windowed":
            with warnings.catch_warnings():
                # Converting the reduced-precision twin's prefixes is verified at the precision's wider tolerance,
                # so an untrained network's check "proves little" there; the map's certificate is what counts.
                warnings.simplefilter("ignore", UninformativeVerificationWarning)
                plan = windowed.plan_windows(
                    self._windows_model(),
                    image_size,
                    stride=self.stride,
                    tile=tiling.tile,
                    staged=tiling.staged,
                    batch_size=tiling.batch_size,
                    memory_budget=tiling.memory_budget,
                    keep=keep,
                )
            thinned = windowed.thinned_candidate(self.model, self.stride)  # the way not chosen, where there is one
            finer = None if thinned is None else finer_stride_cost(thinned, image_size, plan.map_size)
            if finer is None:
                return plan
            return replace(plan, finer=replace(finer, windowed_macs=plan.macs, weighed=True, chosen="windowed"))
        plan = staged.plan_fcn(
            self._fcn,
            image_size,
            tile=tiling.tile,
            staged=tiling.staged,
            batch_size=tiling.batch_size,
            memory_budget=tiling.memory_budget,
            keep=keep,
            engine=engine,
        )
        finer = finer_stride_cost(self._fcn, image_size, plan.map_size)  # an FCN à trous: its costs
        if engine is not None:  # what each precision costs, beside the execution chosen (the heaviest stage's)
            heaviest = max(range(len(plan.stages)), key=lambda index: plan.stages[index].macs)
            model, call_shape = staged.stage_calls(plan)[heaviest][:2]
            costs = engines.precision_costs(model, call_shape, plan.stages[heaviest].engine or engines.native())
            plan = replace(plan, precision_costs=costs)
        if finer is not None and stitch.stitch_refusal(self._fcn) is None:
            origin = origin_of(self._fcn)
            finer = replace(finer, tail_stitch_macs=stitch.stitch_cost(origin[0], origin[1], image_size))  # type: ignore[index]
        if finer is not None and fragments.fragments_refusal(self._fcn) is None:
            origin = origin_of(self._fcn)
            finer = replace(finer, fragments_macs=fragments.fragments_cost(origin[0], origin[1], image_size))  # type: ignore[index]
        if finer is not None and finer.exact_stride != finer.stride and self.classifier is not None:
            # Thinned from the finest exact stride below: chosen over the windowed map, whose cost the plan shows.
            macs = windowed.windowed_macs(self.classifier, image_size, finer.stride)
            finer = replace(finer, windowed_macs=macs, weighed=True)
        return plan if finer is None else replace(plan, finer=finer)

    # --- maps --------------------------------------------------------------------------------------------------

    def map(self, image, *, out=None, keep=None, certify: int | None = None, progress: bool | None = None):
        """The map of ``image`` (see `predict_map` for the arguments and what it returns)."""
        if certify:
            check_cell_count(certify, "certify")  # before the pass, not after it
        image = public_arguments(self.model, image)[1]  # an array, a PIL image or an image file's path
        if self.method == "windowed":
            scores = self._map_windowed(image, out, keep, progress)
        else:
            scores = self._map_fcn(image, out, keep, progress)
        if not certify:
            return scores
        certificate = self.certificate(image, scores, certify, keep=keep)
        warn_if_inexact(certificate, stacklevel=3)
        return CertifiedMap(scores, certificate)

    def _map_fcn(self, image, out, keep, progress):
        fcn, tiling, execution = self._fcn, self.tiling, self.execution
        spec = outputs = fcn_spec(fcn)
        size = runner.image_size_of(runner.with_channel_axis(image, spec), spec)
        plan = self.plan(size, keep=keep)
        shapes = {o.name: spec.layout.image_shape(o.map_size[0], o.map_size[1], o.classes) for o in plan.outputs}
        targets = runner.output_arrays(out, shapes, fcn)
        if keep is None:
            runner.warn_if_wasteful(
                plan.work_ratio, plan.tile, lambda side: staged.plan_fcn(fcn, size, tile=side).work_ratio, size
            )
        precision = execution.policy
        # each stage's own engine, measured under "auto"
        plan = engines.with_engine(plan, fcn, execution.engine, precision, calls=staged.stage_calls(plan))

        def forward_for(model, chosen):
            return engines.forward(model, chosen, precision)

        pixels = file_backed(image)
        try:
            staged.run_plan(
                plan,
                runner.with_channel_axis(pixels, spec),
                targets,
                preprocess=self.inputs.preprocess,
                forward_for=forward_for,
                progress=progress,
                prefetch=tiling.prefetch,
                spill_dir=tiling.spill_dir,
            )
        finally:
            if isinstance(pixels, DiskMap):
                pixels.close()
        return OutputMaps(outputs.outputs, targets) if outputs.several else targets[0]

    def _map_windowed(self, image, out, keep, progress):
        found = self.analysis
        spec = ImageSpec(found.layout, found.channels)  # type: ignore[union-attr]
        size = runner.image_size_of(runner.with_channel_axis(image, spec), spec)
        plan = self.plan(size, keep=keep)
        if out is None and self.execution.policy is not None:  # stored in float32, as the classifier gives it
            shape = found.layout.image_shape(plan.map_size[0], plan.map_size[1], found.classes)  # type: ignore
            out = runner.output_arrays(None, {"scores": shape}, self.model)[0]

        def prefix_pass(prefix, region, shared, needed):
            return self._prefix_mapper(prefix).map(region, out=shared, keep=needed, progress=progress)

        return windowed.run_windowed(
            plan, image, out=out, keep=keep, prefix_pass=prefix_pass, options=self.options, progress=progress
        )

    def _windows_model(self):
        """The classifier a windowed map's windows run: the model itself at float32, else its twin whose layers
        compute at the precision (`engines.policy_copy`), so that its prefix and tail run at it too."""
        policy = self.execution.policy
        if policy is None:
            return self.model
        return engines.policy_copy(self.analysis.model, policy)  # type: ignore[union-attr]

    def _prefix_mapper(self, prefix) -> Mapper:
        """The mapper of a windowed map's shared prefix (an FCN), with this mapper's options, made once (at
        float32: a reduced precision's prefix computes at it already, `_windows_model`)."""
        key = id(prefix)
        if key not in self._prefixes:
            options = replace(self.options, method=MapMethod(), execution=replace(self.execution, precision="float32"))
            self._prefixes[key] = (prefix, Mapper(prefix, options, _fcn=prefix))
        return self._prefixes[key][1]

    # --- certificates ------------------------------------------------------------------------------------------

    def certificate(
        self, image, scores, n: int, *, keep=None, tolerance: float | None = None, seed: int = 0, output=None
    ):
        """`certify` without the warning (the caller warns)."""
        check_cell_count(n, "n")
        image = public_arguments(self.model, image)[1]
        preprocess = self.inputs.preprocess
        options = CertificateOptions(n, seed=seed, tolerance=tolerance, precision=self.execution.precision)
        if self.method == "windowed":
            spec = ImageSpec(self.spec.layout, self.spec.channels)
            size = runner.image_size_of(runner.with_channel_axis(image, spec), spec)
            # The cells and windows of the map, whatever the tiles of its prefix's pass: any plan made for it.
            wanted = (size, None if keep is None else _digest(keep))
            made = [p for (z, _, e, k, _), p in self._plans.items() if (z, k) == wanted and e is None]
            return windowed_certificate(
                self.model,
                image,
                scores,
                options,
                plan=made[-1] if made else self.plan(size, keep=keep),
                preprocess=preprocess,
                keep=keep,
            )
        runs = what_runs(self._fcn, self.options.method.input_size, source=self.classifier)
        return crop_certificate(runs, image, scores, options, preprocess=preprocess, keep=keep, output=output)

    def certify(
        self,
        image,
        scores,
        n: int | None = None,
        *,
        keep=None,
        tolerance: float | None = None,
        seed: int = 0,
        output=None,
    ):
        """Compare ``n`` sampled cells of ``scores`` with the classifier on their crops (see `certify_map`).

        Returns:
            A `MapCertificate` (a dict of them for several outputs and no ``output``).

        Warns:
            InexactMapWarning: when cells differ beyond the tolerance.
        """
        n = DEFAULT_CELLS if n is None else n
        certificate = self.certificate(image, scores, n, keep=keep, tolerance=tolerance, seed=seed, output=output)
        warn_if_inexact(certificate, stacklevel=2)
        return certificate

    def certificate_line(self, image, scores, n: int, *, keep=None, output=None):
        """`certify` for a command: the certificate (warned about when inexact) and its one-line summary, or
        None and why there is none: an `UncertifiableMapError` is not a failure of the map.

        For a model with several outputs, give ``output=`` (the map the command
        shows): its certificate, named in the line."""
        named = f" of '{output}'" if output is not None and isinstance(scores, dict) else ""
        try:
            certificate = self.certificate(image, scores, n, keep=keep, output=output)
        except UncertifiableMapError as error:
            return None, f"no certificate{named}: {error}"
        warn_if_inexact(certificate, stacklevel=2)
        return certificate, f"certificate{named}: {certificate}"

    # --- shipping ----------------------------------------------------------------------------------------------

    def recipe(self) -> MapperRecipe:
        """The `MapperRecipe` that rebuilds this mapper elsewhere (the model files' bytes and the options)."""
        classifier = None
        if self.classifier is not None and self.classifier is not self.model:
            classifier = _model_bytes(self.classifier)
        return MapperRecipe(_model_bytes(self.model), classifier, self.options)

    def __reduce__(self):
        return (MapperRecipe.build, (self.recipe(),))

    def __repr__(self) -> str:
        name = getattr(self.model, "name", type(self.model).__name__)
        stride = f", stride {self.stride[0]}x{self.stride[1]}" if self.stride is not None else ""
        return f"Mapper('{name}', method={self.method!r}{stride})"


# Plans a mapper keeps (by image size, tiling and mask): the inputs of a batch job, one after another.
_PLANS_KEPT = 8


def _digest(keep) -> tuple:
    mask = np.asarray(keep, dtype=bool)
    return mask.shape, hashlib.sha1(np.packbits(mask).tobytes()).hexdigest()


def _model_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory(prefix="kfs-mapper-") as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        with open(path, "rb") as file:
            return file.read()


def _load_bytes(data: bytes, path: str):
    with open(path, "wb") as file:
        file.write(data)
    return load_model(path)
