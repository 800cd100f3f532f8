"""1-D int64 .npy files of token ids, written piece by piece and checked without being read.

``IdFileWriter`` appends ids to a .npy whose length is not known in advance: the header is written first
for length 0 and rewritten in place at the end. Headers are padded to a fixed 128 bytes for any 1-D
length up to 10^18 (numpy pads them so), so the final header fits exactly where the first one was.
``id_count`` reads a header and checks the file against it, so a truncated file is found before a reader
maps it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

ID_DTYPE = np.dtype(np.int64)  # what the token cache has always stored
_READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _header(count: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(ID_DTYPE), "fortran_order": False, "shape": (count,)}
    )
    return buffer.getvalue()


class IdFileWriter:
    """Writes a 1-D int64 .npy from pieces: ``append`` each piece, ``close`` to fix the header."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.count = 0
        self._file = open(self.path, "wb")
        self._file.write(_header(0))

    def append(self, ids: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(ids, dtype=ID_DTYPE).data)
        self.count += len(ids)

    def close(self) -> None:
        header = _header(self.count)
        if len(header) != len(_header(0)):  # only past 10^18 ids
            raise ValueError(f"{self.path}: {self.count} ids do not fit the reserved .npy header")
        self._file.seek(0)
        self._file.write(header)
        self._file.close()

    def __enter__(self) -> IdFileWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()  # the caller discards the half-written file


def id_count(path: Path) -> int:
    """How many ids the .npy at ``path`` holds; ValueError unless it is a whole, non-empty 1-D int64 array."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        if version not in _READ_HEADER:
            raise ValueError(f"{Path(path).name} has .npy format version {version}, which is not read here")
        shape, _, dtype = _READ_HEADER[version](file)
        if dtype != ID_DTYPE or len(shape) != 1 or shape[0] == 0:
            raise ValueError(f"{Path(path).name} holds {dtype} {shape}, not a non-empty 1-D int64 array")
        expected = file.tell() + shape[0] * ID_DTYPE.itemsize
        actual = os.fstat(file.fileno()).st_size
    if actual != expected:
        raise ValueError(f"{Path(path).name} has {actual} bytes where its header promises {expected}")
    return shape[0]
