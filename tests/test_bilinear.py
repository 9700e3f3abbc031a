"""Bilinear upsampling kernels (segmentation.bilinear: pure NumPy)."""

import numpy as np
import pytest

from keras_fcn_surgery.segmentation import bilinear


def test_profiles_of_small_and_even_sizes():
    np.testing.assert_array_equal(bilinear.bilinear_profile(1), [1.0])
    np.testing.assert_array_equal(bilinear.bilinear_profile(3), [0.5, 1.0, 0.5])
    np.testing.assert_array_equal(bilinear.bilinear_profile(4), [0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(bilinear.bilinear_profile(5), [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3])
    assert bilinear.kernel_centre(4) == 1.5 and bilinear.kernel_centre(5) == 2.0
    np.testing.assert_array_equal(bilinear.upsample_filt(3), np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5]))


def test_sizes_and_ratios_below_one_are_refused():
    with pytest.raises(ValueError, match="size >= 1"):
        bilinear.bilinear_profile(0)
    with pytest.raises(ValueError, match="ratio >= 1"):
        bilinear.kernel_size(0, True)
    with pytest.raises(ValueError, match="ratio >= 1"):
        bilinear.kernel_size(0, False)


def test_kernel_size_by_phase():
    assert [bilinear.kernel_size(r, True) for r in (1, 2, 8)] == [2, 4, 16]
    assert [bilinear.kernel_size(r, False) for r in (1, 2, 8)] == [1, 3, 15]


@pytest.mark.parametrize("ratio", [1, 2, 3, 4])
@pytest.mark.parametrize("half_phase", [True, False])
def test_the_kernels_interpolate_linearly(ratio, half_phase):
    # A transposed convolution of a ramp: every output between the first and last peak lies on the line.
    size = bilinear.kernel_size(ratio, half_phase)
    profile = bilinear.bilinear_profile(size)
    values = np.arange(6, dtype=np.float64) * 2.0 + 1.0
    out = np.zeros(5 * ratio + size)
    for i, value in enumerate(values):
        out[i * ratio : i * ratio + size] += value * profile
    centre = bilinear.kernel_centre(size)
    positions = np.arange(out.size)
    inside = (positions >= centre + ratio) & (positions <= centre + 4 * ratio)
    expected = 1.0 + 2.0 * (positions - centre) / ratio
    np.testing.assert_allclose(out[inside], expected[inside])


def test_diagonal_kernel_maps_each_class_to_itself_only():
    kernel = bilinear.diagonal_kernel((4, 3), 3)
    assert kernel.shape == (4, 3, 3, 3) and kernel.dtype == np.float32
    for k in range(3):
        np.testing.assert_allclose(kernel[:, :, k, k], np.outer([0.25, 0.75, 0.75, 0.25], [0.5, 1.0, 0.5]))
    off_diagonal = kernel.sum(axis=(0, 1)) * (1 - np.eye(3))
    assert not off_diagonal.any()
