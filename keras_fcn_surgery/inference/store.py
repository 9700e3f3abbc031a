"""Where a stage's output map is kept between stages: memory, or a file on disk.

A `DiskMap` reads and writes with ``pread``/``pwrite`` rather than a memory
map: pages of a memory map count as the process's resident memory until the
kernel evicts them, while file I/O leaves them in the page cache, which the
kernel reclaims as it needs. Resident memory then stays bounded by the tiles
in flight, whatever the map's size.
"""

from __future__ import annotations

import os

import numpy as np


class DiskMap:
    """A C-ordered array in a raw file, sliced like a numpy array with one slice per axis.

    Only basic slices with step 1 are supported (what tiled passes use).
    """

    def __init__(self, path: str, shape, dtype="float32"):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, int(np.prod(self.shape)) * self.dtype.itemsize)
        strides, step = [], self.dtype.itemsize
        for dim in reversed(self.shape):
            strides.append(step)
            step *= dim
        self._strides = tuple(reversed(strides))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _ranges(self, index):
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (len(self.shape) - len(index))
        ranges = []
        for item, dim in zip(index, self.shape):
            start, stop, step = item.indices(dim)
            if step != 1:
                raise ValueError(f"DiskMap supports slices with step 1 only. Received: {index}")
            ranges.append((start, max(start, stop)))
        return ranges

    def _runs(self, ranges):
        """``(file offset, block position)`` of each contiguous run of the block, and the run length in items."""
        # The trailing axes taken whole (and the first partial one) form contiguous runs.
        inner = len(self.shape) - 1
        while inner > 0 and ranges[inner] == (0, self.shape[inner]):
            inner -= 1
        run = int(np.prod([stop - start for start, stop in ranges[inner:]]))
        outer = [range(start, stop) for start, stop in ranges[:inner]]
        positions = np.ndindex(*[len(r) for r in outer]) if outer else [()]
        base = sum(start * stride for (start, _), stride in zip(ranges[inner:], self._strides[inner:]))
        for position in positions:
            offset = base + sum((r.start + p) * s for r, p, s in zip(outer, position, self._strides))
            yield offset, position, run

    def __getitem__(self, index) -> np.ndarray:
        ranges = self._ranges(index)
        block = np.empty([stop - start for start, stop in ranges], dtype=self.dtype)
        flat = block.reshape(-1)
        for count, (offset, _, run) in enumerate(self._runs(ranges)):
            view = flat[count * run : (count + 1) * run]
            read = os.preadv(self._fd, [memoryview(view.data).cast("B")], offset)
            if read != view.nbytes:
                raise OSError(f"Short read from {self.path}: {read} of {view.nbytes} bytes")
        return block

    def __setitem__(self, index, value) -> None:
        ranges = self._ranges(index)
        block = np.ascontiguousarray(
            np.broadcast_to(np.asarray(value, dtype=self.dtype), [stop - start for start, stop in ranges])
        )
        flat = block.reshape(-1)
        for count, (offset, _, run) in enumerate(self._runs(ranges)):
            data = memoryview(flat[count * run : (count + 1) * run].data).cast("B")
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], offset + written)

    def __array__(self, dtype=None, copy=None):
        whole = self[tuple(slice(None) for _ in self.shape)]
        return whole if dtype is None else whole.astype(dtype)
