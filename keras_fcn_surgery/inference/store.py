"""Arrays in files read and written by tiles: stored stage maps, and memory-mapped images.

A `DiskMap` reads and writes with ``pread``/``pwrite`` rather than a memory
map: pages of a memory map count as the process's resident memory until the
kernel evicts them, while file I/O leaves them in the page cache, which the
kernel reclaims as it needs. Resident memory then stays bounded by the tiles
in flight, whatever the map's size. `file_backed` gives the same to an image
the caller passes as an ``np.memmap`` (a slide of 30000 x 30000 pixels read
through its memory map would add 2.5 GiB of resident pages).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from keras_fcn_surgery.saving.atomic import remove_tree


class DiskMap:
    """A C-ordered array in a raw file, sliced like a numpy array with one slice per axis.

    Only basic slices with step 1 are supported (what tiled passes use).
    """

    def __init__(self, path: str, shape, dtype="float32", *, offset: int = 0, create: bool = True):
        """A map of ``shape`` in the file ``path``, starting ``offset`` bytes in.

        With ``create`` (the default) the file is created or emptied and sized
        for the map; otherwise an existing file is opened for reading only.
        """
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.path = path
        self._offset = int(offset)
        if create:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, self._offset + int(np.prod(self.shape)) * self.dtype.itemsize)
        else:
            self._fd = os.open(path, os.O_RDONLY)
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
        base = self._offset + sum(start * stride for (start, _), stride in zip(ranges[inner:], self._strides[inner:]))
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


def file_backed(image):
    """``image``, or a read-only `DiskMap` of the same file when it is a whole ``np.memmap``.

    Only a memory map of a whole array as numpy lays it out (``np.load(...,
    mmap_mode="r")``, ``np.memmap(...)``, not a slice of one, C order, a
    shared map whose file holds what it shows) is read through the file;
    anything else is returned as it is.
    """
    if not isinstance(image, np.memmap) or not isinstance(image.base, mmap.mmap):
        return image
    # Modes other than "c" (copy-on-write) share their pages with the file's, so pread sees what they show.
    if image.mode == "c" or not image.flags.c_contiguous or image.filename is None:
        return image
    try:
        return DiskMap(image.filename, image.shape, image.dtype, offset=image.offset, create=False)
    except OSError:  # the file is gone or unreadable (the map outlives it): read through the map
        return image


class Scratch:
    """Temporary arrays of a pass: in memory, or past a budget in files of one temporary folder.

    The one place that chooses between ``np.zeros`` and a `DiskMap` (stored
    stage maps, a windowed map's shared prefix map). Used as a context
    manager: on exit every file is closed and the folder removed, even when
    the pass is interrupted.
    """

    def __init__(self, prefix: str, spill_dir: str | None = None):
        """Files go to a folder named ``prefix...`` in ``spill_dir`` (default: the system's temporary folder)."""
        self.prefix, self.spill_dir = prefix, spill_dir
        self.folder: str | None = None
        self._arrays: dict = {}

    def array(self, name: str, shape, dtype, *, on_disk: bool):
        """A zero-filled array ``shape`` (a `DiskMap` in the folder when ``on_disk``), replacing ``name``'s."""
        import tempfile

        self.release(name)
        array: DiskMap | np.ndarray
        if on_disk:
            self.folder = self.folder or tempfile.mkdtemp(prefix=self.prefix, dir=self.spill_dir)
            array = DiskMap(os.path.join(self.folder, f"{name}.bin"), shape, dtype)
        else:
            array = np.zeros(shape, dtype=dtype)
        self._arrays[name] = array
        return array

    def release(self, name: str) -> None:
        """Forget ``name``'s array (closing its file)."""
        array = self._arrays.pop(name, None)
        if isinstance(array, DiskMap):
            array.close()

    def where(self) -> str | None:
        """The folder of the files (None while none was needed): for error messages."""
        return self.folder or self.spill_dir

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        for name in list(self._arrays):
            self.release(name)
        if self.folder is not None:
            remove_tree(self.folder)
            self.folder = None
