"""Bilinear upsampling kernels (pure NumPy), as FCN's ``surgery.upsample_filt``.

A transposed convolution with stride ``r`` and one of these kernels on the
class diagonal interpolates its input linearly between cells: cell ``i``'s
value peaks at output position ``i * r + centre`` and falls to zero ``r``
positions away.
"""

from __future__ import annotations

import numpy as np


def kernel_centre(size: int) -> float:
    """Position of a bilinear kernel's peak: ``(size - 1) / 2`` (half-integer for even sizes)."""
    return (size - 1) / 2


def upsample_filt(size: int) -> np.ndarray:
    """The ``size x size`` bilinear filter, the same numbers as FCN's ``upsample_filt(size)``.

    Args:
        size: kernel side; ``2 * r`` (or ``2 * r - 1``) upsamples by ``r``.

    Returns:
        A float64 array ``(size, size)``.
    """
    profile = bilinear_profile(size)
    return np.outer(profile, profile)


def bilinear_profile(size: int) -> np.ndarray:
    """One axis of the bilinear filter: ``1 - |k - centre| / factor``, ``factor = ceil(size / 2)``."""
    if size < 1:
        raise ValueError(f"Expected a kernel size >= 1. Received: size={size}")
    factor = (size + 1) // 2
    positions = np.arange(size, dtype=np.float64)
    return 1 - np.abs(positions - kernel_centre(size)) / factor


def kernel_size(ratio: int, half_phase: bool) -> int:
    """Side of the bilinear kernel that upsamples by ``ratio``.

    ``2 * ratio`` puts each cell's peak at a half position (FCN's choice);
    ``2 * ratio - 1`` at a whole one. Both are exact linear interpolation
    between neighbouring cells; the phase picks which one lands on the target
    grid.
    """
    if ratio < 1:
        raise ValueError(f"Expected an upsampling ratio >= 1. Received: ratio={ratio}")
    return 2 * ratio if half_phase else 2 * ratio - 1


def diagonal_kernel(size, classes: int, dtype="float32") -> np.ndarray:
    """A `Conv2DTranspose` kernel ``(kh, kw, classes, classes)``: the bilinear filter from each class to itself.

    Args:
        size: ``(kh, kw)``; each axis gets its own bilinear profile.
        classes: input and output channels.
    """
    height, width = size
    spatial = np.outer(bilinear_profile(height), bilinear_profile(width))
    kernel = np.zeros((height, width, classes, classes), dtype=dtype)
    for k in range(classes):
        kernel[:, :, k, k] = spatial
    return kernel
