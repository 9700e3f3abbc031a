"""Score maps of whole images: exact tiled FCN inference and the sliding-window baseline."""

from __future__ import annotations

import itertools

import numpy as np

from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.graph import model_layout, traced_model
from keras_fcn_surgery.grid import tiling
from keras_fcn_surgery.inference import engines, runner, windowed
from keras_fcn_surgery.inference.certificate import DEFAULT_CELLS, CertifiedMap, check_cell_count, warn_if_inexact
from keras_fcn_surgery.inference.mapper import MapOptions, Mapper
from keras_fcn_surgery.layout import ImageSpec
from keras_fcn_surgery.saving.arguments import public_arguments
from keras_fcn_surgery.surgery.fcn import OutputMaps, fcn_spec, is_fully_convolutional, map_outputs


def predict_map(model, image, *, out=None, keep=None, certify: int | None = None, progress=None, **options):
    """The score map of one image, computed whole or in exact tiles.

    With ``tile``, the image is cut into overlapping tiles whose origins lie on
    multiples of the network's total stride and whose sides are congruent to
    the image's sides modulo that stride, so every ``same`` padding pads a tile
    as it pads the whole image; of each tile only the cells whose windows stay
    inside it (or reach past the image's own edge) are kept, and every map
    cell is written exactly once. The stitched map equals the whole-image map
    within float32 round-off. Only one batch of tiles is read from ``image`` at
    a time, so ``image`` and ``out`` may be memory-mapped or zarr arrays far
    larger than memory.

    Exact tiles of a whole network overlap by its receptive field. Where it
    computes less (``staged=None``, the default), the network is cut into
    stages at poolings that no branch crosses, and each stage is tiled on the
    stored map of the stage before, overlapping by its own receptive field
    only; stored maps larger than ``memory_budget`` go to temporary files. The
    result is the same. `plan_prediction` shows the plan.

    A classifier (a fixed input size, a vector of scores) is accepted too;
    ``method`` says how its map is computed. ``"fcn"``: its conversion
    (`as_fcn`, made once), one cell per the network's stride, exact where no
    window reaches into ``same`` padding and no layer pools over the whole
    image (squeeze-and-excitation), else an approximation. ``"windowed"``
    (`inference.windowed`): the classifier's output on every crop at
    ``stride``, exactly, borders included; the part of the network that
    commutes with cropping (a patch embedding, a convolutional stem) runs
    once over the image as an FCN (tiled and staged as below), the rest (the
    classifier's own layers) on each window's part of its map, in batches of
    ``batch_size`` windows. Transformers (ViT, DeiT, Swin, MiT) run windowed
    only. ``"auto"`` (default): the FCN where it converts, has no global
    context and ``stride`` is None or its stride, or the FCN à trous
    (`surgery.atrous.rarefy`: strides past the cut removed, later windows
    dilated) at a ``stride`` that divides its own; else windowed.
    ``plan_prediction`` with the same arguments says which method runs
    (its ``method``) and what it computes.

    Every option below is also a field of the option groups `prepare`
    takes (`Tiling`, `Execution`, `Inputs`, `MapMethod`), which may be given
    instead (``tiling=kfs.Tiling(tile=1024)``); a map in a loop is cheaper
    through one `Mapper` (``kfs.prepare(model, tile=1024).map(image)``), which
    routes the method and converts once.

    Args:
        model: a fully convolutional model from `convert` (input ``(None, None,
            None, C)``, or ``(None, C, None, None)`` for channels-first), or a
            classifier (see ``method``).
        image: one image, ``(H, W, C)`` (``(C, H, W)`` for channels-first
            models; ``(H, W)`` when ``C == 1``): a numpy array or any array
            that supports slicing (``np.memmap``, zarr). Values are fed as they
            are, cast to the model's input dtype, after ``preprocess``.
        out: an array of the map's shape to write into (numpy, memmap or
            zarr) instead of allocating one; for a model with several
            outputs, a dict of such arrays, one per output name.
        progress: show a tqdm bar over the tiles; default: when there is more
            than one tile and stderr is a terminal.
        keep: None, or a boolean ``(H', W')`` array over the map's cells (a
            tissue mask on the map's grid): only the kept cells are computed
            and the others are NaN. Each stage runs only the tiles those
            cells need, so the work follows the kept area; kept cells equal
            the unmasked map's. `plan_prediction` with the same ``keep``
            shows the plan. For a windowed map: a boolean array over its
            windows; only the kept windows are computed (and only the part
            of the shared map they read).
        certify: None or 0 (default), or a number of cells to compare with the
            classifier on the crops they stand for, once the map is done
            (`certify_map`: an `InexactMapWarning` when they differ, as they
            do near windows that reach into ``same`` padding).
        **options: the options, as keywords or as their groups (`Tiling`, `Execution`, `Inputs`,
            `MapMethod`; see `prepare`); an unknown one is a `TypeError`:

            - ``tile``: ``None`` for one pass over the whole image, or the largest
              tile side ``T`` or ``(T_h, T_w)`` in input pixels. Each side is
              rounded up to a multiple of the network's stride, and the image
              side's remainder modulo the stride is added (so tiles pad like the
              image); a side at least the image's is not cut. The tiles are then
              shortened evenly as far as that needs no more of them. With
              staging, deeper stages use tiles as large as keep their
              activations within those of one such tile through the network.
            - ``batch_size``: tiles per forward pass; default: as many as make about 1
              million input pixels (one tile of 1024 x 1024 or more), and for
              deeper stages as many as hold as many activations.
            - ``preprocess``: a function applied to each tile's pixels (a float32
              array in the image's layout in, same shape out) before the model,
              such as
              ``keras.applications.vgg16.preprocess_input``. It must treat each
              pixel on its own, or tiles would differ from the whole image.
            - ``engine``: how the forward pass runs: ``"tf"`` (TensorFlow, no XLA),
              ``"xla"`` (compiled with XLA once per tile batch shape),
              ``"blas"`` (a converted classifier's large-kernel head convolution
              as blocked matrix products in numpy's BLAS, the rest as
              ``"tf"``; CPU and float32 only, `inference.blas`), ``"jax"``
              (`jax.jit`, under ``KERAS_BACKEND=jax``, where ``"tf"`` and
              ``"xla"`` are refused), or ``"auto"``
              (default): the fastest of those on this machine, timed on first
              use for the model and tile batch shape and remembered
              (`inference.engines`; passes under about 4 GMAC a call run
              the backend's own, ``"tf"`` or ``"jax"``, untimed). Every stage runs under the same engine;
              `plan_prediction` with ``engine=`` shows the choice and why.
            - ``jit_compile``: deprecated; True is ``engine="xla"``, False
              ``engine="tf"``.
            - ``staged``: None (default) to stage the network when that computes less
              than plain exact tiles, True to require staging (a
              `ConversionError` says why a network cannot be staged), False for
              plain tiles. Ignored without ``tile``.
            - ``memory_budget``: bytes of stored stage maps kept in memory (default 64
              MiB); larger maps are written to temporary files in ``spill_dir``
              and removed at the end, even when the pass is interrupted. A
              windowed map runs its windows in bands of window rows whose
              shared maps fit it (`plan_prediction` shows the bands), so
              neither the image nor the whole shared map is held.
            - ``prefetch``: read and preprocess the next batch of tiles on a background
              thread while the model computes the current one.
            - ``precision``: ``"float32"`` (default), ``"bfloat16"`` or
              ``"float16"``: compute at it with float32 variables (Keras's
              ``mixed_bfloat16`` / ``mixed_float16`` policy) on a copy of the
              model, for FCN and windowed maps alike: bfloat16 is about twice
              as fast on CPUs with AMX (docs/dense-maps.md), both are on GPUs
              with tensor cores; float16 is slower on most CPUs. The map is
              stored in float32 and matches the float32 one to the precision's
              tolerance (`certificate.precision_tolerance`: 6e-2 and 2e-2 of
              the output scale), which ``certify`` checks. ``engine="auto"``
              never lowers the precision on its own.
            - ``mixed_precision``: an alias of ``precision="float16"`` (the
              older flag).
            - ``spill_dir``: the folder for spilled stage maps (default: the system's
              temporary folder).
            - ``stride``: for a classifier, pixels between windows, ``s`` or ``(s_h,
              s_w)``: for a windowed map a multiple of the stride of its shared
              part (an `InputError` names it otherwise); default: the stride of
              the classifier's FCN (a classifier without one needs it). For an
              FCN, its own stride or one that divides it (à trous).
            - ``method``: ``"auto"``, ``"fcn"`` or ``"windowed"``, for a classifier
              (see above).

    Returns:
        The map, ``(H', W', K)`` (``(K, H', W')`` for channels-first), as a
        float array, or ``out`` when given. ``geometry(fcn).output_size((H, W))``
        is ``(H', W')``. With ``certify``, a `CertifiedMap` ``(scores,
        certificate)`` instead: the map and its `MapCertificate` (for a model
        with several outputs, a dict of them by output name).

        For a model with several outputs (a class score and a box, say), an
        `OutputMaps`: a dict of maps keyed by output name (`FcnSpec.names`),
        in the model's order, each with its own channels and
        ``geometry(fcn, output=name).output_size((H, W))`` cells. Tiles and
        stages serve every output at once, exactly, when their maps share one
        grid (`geometry(fcn)` without ``output``); outputs on different grids
        run in one whole-image pass only (``tile=None``, no ``keep``).

        A windowed map has one cell per window: ``H' = (H - h) // s_h + 1``
        for windows of ``h`` pixels at stride ``s_h``; cell ``(i, j)`` is the
        classifier's output on the crop at ``(i * s_h, j * s_w)``
        (`plan_prediction` gives ``map_size``). It takes one-output
        classifiers.

    Raises:
        ConversionError: for a model that is not fully convolutional, an
            image of the wrong rank or channels or smaller than the network's
            minimum input, tiles too small to keep any cell, tiling a network
            with global context or outputs on different grids, or an ``out``
            of the wrong shape.
        InputError: for an unknown ``engine``, ``"blas"`` where it cannot
            run, or both ``engine`` and ``jit_compile`` given.
        UncertifiableMapError: with ``certify``, for a map whose cells are
            not the classifier on crops (see `certify_map`).

    Example:

    ```python
    fcn = kfs.convert(classifier)
    image = np.load("slide.npy", mmap_mode="r")  # 30000 x 30000 x 3, never read whole
    cells = kfs.geometry(fcn).output_size(image.shape[:2])
    scores = zarr.open_array("scores.zarr", mode="w", shape=(*cells, 1000), dtype="float32")
    kfs.predict_map(fcn, image, tile=2048, out=scores)
    ```
    """
    if certify:
        check_cell_count(certify, "certify")  # before the pass and before the model is prepared
    mapper = prepare_map(model, "predict_map", options)
    scores = mapper.map(image, out=out, keep=keep, progress=progress)
    if not certify:
        return scores
    certificate = mapper.certificate(image, scores, certify, keep=keep)
    warn_if_inexact(certificate, stacklevel=2)
    return CertifiedMap(scores, certificate)


def prepare_map(model, entry: str, options: dict) -> Mapper:
    """The `Mapper` of one call of ``entry`` (its flat keywords or option groups, checked here once)."""
    return Mapper(model, MapOptions.of(entry, **options))


def plan_prediction(model, image_size, *, keep=None, engine: str | None = None, **options):
    """The plan `predict_map` follows for an image of this size: stages, tiles, work and memory.

    For a classifier, ``stride`` and ``method`` choose the method as in
    `predict_map`: its FCN's plan, or a `WindowedPlan` (the split, the
    windows, the strips, and the cost against the sliding window and the FCN
    where one exists). Either plan's ``method`` says which
    (``"fcn"`` or ``"windowed"``).

    Args:
        model: a fully convolutional model from `convert`, or a classifier.
        image_size: ``(H, W)`` of the image.
        keep: None, or a boolean ``(H', W')`` array over the map's cells:
            only the kept cells are needed. Working back from them, each
            stage runs only the tiles whose output those cells need (its
            receptive field), and may use smaller tiles than the unmasked
            plan where that computes less.
        engine: None, or as for `predict_map` (``"auto"``, ``"tf"``,
            ``"xla"``, ``"blas"``): the plan then says which execution runs
            and why; ``"auto"`` measures on first use (`engines.choose_engine`).
        **options: `predict_map`'s options (or their groups, as `prepare`
            takes them), of which these shape the plan:

            - ``tile``: as for `predict_map`: None (one pass) or the largest tile side.
            - ``staged``: None to stage the network when that computes less
              than plain exact tiles, True to require it, False for plain tiles.
            - ``batch_size``: tiles per forward call; default: chosen per stage
              from the tiles' activations.
            - ``memory_budget``: bytes of stored stage maps kept in memory
              (default 64 MiB); larger maps go to temporary files on disk.
            - ``stride``, ``method``: for a classifier, as for `predict_map`.

    Returns:
        A `PredictionPlan` (or, for a windowed map, a
        `inference.windowed.WindowedPlan`); ``print(plan)`` shows it.

    Raises:
        ConversionError: as `predict_map`; with ``staged=True``, also when the
            network cannot be staged (it pools over the whole map, or has no
            cut between its input and output).
    """
    return Mapper(model, MapOptions.of("plan_prediction", **options)).plan(image_size, keep=keep, engine=engine)


def predict_maps(model, images, *, keep=None, certify: int | None = None, progress: bool | None = False, **options):
    """The score maps of several images, small ones of equal size batched through the network together.

    Images of one size that each run as one pass (no ``tile``, or a tile at
    least the image) go through the model in batches, which is faster than
    one call per image for small images; any other image goes through
    `predict_map` on its own (tiled, staged).

    Args:
        model: a fully convolutional model from `convert` (or a classifier, as
            for `predict_map`).
        images: a sequence of images, each as for `predict_map` (sizes may
            differ).
        keep: as for `predict_map`, for the images that go through it.
        certify: as for `predict_map`, for every image.
        progress: as for `predict_map`.
        **options: the options of `predict_map` (``tile``, ``batch_size``:
            images per forward pass, default as many as make about 1 million
            pixels; ``preprocess``, ``engine``: ``"auto"`` chooses for each
            batch shape; ``mixed_precision``...), or their groups.

    Returns:
        The maps, in the order of ``images`` (for a model with several
        outputs, an `OutputMaps` each, as `predict_map`; with ``certify``, a
        `CertifiedMap` for each).

    Raises:
        ConversionError: as `predict_map`.
    """
    if certify:
        check_cell_count(certify, "certify")
    mapper = prepare_map(model, "predict_maps", options)
    images = [public_arguments(mapper.model, image)[1] for image in images]  # arrays, PIL images, paths
    if mapper.method == "windowed":
        maps = [mapper.map(image, keep=keep, progress=False) for image in images]
        return _certified(mapper, images, maps, certify, keep)
    fcn, tiles, execution, preprocess = mapper.runnable, mapper.tiling, mapper.execution, mapper.inputs.preprocess
    spec = outputs = fcn_spec(fcn)
    batch_size = tiles.batch_size
    if batch_size is not None and batch_size < 1:
        raise InputError(f"Expected `batch_size` >= 1. Received: batch_size={batch_size}")
    images = [runner.with_channel_axis(image, spec) for image in images]
    sizes = [runner.image_size_of(image, spec) for image in images]
    results: list = [None] * len(images)
    by_size: dict = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    requested = None if tiles.tile is None else runner.pair(tiles.tile, "tile")
    grids = [mapper.grid_of(name) for name in outputs.names] if outputs.several else [mapper.grid]
    precision = execution.policy
    dtype = runner.input_dtype(fcn)
    with runner.progress_bar(len(images), progress, "images") as bar:
        for size, indices in by_size.items():
            if requested is not None and any(t < n for t, n in zip(requested, size)):
                for index in indices:
                    results[index] = mapper.map(images[index], keep=keep, progress=False)
                    bar.update(1)
                continue
            for grid in grids:
                runner.check_image_size(size, grid)  # type: ignore[arg-type]
            whole = tiling.AxisTile(0, size[0], 0, 0, 0), tiling.AxisTile(0, size[1], 0, 0, 0)
            per_batch = batch_size or max(1, runner.PIXELS_PER_BATCH // (size[0] * size[1]))
            call_shape = spec.layout.batch_shape(min(per_batch, len(indices)), size[0], size[1], spec.channels)
            chosen = engines.choose_engine(fcn, call_shape, execution.engine, precision).engine
            forward = engines.forward(fcn, chosen, precision)

            def load(group):
                return np.stack([runner.read_tile(images[i], spec, *whole, preprocess, dtype) for i in group])

            def write(group, result):
                maps = runner.as_maps(result)
                for position, index in enumerate(group):
                    own = [np.asarray(m[position], dtype=runner.output_dtype(fcn, k)) for k, m in enumerate(maps)]
                    results[index] = OutputMaps(outputs.outputs, own) if outputs.several else own[0]
                bar.update(len(group))

            groups = [indices[first : first + per_batch] for first in range(0, len(indices), per_batch)]
            runner.run_batches(forward, groups, load, write, prefetch=tiles.prefetch)
    return _certified(mapper, images, results, certify, keep)


def _certified(mapper: Mapper, images, results: list, certify, keep) -> list:
    if not certify:
        return results
    for index, (image, scores) in enumerate(zip(images, results)):  # a loop: warnings point at the caller
        certificate = mapper.certificate(image, scores, certify, keep=keep)
        warn_if_inexact(certificate, stacklevel=3)
        results[index] = CertifiedMap(scores, certificate)
    return results


def certify_map(
    model,
    image,
    score_map,
    n: int = DEFAULT_CELLS,
    *,
    keep=None,
    tolerance: float | None = None,
    seed: int = 0,
    output: str | None = None,
    **options,
):
    """Compare ``n`` sampled cells of a score map with the classifier run on the crops they stand for.

    The cells are drawn deterministically (``seed``) among those whose crop
    lies inside the image: the four corners of that region first, then one
    cell from each of a grid of blocks over it. Each crop is cut from
    ``image``, preprocessed as the map's tiles were, and run through the
    classifier: ``model`` itself when it is a classifier, the classifier an
    FCN was converted from in this process (while it exists), or else the
    FCN at the classifier's input size, where it computes what the
    classifier computes (`convert` verified that).

    Args:
        model: the FCN that computed the map, or its classifier (converted
            once, with ``head="window"``, for the geometry).
        image: the image the map was computed on, laid out as for `predict_map`.
        score_map: its map, ``(H', W', K)`` (``(K, H', W')`` channels-first):
            an array or anything that reads by indexing (zarr).
        n: how many cells to compare.
        keep: the boolean ``(H', W')`` mask the map was computed with (cells
            outside it are NaN, and are not sampled).
        tolerance: the relative tolerance; default: the one `convert`
            verifies at for the model's dtype.
        seed: the seed of the sampling.
        output: for a model with several outputs (``score_map`` then the
            dict of their maps `predict_map` returns), the one to certify;
            None: every one.
        **options: the map's options, as for `predict_map`, of which these matter here:

            - ``input_size``: the classifier's ``(H, W)``; default: the classifier's own
              size, the size an FCN was converted at in this process, or else the
              FCN's smallest input size (said in `MapCertificate.against`).
            - ``preprocess``: the function the map's tiles went through, as for `predict_map`.
            - ``stride``: for a classifier's windowed map (``predict_map(classifier,
              image, stride=s, method="windowed")``), its stride: cell ``(i,
              j)`` then stands for the crop at ``(i * s_h, j * s_w)``, and a
              windowed map is exact, so every sampled cell matches its crop to
              float round-off. A classifier without an FCN (a transformer)
              always has a windowed map; the stride it was computed at is needed.
              A stride that divides the FCN's names its map à trous (as
              `predict_map` computes it at that stride).

    Returns:
        A `MapCertificate`; for a model with several outputs and no
        ``output``, a dict of them by output name.

    Raises:
        UncertifiableMapError: when the map's cells are not the classifier on
            crops (a ``head="dense"`` map: several cells at the classifier's
            size), the windows of the network are unknown, or no cell's crop
            lies inside the image.
        InputError: for a map of the wrong shape or a bad ``n``.

    Warns:
        InexactMapWarning: when the cells differ from their crops beyond the
            tolerance, with the numbers and the reason (``same`` padding, a
            network that pools over the whole image).

    Example:

    ```python
    scores = kfs.predict_map(fcn, image)
    print(kfs.certify_map(fcn, image, scores))  # 8 of 120 eligible cells ...: exact
    ```
    """
    check_cell_count(n, "n")
    stride = options.get("stride")
    if stride is not None and "method" not in options and not is_fully_convolutional(model):
        # a stride names the classifier's windowed map, or its FCN à trous at a stride dividing the FCN's
        options["method"] = "auto" if windowed.is_finer_stride(model, stride) else "windowed"
    mapper = prepare_map(model, "certify_map", options)
    certificate = mapper.certificate(image, score_map, n, keep=keep, tolerance=tolerance, seed=seed, output=output)
    warn_if_inexact(certificate, stacklevel=2)
    return certificate


def sliding_window_predict(
    model, image, stride, *, batch_size: int = 32, preprocess=None, progress: bool | None = False
):
    """The naive baseline: the classifier on every window of its input size.

    Windows start at ``(i * stride_h, j * stride_w)`` for every position that
    fits inside the image, are cut from ``image`` batch by batch and run
    through the source classifier. For a network without padding this is what
    the converted FCN computes at ``stride`` equal to the network's stride.

    Args:
        model: the source classifier, with a fixed input size.
        image: one image, laid out as for `predict_map`.
        stride: pixels between windows, ``s`` or ``(s_h, s_w)``.
        batch_size: windows per forward pass.
        preprocess: a function applied to each window's pixels first.
        progress: show a tqdm bar over the batches.

    Returns:
        ``(H', W', K)`` scores (``(K, H', W')`` for channels-first models),
        one cell per window; for a classifier with several outputs, a dict of
        such maps by output name (as `predict_map` returns for its FCN).

    Raises:
        ConversionError: for a model without a fixed input size or a vector
            output, or an image smaller than one window.
    """
    model, image, preprocess = public_arguments(model, image, preprocess)
    model = traced_model(model)  # a subclassed classifier: its functional twin, same layers
    model_format = model_layout(model)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in model_format.spatial_shape(shape)):
        raise ConversionError(
            f"Model '{model.name}' takes inputs of shape {shape}; the sliding window needs a classifier with a "
            "fixed input size (the window)."
        )
    spec = ImageSpec(model_format, int(model_format.channels(shape)))
    window = tuple(int(d) for d in model_format.spatial_shape(shape))
    for tensor in model.outputs:
        if len(tensor.shape) != 2:
            raise ConversionError(
                f"Model '{model.name}' outputs shape {tuple(tensor.shape)}; the sliding window needs a "
                "classifier that returns one vector of scores per image (from each output)."
            )
    if batch_size < 1:
        raise InputError(f"Expected `batch_size` >= 1. Received: batch_size={batch_size}")
    image = runner.with_channel_axis(image, spec)
    size = runner.image_size_of(image, spec)
    strides = runner.pair(stride, "stride")
    counts = []
    for name, length, side, step in zip(("height", "width"), size, window, strides):
        if length < side:
            raise ConversionError(
                f"Image {name} {length} is smaller than the window of {window[0]}x{window[1]} pixels of "
                f"'{model.name}'. Use a larger image."
            )
        counts.append((length - side) // step + 1)
    positions = list(itertools.product(range(counts[0]), range(counts[1])))
    scores = [np.empty((len(positions), int(tensor.shape[-1])), dtype=np.float32) for tensor in model.outputs]
    forward = engines.forward(model, engines.native())
    dtype = runner.input_dtype(model)
    batches = range(0, len(positions), batch_size)

    def load(first):
        return np.stack(
            [
                runner.read_tile(
                    image,
                    spec,
                    tiling.AxisTile(i * strides[0], i * strides[0] + window[0], 0, 0, 0),
                    tiling.AxisTile(j * strides[1], j * strides[1] + window[1], 0, 0, 0),
                    preprocess,
                    dtype,
                )
                for i, j in positions[first : first + batch_size]
            ]
        )

    with runner.progress_bar(len(batches), progress, "batches") as bar:

        def write(first, result):
            for target, maps in zip(scores, runner.as_maps(result)):
                target[first : first + len(maps)] = maps
            bar.update(1)

        runner.run_batches(forward, batches, load, write, prefetch=True)
    grids = [model_format.image_from_channels_last(s.reshape(counts[0], counts[1], -1)) for s in scores]
    return OutputMaps(map_outputs(model), grids) if len(grids) > 1 else grids[0]
