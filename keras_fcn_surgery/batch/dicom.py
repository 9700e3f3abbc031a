"""DICOM maps: the class scores as a tiled float32 Parametric Map, their top class as a Segmentation and its regions
as Microscopy Bulk Simple Annotations (highdicom).

The output ``<name>.dicom/`` is a folder of DICOM instances, to store in the
archive beside the slide (IDC, Slim, OHIF read them)::

    slide.dicom/
        parametric-map.dcm   the scores: one float32 channel per class, tiled frames
        segmentation.dcm     the top class of each computed cell: a binary segment per class, named by it
        annotations.dcm      the connected regions of each top class: one annotation group of polygons per class

Both are in the slide's study and on its frame of reference, and reference
the slide's full-resolution image as their source. Their total pixel
matrix is the score map, one pixel per cell: the pixel spacing is the map's
stride times the level's downsample times the slide's pixel spacing, and
pixel ``(0, 0)``'s centre (DICOM's Total Pixel Matrix Origin) is cell
``(0, 0)``'s window centre on the slide, so each cell sits where its window
is. Each class's real-world value mapping is the identity (the stored float32
values are the scores, bit for bit; NaN where no cell was computed) named by
its class; a cell not computed is in no segment.

A map of another input (a TIFF, an OpenSlide slide, an image) has no DICOM
image to reference: its objects are put in a new study of their own (new
study, series and frame of reference identifiers, no patient), on a slide
coordinate system whose origin is the centre of the input's level-0 pixel
``(0, 0)``, rows along Y and columns along X, with the input's resolution
(its microns per pixel) as the level-0 pixel spacing. The Parametric Map
references no image; the Segmentation, the top class of its scores, is derived
from it. An input that records no resolution is refused before its map is
computed.

The annotations are 2D polygons along the cells' box edges, in the total
pixel matrix of the slide's full-resolution image (level-0 pixels, ``(0, 0)``
the top left corner of its top left pixel) for a DICOM slide, of the
Parametric Map (map cells) for another input; one group per class present,
labelled by it. A DICOM polygon has no holes, so a region with holes is split
into hole-free polygons of exactly its cells (`hole_free_polygons`): the
polygons of a class cover its cells exactly, without overlaps. None is
written when no cell was computed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from keras_fcn_surgery.batch import regions
from keras_fcn_surgery.batch.readers import open_reader
from keras_fcn_surgery.batch.sources import dicom_files, is_dicom
from keras_fcn_surgery.batch.writers import MapInfo, class_name, corner_positions, top_classes
from keras_fcn_surgery.errors import InputError

PARAMETRIC_MAP = "parametric-map.dcm"
SEGMENTATION = "segmentation.dcm"
ANNOTATIONS = "annotations.dcm"
# Cells per frame side of the tiled Parametric Map.
TILE = 256
_MANUFACTURER = "keras-fcn-surgery"


MISSING_HIGHDICOM = (
    "The dicom output format needs the `highdicom` and `scikit-image` packages: pip install 'keras-fcn-surgery[dicom]'."
)
_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def require_highdicom():
    """The `highdicom` module, or `InputError` naming the extra that installs it (and scikit-image, which traces
    the regions)."""
    try:
        import highdicom
        import skimage.measure  # noqa: F401
    except ImportError as error:
        raise InputError(MISSING_HIGHDICOM) from error
    return highdicom


def check_source(source: str) -> None:
    """Refuse an input whose maps cannot be placed (`InputError`), before its map is computed: one that is neither
    a DICOM slide nor records its resolution."""
    if dicom_volume(source) is None:
        with open_reader(source) as reader:
            input_resolution(source, reader.mpp)


def input_resolution(source: str, mpp: float | None) -> float:
    """``mpp``, the microns per level-0 pixel of a non-DICOM input, or `InputError` naming it and the way out."""
    if mpp is None or not mpp > 0:
        raise InputError(
            f"'{source}' records no resolution (microns per pixel), which the dicom output format needs for its "
            "maps' pixel spacing. Record it in the file (a TIFF's XResolution and ResolutionUnit, e.g. "
            "tifffile.imwrite(path, image, resolution=(10000 / mpp, 10000 / mpp), resolutionunit='CENTIMETER'), "
            "or an OME-TIFF's PhysicalSizeX), or choose npz, zarr, ome-zarr, geojson or csv for it."
        )
    return float(mpp)


def source_image(source: str):
    """The slide's full-resolution VL Whole Slide Microscopy image (metadata only) that the map references.

    Raises:
        InputError: when ``source`` is not a DICOM slide.
    """
    volume = dicom_volume(source)
    if volume is None:
        raise InputError(
            f"'{source}' is not a DICOM slide (a folder of VL Whole Slide Microscopy instances, or one of them)."
        )
    return volume


def dicom_volume(source: str):
    """The full-resolution VL Whole Slide Microscopy image (metadata only) of a DICOM slide; None for another input."""
    import pydicom

    folder = source if os.path.isdir(source) else os.path.dirname(source)
    files = [source] if os.path.isfile(source) and is_dicom(source) else []
    files = dicom_files(folder) if os.path.isdir(source) or files else []
    volumes = []
    for path in files:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        if dataset.get("SOPClassUID") == _WSI and "VOLUME" in list(dataset.get("ImageType", [])):
            volumes.append(dataset)
    if not volumes:
        return None
    return max(volumes, key=lambda d: int(d.TotalPixelMatrixRows) * int(d.TotalPixelMatrixColumns))


def map_placement(source, info: MapInfo) -> tuple[tuple[float, float], tuple[float, float, float]]:
    """``(pixel_spacing, origin)`` of the map on ``source``'s slide, in millimetres.

    ``pixel_spacing`` is (between rows, between columns); ``origin`` the
    slide coordinates of map pixel ``(0, 0)``'s centre: its window's centre,
    at level-0 pixel ``(offset + receptive_field / 2) * downsample - 0.5``
    (pixel centres at integers, as DICOM's origin is the first pixel's centre).
    """
    spacing = [float(v) for v in source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    origin = source.TotalPixelMatrixOriginSequence[0]
    start = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)])
    cosines = np.array([float(v) for v in source.ImageOrientationSlide], dtype=np.float64)
    along_row, along_column = cosines[:3], cosines[3:]  # the directions of increasing column and row index
    centre = [(info.offset[a] + info.receptive_field[a] / 2) * float(info.downsample[a]) - 0.5 for a in (0, 1)]
    position = start + (centre[1] * spacing[1] * along_row + centre[0] * spacing[0] * along_column)[:2]
    z = float(origin.get("ZOffsetInSlideCoordinateSystem", 0.0) or 0.0)
    map_spacing = tuple(info.stride[a] * float(info.downsample[a]) * spacing[a] for a in (0, 1))
    return (float(map_spacing[0]), float(map_spacing[1])), (float(position[0]), float(position[1]), z)


def write_maps(folder: str, scores, info: MapInfo, class_names=None, *, mpp: float | None = None) -> None:
    """The ``(H', W', K)`` scores as a Parametric Map and their top class as a Segmentation, in ``folder``.

    See the module's docstring.

    Args:
        folder: the output folder (made if missing).
        scores: the map.
        info: its geometry and provenance.
        class_names: the classes' names, or None.
        mpp: microns per level-0 pixel of a non-DICOM input (its pixel spacing); unused for a DICOM slide.

    Raises:
        InputError: without highdicom, or for a non-DICOM input without ``mpp``.
    """
    hd = require_highdicom()
    source = dicom_volume(info.source)
    new_study = source is None
    if source is None:
        source = new_study_image(hd, info, input_resolution(info.source, mpp))
    values = np.asarray(scores[:], dtype=np.float32)
    names = [class_name(k, class_names) for k in range(values.shape[-1])]
    common = _common_arguments(hd, source, info, values.shape[:2])
    scores_map = parametric_map(hd, source, values, names, common, series_number=_series_number(source))
    if new_study:
        # The stand-in source exists nowhere: the Parametric Map references no image, and the Segmentation, the top
        # class of its scores, is derived from it.
        _drop_references(scores_map)
        common = dict(common, source_images=[scores_map])
    top_class = segmentation(hd, source, values, names, common, series_number=_series_number(source) + 1)
    os.makedirs(folder, exist_ok=True)
    scores_map.save_as(os.path.join(folder, PARAMETRIC_MAP))
    top_class.save_as(os.path.join(folder, SEGMENTATION))
    # A DICOM slide's regions are on its full-resolution image; another input's on the Parametric Map, whose pixels
    # are the cells' boxes.
    labels, probability = regions.label_map(values, top_classes)
    on_slide = None if new_study else info
    drawn = region_annotations(hd, scores_map if new_study else source, labels, probability, names, on_slide, common)
    if drawn is not None:
        drawn.save_as(os.path.join(folder, ANNOTATIONS))


def new_study_image(hd, info: MapInfo, mpp: float):
    """A stand-in for the VL Whole Slide Microscopy image a non-DICOM input would be, in a new study, on a new frame
    of reference (metadata only; never written: the Parametric Map's references to it are dropped).

    Its slide coordinates: the origin at level-0 pixel ``(0, 0)``'s centre, columns along X, rows along Y, ``mpp``
    microns apart.
    """
    from pydicom.dataset import Dataset

    image = Dataset()
    image.SOPClassUID = _WSI
    image.SOPInstanceUID = hd.UID()
    image.StudyInstanceUID = hd.UID()
    image.SeriesInstanceUID = hd.UID()
    image.FrameOfReferenceUID = hd.UID()
    image.Modality = "SM"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        setattr(image, keyword, "")
    image.ReferringPhysicianName = ""
    image.StudyDate, image.StudyTime = _now()
    image.SeriesNumber = 1
    image.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    image.ContainerIdentifier = os.path.basename(os.path.normpath(info.source))[:64]
    image.IssuerOfTheContainerIdentifierSequence = []
    image.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    specimen = Dataset()
    specimen.SpecimenIdentifier = image.ContainerIdentifier
    specimen.SpecimenUID = hd.UID()
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenPreparationSequence = []
    image.SpecimenDescriptionSequence = [specimen]
    image.ImageOrientationSlide = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0.0
    origin.YOffsetInSlideCoordinateSystem = 0.0
    image.TotalPixelMatrixOriginSequence = [origin]
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000.0, mpp / 1000.0]
    # The section's thickness is unknown, and a Segmentation needs one: that of a cubic level-0 voxel.
    measures.SliceThickness = mpp / 1000.0
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    image.SharedFunctionalGroupsSequence = [shared]
    image.TotalPixelMatrixRows = round(info.level_size[0] * float(info.downsample[0]))
    image.TotalPixelMatrixColumns = round(info.level_size[1] * float(info.downsample[1]))
    image.Rows, image.Columns, image.NumberOfFrames = TILE, TILE, 1
    return image


def _drop_references(dataset) -> None:
    """Remove the references to a stand-in source image (`new_study_image`) that exists nowhere."""
    for keyword in ("ReferencedSeriesSequence", "StudiesContainingOtherReferencedInstancesSequence"):
        if keyword in dataset:
            delattr(dataset, keyword)
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in dataset.get(keyword, []):
            if "DerivationImageSequence" in group:
                delattr(group, "DerivationImageSequence")


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _now() -> tuple[str, str]:
    import datetime

    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _common_arguments(hd, source, info: MapInfo, size) -> dict:
    """What the map's objects share: the device, and the placement of their tiled total pixel matrix."""
    spacing, origin = map_placement(source, info)
    thickness = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].get("SliceThickness")
    return dict(
        source_images=[source],
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=_MANUFACTURER,
        software_versions=_version(),
        device_serial_number="0",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="SLIDE", image_orientation=[float(v) for v in source.ImageOrientationSlide]
        ),
        plane_positions=[
            hd.PlanePositionSequence(coordinate_system="SLIDE", image_position=origin, pixel_matrix_position=(1, 1))
        ],
        tile_pixel_array=True,
        tile_size=(min(TILE, int(size[0])), min(TILE, int(size[1]))),
    )


def parametric_map(hd, source, values: np.ndarray, names, common: dict, *, series_number: int):
    """The float32 scores, one channel per class with an identity real-world value mapping named by the class."""
    from pydicom.sr.codedict import codes

    mappings = []
    for k, name in enumerate(names):
        low, high = _finite_range(values[..., k])
        mappings.append(
            [
                hd.pm.RealWorldValueMapping(
                    lut_label=name[:16],
                    lut_explanation=f"score of {name}"[:64],
                    unit=codes.UCUM.NoUnits,
                    value_range=(low, high),
                    slope=1.0,
                    intercept=0.0,
                )
            ]
        )
    low, high = _finite_range(values)
    window = hd.VOILUTTransformation(  # LINEAR_EXACT: scores span less than 1, which plain LINEAR refuses
        window_center=(low + high) / 2,
        window_width=max(high - low, 1e-6),
        window_explanation="scores",
        voi_lut_function="LINEAR_EXACT",
    )
    window.WindowCenterWidthExplanation = "scores"  # highdicom 0.28 writes a string as its characters, one a value
    return hd.pm.ParametricMap(
        pixel_array=values[np.newaxis],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=mappings,
        voi_lut_transformations=[window],
        content_label="SCORES",
        content_description="class scores of a network, one cell per pixel",
        **common,
    )


def segmentation(hd, source, values: np.ndarray, names, common: dict, *, series_number: int):
    """The top class of each computed cell as a binary Segmentation, one segment per class named by it."""
    from pydicom.sr.codedict import codes

    computed = ~np.isnan(values).any(axis=-1)
    top = np.where(computed, np.nan_to_num(values, nan=-np.inf).argmax(axis=-1), -1)
    masks = np.stack([top == k for k in range(len(names))], axis=-1)[np.newaxis].astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_MANUFACTURER, family=codes.DCM.ArtificialIntelligence, version=_version()
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k, name in enumerate(names)
    ]
    written = hd.seg.Segmentation(
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        content_label="TOP_CLASS",
        content_description="the class with the highest score of each cell",
        omit_empty_frames=False,
        **common,
    )
    # General Image's Type 2C Patient Orientation (no patient orientation on a slide: present, empty), which
    # highdicom leaves out; dciodvfy reports it missing.
    written.PatientOrientation = ""
    return written


def region_annotations(
    hd, image, labels: np.ndarray, probability: np.ndarray, names, info: MapInfo | None, common: dict
):
    """The regions of ``labels`` as Microscopy Bulk Simple Annotations of ``image``: one group of polygons per class.

    Their coordinates are 2D, in ``image``'s total pixel matrix (DICOM's ``(column, row)``, ``(0, 0)`` the top left
    corner of its top left pixel): level-0 pixels of the slide when ``info`` is given (the corners of the cells'
    boxes, `writers.corner_positions`), else map cells (``image`` is then the Parametric Map). A DICOM polygon has
    no holes: a region with holes is split into hole-free polygons (`hole_free_polygons`). None when no cell was
    computed.
    """
    from pydicom.sr.codedict import codes

    polygons: dict[int, list[np.ndarray]] = {}
    for label, ring in hole_free_polygons(labels, probability):
        x, y = ring[:-1, 0].astype(np.float64), ring[:-1, 1].astype(np.float64)  # a DICOM polygon is not closed
        if info is not None:
            x, y = corner_positions(x, y, info)
        polygons.setdefault(label, []).append(np.stack([x, y], axis=-1).astype(np.float32))
    if not polygons:
        return None
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_MANUFACTURER, family=codes.DCM.ArtificialIntelligence, version=_version()
    )
    groups = [
        hd.ann.AnnotationGroup(
            number=number,
            uid=hd.UID(),
            label=names[label][:64],
            annotated_property_category=codes.SCT.Tissue,
            annotated_property_type=codes.SCT.Tissue,
            graphic_type=hd.ann.GraphicTypeValues.POLYGON,
            graphic_data=polygons[label],
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            description=f"regions of {names[label]}"[:64],
        )
        for number, label in enumerate(sorted(polygons), start=1)
    ]
    written = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[image],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups,
        series_instance_uid=hd.UID(),
        series_number=_series_number(image) + 2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=common["manufacturer"],
        manufacturer_model_name=common["manufacturer_model_name"],
        software_versions=common["software_versions"],
        device_serial_number=common["device_serial_number"],
        content_label="REGIONS",
        content_description="connected regions of each top class, in hole-free polygons",
    )
    for group in written.AnnotationGroupSequence:  # highdicom leaves it empty for 2D, where dciodvfy forbids it
        if "CommonZCoordinateValue" in group and not group.CommonZCoordinateValue:
            del group.CommonZCoordinateValue
    return written


def hole_free_polygons(labels: np.ndarray, probability: np.ndarray):
    """``(class, ring)`` for hole-free polygons covering each connected region of a class in ``labels`` exactly.

    A region without holes is its outer ring (`regions.regions`). A region with holes is cut into pieces without:
    each row of cells that one of its holes spans into its runs of cells (rectangles), the other rows' bands into
    their connected pieces (which enclose nothing: whatever a piece enclosed, the region would enclose, in rows its
    holes span). The pieces of a region have its cells, no more, no fewer, so their areas add up to its area.
    Rings are closed ``(n, 2)`` ``(x, y)`` corners in map cells, as `regions.Region.rings`.
    """
    import skimage.measure as measure

    for region in regions.regions(labels, probability):
        if len(region.rings) == 1:
            yield region.label, region.rings[0]
            continue
        top, left, bottom, right = region.box
        outer = region.rings[0]
        first = int(outer[outer[:, 1] == top, 0].min())  # the region's leftmost cell in its top row
        components = measure.label(labels[top:bottom, left:right] == region.label, background=0, connectivity=1)
        cells = components == components[0, first - left]
        spanned = np.zeros(bottom - top, dtype=bool)
        for hole in region.rings[1:]:
            spanned[int(hole[:, 1].min()) - top : int(hole[:, 1].max()) - top] = True
        pieces = np.zeros(cells.shape, dtype=np.int64)
        start = 0
        while start < len(spanned):
            stop = start + 1
            while stop < len(spanned) and not spanned[start] and not spanned[stop]:
                stop += 1
            band = measure.label(cells[start:stop], background=0, connectivity=1)
            pieces[start:stop] = np.where(band > 0, band + pieces.max(), 0)
            start = stop
        for piece in regions.regions(pieces - 1, np.zeros(pieces.shape, np.float32)):
            if len(piece.rings) != 1:
                raise AssertionError("dicom: a piece of a region with holes has a hole (a bug: please report the map)")
            yield region.label, piece.rings[0] + np.array([left, top])


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def total_pixel_matrix(dataset) -> np.ndarray:
    """A tiled multi-frame image's frames put back in place: ``(rows, columns[, channels])`` (for tests, readers)."""
    rows, columns = int(dataset.TotalPixelMatrixRows), int(dataset.TotalPixelMatrixColumns)
    tile_rows, tile_columns = int(dataset.Rows), int(dataset.Columns)
    if "FloatPixelData" in dataset:  # uncompressed float32, read as stored (whatever pydicom's pixel options)
        frames = np.frombuffer(dataset.FloatPixelData, dtype="<f4").reshape(-1, tile_rows, tile_columns)
    else:
        frames = np.asarray(dataset.pixel_array)
    groups = dataset.PerFrameFunctionalGroupsSequence
    channels: dict[Any, int] = {}
    placed: dict[tuple[int, int, int], np.ndarray] = {}
    for n, group in enumerate(groups):
        position = group.PlanePositionSlideSequence[0]
        top = int(position.RowPositionInTotalImagePixelMatrix) - 1
        left = int(position.ColumnPositionInTotalImagePixelMatrix) - 1
        channel = channels.setdefault(_frame_channel(group), len(channels))
        placed[(channel, top, left)] = frames[n] if frames.ndim == 3 else frames
    result = np.full((len(channels), rows, columns), np.nan, dtype=frames.dtype)
    for (channel, top, left), frame in placed.items():
        bottom, right = min(top + tile_rows, rows), min(left + tile_columns, columns)
        result[channel, top:bottom, left:right] = frame[: bottom - top, : right - left]
    return np.moveaxis(result, 0, -1)


def _frame_channel(group):
    mapping = group.get("RealWorldValueMappingSequence")
    return (mapping[0].LUTLabel, mapping[0].LUTExplanation) if mapping else 0


def _series_number(source) -> int:
    return int(source.get("SeriesNumber", 0) or 0) + 100


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keras-fcn-surgery")
    except PackageNotFoundError:
        return "unknown"
