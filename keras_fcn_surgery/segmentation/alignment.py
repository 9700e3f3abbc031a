"""Where an upsampled score map's cells land on a finer grid (pure arithmetic).

A score map's cell ``i`` sits at the centre of its input window,
``offset + i * stride + (receptive_field - 1) / 2`` (pixel coordinates;
a half-integer when the receptive field is even). Upsampling a coarse map
(stride ``S``) onto a finer grid (stride ``s``, ``S = r * s``: a skip map, or
the pixels themselves with ``s = 1``) by a transposed convolution with stride
``r`` and a bilinear kernel of side ``k`` puts coarse cell ``i``'s peak at
position ``i * r + (k - 1) / 2`` of its output. Fine cell ``j`` (centre
``c_fine + j * s``) lies at coarse position ``(c_fine + j * s - c_coarse) / S``,
so it reads the transposed convolution's output at::

    q_j = j + (c_fine - c_coarse) / s + (k - 1) / 2

which is a whole number when the kernel's phase (``k`` odd or even) matches
the fractional part of ``(c_fine - c_coarse) / s``. ``same`` padding makes
offsets depend on the input size modulo the stride, so the shift
``q_j - j`` is tabulated per residue.
"""

from __future__ import annotations

from dataclasses import dataclass

from keras_fcn_surgery.segmentation.bilinear import kernel_centre, kernel_size


@dataclass(frozen=True)
class AxisAlignment:
    """One axis of one upsampling step.

    Attributes:
        ratio: the transposed convolution's stride (coarse stride / fine stride).
        kernel_size: side of its bilinear kernel (``2 * ratio`` or ``2 * ratio - 1``).
        shifts: ``q_j - j`` for each input length modulo ``period``.
        period: the modulus of ``shifts`` (1 when the shift is the same at every size).
    """

    ratio: int
    kernel_size: int
    shifts: tuple[int, ...]
    period: int

    @property
    def constant(self) -> bool:
        return len(set(self.shifts)) == 1

    @property
    def margin(self) -> float:
        """Positions of the transposed convolution's output before the first peak (and after the last)."""
        return kernel_centre(self.kernel_size)


def cell_centre(offset: float, receptive_field: int) -> float:
    """Centre of cell 0's input window: ``offset + (receptive_field - 1) / 2``."""
    return offset + (receptive_field - 1) / 2


def align_axis(
    coarse_stride: int, fine_stride: int, coarse_centres, fine_centres, period: int, first_length: int = 0
) -> AxisAlignment:
    """The upsampling step that places a coarse map's cells on a fine grid.

    Args:
        coarse_stride: stride of the coarse map.
        fine_stride: stride of the target grid (1 for pixels).
        coarse_centres: cell 0's centre of the coarse map at the input lengths
            ``first_length, first_length + 1, ...``, ``2 * period`` of them.
        fine_centres: the same for the target grid (0 for pixels).
        period: how often the centres repeat (the coarse stride).
        first_length: the input length of the first entries.

    Returns:
        An `AxisAlignment` whose ``shifts[L % period]`` is the shift at input length ``L``.

    Raises:
        ValueError: when the strides do not divide, the cells fall between
            the positions any bilinear kernel can reach, or the shift does not
            repeat with ``period``.
    """
    if coarse_stride % fine_stride:
        raise ValueError(
            f"A map of stride {coarse_stride} cannot be upsampled onto a grid of stride {fine_stride}: "
            "the ratio must be a whole number."
        )
    ratio = coarse_stride // fine_stride
    doubled = [2 * (f - c) / fine_stride for c, f in zip(coarse_centres, fine_centres)]
    if any(d != int(d) for d in doubled):
        raise ValueError(
            "The finer grid's cells fall between the upsampled map's positions "
            f"(centre distances {sorted({d / 2 for d in doubled})} in fine cells); "
            "only whole and half positions can be reached."
        )
    phases = {int(d) % 2 for d in doubled}
    if len(phases) > 1:
        raise ValueError("The half-pixel phase of the cell centres changes with the input size.")
    size = kernel_size(ratio, half_phase=phases.pop() == 1)
    shifts = [round(d / 2 + kernel_centre(size)) for d in doubled]
    if len(shifts) != 2 * period or shifts[:period] != shifts[period:]:
        raise ValueError(f"The cell centres do not repeat every {period} input pixels: shifts {shifts}.")
    table = [0] * period
    for k, shift in enumerate(shifts[:period]):
        table[(first_length + k) % period] = shift
    return AxisAlignment(ratio=ratio, kernel_size=size, shifts=tuple(table), period=period)
