"""The optional packages a `predict` job needs for its formats and options, all checked at once before any work
(no Keras or TensorFlow here: the CLI runs it before TensorFlow starts)."""

from __future__ import annotations

import importlib.util

from keras_fcn_surgery.errors import InputError

# (module, package to install, extra that brings it), per need.
ZARR = ("zarr", "zarr", "ome")
SCIKIT_IMAGE = ("skimage", "scikit-image", "slides")
RAY = ("ray", "ray[data]", "ray")


def needs(formats, *, geojson: str = "regions", mask=None, engine: str = "local") -> dict[str, list[str]]:
    """What the job needs, by option: ``{"--format ome-zarr": [ZARR], ...}`` (the modules' tuples)."""
    wanted: dict = {}
    for name in formats:
        if name in ("zarr", "ome-zarr"):
            wanted[f"--format {name}"] = [ZARR]
        elif name == "geojson" and geojson == "regions":
            wanted["--format geojson (regions)"] = [SCIKIT_IMAGE]
    if mask == "auto":
        wanted["--mask auto"] = [SCIKIT_IMAGE]
    if engine == "ray":
        wanted["--engine ray"] = [RAY]
    return wanted


def check_packages(formats, *, geojson: str = "regions", mask=None, engine: str = "local") -> None:
    """Raise `InputError` naming every missing package, what asks for it, and the one ``pip install`` line that
    brings them all; nothing when all are installed.

    Raises:
        InputError: when a package the formats or options need is missing.
    """
    missing: dict = {}
    for option, requirements in needs(formats, geojson=geojson, mask=mask, engine=engine).items():
        for requirement in requirements:
            if not _installed(requirement[0]):
                missing.setdefault(requirement, []).append(option)
    if not missing:
        return
    listed = "; ".join(f"{package} (for {', '.join(options)})" for (_, package, _), options in missing.items())
    extras = ",".join(sorted({extra for _, _, extra in missing}))
    raise InputError(
        f"This job needs packages that are not installed: {listed}. Install them all with: "
        f"pip install 'keras-fcn-surgery[{extras}]' (from a clone: pip install \".[{extras}]\")."
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package missing or broken
        return False
