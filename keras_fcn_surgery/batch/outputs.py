"""Where a batch's outputs go and how its summary reads: no Keras or TensorFlow, so the CLI can answer a rerun
with nothing to do before TensorFlow starts."""

from __future__ import annotations

import os

from keras_fcn_surgery.batch.formats import FORMATS as _REGISTERED
from keras_fcn_surgery.errors import InputError

FORMATS = tuple(_REGISTERED)
SUFFIXES = {name: kind.suffix for name, kind in _REGISTERED.items()}


def check_formats(formats) -> tuple[str, ...]:
    """``"npz"``, ``"npz,geojson"`` or a sequence of names -> a tuple of known format names."""
    if isinstance(formats, str):
        formats = formats.split(",")
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise InputError(f"Expected output formats among {', '.join(FORMATS)}. Received: {formats!r}")
    for name in chosen:
        _REGISTERED[name].check_available()
    return chosen


def output_paths(out_dir, name: str, formats) -> dict[str, str]:
    """Where each format's output of the input named ``name`` goes."""
    base = os.path.join(os.path.abspath(os.fspath(out_dir)), *name.split("/"))
    return {f: base + SUFFIXES[f] for f in formats}


def summary_line(results, seconds: float) -> str:
    """``"3 done, 1 skipped, 1 failed in 12.0 s (... MP/s ...)"`` for results with ``status``, ``megapixels``
    and ``computed_fraction``."""
    done = [r for r in results if r.status == "done"]
    skipped = sum(r.status == "skipped" for r in results)
    failed = sum(r.status == "failed" for r in results)
    megapixels = sum(r.megapixels for r in done)
    text = f"{len(done)} done, {skipped} skipped, {failed} failed in {seconds:.1f} s"
    if done and seconds > 0:
        computed = sum(r.megapixels * r.computed_fraction for r in done) / max(megapixels, 1e-12)
        text += (
            f" ({len(done) / seconds:.2f} images/s, {megapixels / seconds:.2f} MP/s; "
            f"{100 * computed:.1f}% of the pixels computed)"
        )
    return text
