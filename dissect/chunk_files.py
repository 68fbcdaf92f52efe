"""Whole chunks of a Zarr array encoded and written straight into its store, as zarr itself would store them.

The extract stage writes each chunk of its arrays once, whole. zarr's own
write path runs through an asyncio event loop, a thread per codec call and many
small Python steps that hold the GIL; beside a forward pass that keeps both
cores of this machine busy and needs the GIL between its layers, the embedded
model's stream took 2.37-2.48 s per 1,024 images writing through zarr against
1.99-2.27 s writing so (four alternating runs each; README, "Tests and
benchmarks", the extract paragraph).
``ChunkFiles`` encodes a chunk with the array's own Blosc settings through
numcodecs, which compresses without the GIL, and hands the bytes to the store's
synchronous ``set``. It only takes arrays whose codecs it reproduces (bytes,
little-endian, then Blosc) and checks that on opening; the files are byte for
byte those zarr writes (tests/test_chunk_files.py), so any zarr reader reads
them.
"""

from __future__ import annotations

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import default_buffer_prototype

#: numcodecs' number of each zarr Blosc shuffle filter.
_SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


class ChunkFiles:
    """Writes whole chunks of one Zarr v3 array (chunked along axis 0 only) into its store.

    ``write(c, rows)`` stores chunk ``c``: ``rows`` (n, *array.shape[1:]) with
    n the chunk length, or fewer for the array's last chunk, which is padded
    with the fill value as zarr stores an edge chunk.
    """

    def __init__(self, array: zarr.Array) -> None:
        codecs = array.metadata.codecs
        if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec)
                or array.chunks[1:] != array.shape[1:]):
            raise ValueError(f"array {array.path!r}: ChunkFiles writes arrays chunked along axis 0 only and "
                             f"encoded by bytes then Blosc; it has chunks {array.chunks} of shape {array.shape} "
                             f"and codecs {codecs}")
        if not hasattr(array.store_path.store, "set_sync"):
            raise ValueError(f"array {array.path!r}: its store ({type(array.store_path.store).__name__}) has no "
                             "synchronous set; ChunkFiles writes to local and memory stores")
        blosc = codecs[1]
        self.array = array
        self.dtype = np.dtype(array.dtype).newbyteorder("<" if codecs[0].endian.value == "little" else ">")
        self.codec = Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=_SHUFFLES[blosc.shuffle.value],
                           blocksize=blosc.blocksize)
        if self.dtype.itemsize != blosc.typesize:
            raise ValueError(f"array {array.path!r}: Blosc type size {blosc.typesize} is not its item size "
                             f"{self.dtype.itemsize}")
        self.fill = np.asarray(array.metadata.fill_value, dtype=self.dtype)

    def write(self, chunk: int, rows: np.ndarray) -> None:
        """Encode ``rows`` (n, *shape[1:]) as chunk ``chunk`` of the array and write its file."""
        length, total = self.array.chunks[0], self.array.shape[0]
        expected = min(length, total - chunk * length)
        if rows.shape != (expected, *self.array.shape[1:]):
            raise ValueError(f"chunk {chunk} of {self.array.path!r} takes rows of shape "
                             f"{(expected, *self.array.shape[1:])}, not {rows.shape}")
        if expected == length:
            whole = np.ascontiguousarray(rows, dtype=self.dtype)
        else:
            whole = np.full(self.array.chunks, self.fill, dtype=self.dtype)
            whole[:expected] = rows
        key = self.array.metadata.encode_chunk_key((chunk,) + (0,) * (rows.ndim - 1))
        encoded = self.codec.encode(whole)
        self.array.store_path.store.set_sync(f"{self.array.path}/{key}",
                                             default_buffer_prototype().buffer.from_bytes(encoded))
