"""Synthetic whole slides for the benchmarks: slide-like pixels and a pyramidal tiled TIFF of them."""

from __future__ import annotations

import numpy as np


def slide_pixels(side: int, seed: int = 0) -> np.ndarray:
    """Bright glass around an ellipse of textured tissue covering about 30% of the area (RGB, uint8)."""
    rng = np.random.default_rng(seed)
    ys = (np.arange(side) / side)[:, None]
    xs = (np.arange(side) / side)[None, :]
    tissue = ((ys - 0.45) / 0.33) ** 2 + ((xs - 0.5) / 0.29) ** 2 < 1
    noise = rng.normal(0, 20, (side, side, 3)).astype(np.float32)
    pixels = np.where(tissue[..., None], noise + [200, 110, 160], noise * 0.2 + 236)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_pyramid(path: str, pixels: np.ndarray, tiff_tile: int = 256) -> None:
    """A pyramidal tiled BigTIFF (zlib; SubIFD levels halving down to 512 pixels) of ``pixels``."""
    import tifffile

    levels = 1
    while pixels.shape[0] // 2**levels >= 512:
        levels += 1
    options = {"tile": (tiff_tile, tiff_tile), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(pixels, subifds=levels - 1, **options)
        for level in range(1, levels):
            tif.write(pixels[:: 2**level, :: 2**level], subfiletype=1, **options)
