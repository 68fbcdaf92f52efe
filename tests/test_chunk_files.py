"""ChunkFiles writes the chunk files zarr writes, byte for byte, and zarr reads them back."""

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec

from dissect.chunk_files import ChunkFiles
from dissect.stages.extract import COMPRESSOR


def chunk_files(store: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every chunk file of a store."""
    return {str(path.relative_to(store)): path.read_bytes() for path in store.rglob("*")
            if path.is_file() and "/c/" in str(path.relative_to(store))}


def relu_like(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Half zeros, the rest positive with repeats, as the extract stage's maps are."""
    rng = np.random.default_rng(seed)
    values = np.maximum(rng.normal(size=shape), 0) * 4
    return np.round(values, 1).astype(dtype)


@pytest.mark.parametrize("compressor", [COMPRESSOR, BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
                                        BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")])
@pytest.mark.parametrize("shape, dtype", [((8, 5, 4, 3), "float16"), ((8, 7), "float32")])
def test_chunks_are_the_bytes_zarr_writes(tmp_path: Path, compressor: BloscCodec, shape: tuple[int, ...],
                                          dtype: str) -> None:
    data = relu_like(shape, dtype, seed=len(shape))
    chunks = (3, *shape[1:])  # 8 images in chunks of 3: the last chunk holds 2
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    for store in (ours, theirs):
        zarr.open_group(store, mode="w").create_array("a", shape=shape, dtype=dtype, chunks=chunks,
                                                      compressors=compressor, fill_value=0)
    writer = ChunkFiles(zarr.open_group(ours, mode="r+")["a"])
    for chunk in range(3):
        writer.write(chunk, data[3 * chunk:3 * chunk + 3])
    reference = zarr.open_group(theirs, mode="r+")["a"].with_config({"write_empty_chunks": True})
    reference[:] = data

    ours_files, theirs_files = chunk_files(ours), chunk_files(theirs)
    assert sorted(ours_files) == sorted(theirs_files) and len(ours_files) == 3
    for name, content in theirs_files.items():
        assert ours_files[name] == content, name
    np.testing.assert_array_equal(zarr.open_group(ours, mode="r")["a"][:], data)


def test_an_all_fill_chunk_is_written(tmp_path: Path) -> None:
    array = zarr.open_group(tmp_path / "s.zarr", mode="w").create_array(
        "a", shape=(4, 2), dtype="float32", chunks=(2, 2), compressors=COMPRESSOR, fill_value=0)
    ChunkFiles(array).write(1, np.zeros((2, 2), dtype=np.float32))
    assert list(chunk_files(tmp_path / "s.zarr")) == ["a/c/1/0"]


def test_refuses_what_it_cannot_reproduce(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    gzip = group.create_array("gzip", shape=(4, 2), dtype="float32", chunks=(2, 2), compressors=GzipCodec())
    with pytest.raises(ValueError, match="bytes then Blosc"):
        ChunkFiles(gzip)
    split = group.create_array("split", shape=(4, 4), dtype="float32", chunks=(2, 2), compressors=COMPRESSOR)
    with pytest.raises(ValueError, match="chunked along axis 0 only"):
        ChunkFiles(split)
    writer = ChunkFiles(group.create_array("ok", shape=(5, 2), dtype="float32", chunks=(2, 2),
                                           compressors=COMPRESSOR))
    with pytest.raises(ValueError, match=r"chunk 2 .* takes rows of shape \(1, 2\)"):
        writer.write(2, np.zeros((2, 2), dtype=np.float32))
