"""Decoding probe images: simplejpeg gives PIL's pixels, ThreadedBatches gives the DataLoader path's batches."""

import threading
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from conftest import PHOTOS, photo_crops, write_image_folder
from dissect.probe import Preprocessing, ProbeImages, ThreadedBatches

PREP = Preprocessing(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def pil_pixels(path: Path, size: int) -> np.ndarray:
    """What the extract stage decoded before simplejpeg: PIL, RGB, bilinear resize when the size differs."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BILINEAR)
        return np.asarray(rgb)


def pil_error(path: Path) -> str:
    """The error recorded for an unreadable file before simplejpeg."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, SyntaxError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


@pytest.fixture(scope="module")
def varied_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """JPEGs of every kind simplejpeg decodes and some it leaves to PIL, a PNG, at and off the input size."""
    root = tmp_path_factory.mktemp("varied")
    crops = photo_crops(6, 64, seed=3)
    images: list[tuple[Image.Image, dict]] = []
    for i, crop in enumerate(crops):
        image = Image.fromarray(crop)
        images += [(image, {"quality": 50 + 9 * i, "subsampling": i % 3}), (image, {"progressive": True})]
    images += [(Image.fromarray(skimage.data.camera()), {}),  # greyscale, 512 px: resized
               (Image.fromarray(crops[0]).convert("CMYK"), {}),  # left to PIL
               (Image.fromarray(crops[1]).resize((90, 40)), {"quality": 90}),  # not square
               (Image.fromarray(crops[2]).resize((32, 32)), {})]  # upscaled
    images += [(Image.fromarray(getattr(skimage.data, name)()), {"quality": 85}) for name in PHOTOS[:3]]
    paths = []
    for i, (image, options) in enumerate(images):
        paths.append(root / f"img{i:03d}.jpg")
        image.save(paths[-1], "JPEG", **options)
    paths.append(root / "crop.png")
    Image.fromarray(crops[3]).save(paths[-1])
    paths.append(root / "png-named.jpg")  # PIL goes by the content, not the name
    Image.fromarray(crops[4]).save(paths[-1], "PNG")
    return paths


def test_read_gives_pil_pixels(varied_images):
    for path in varied_images:
        np.testing.assert_array_equal(PREP.read(path), pil_pixels(path, PREP.input_size), err_msg=path.name)
        out = np.full((64, 64, 3), 7, dtype=np.uint8)
        assert PREP.read(path, out) is out
        np.testing.assert_array_equal(out, pil_pixels(path, PREP.input_size), err_msg=path.name)


def test_read_gives_pil_pixels_for_photos_at_input_size(tmp_path):
    folder = write_image_folder(tmp_path / "photos", n_images=24, size=224, png_every=5)
    prep = Preprocessing(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for path in sorted(folder.rglob("*.*")):
        np.testing.assert_array_equal(prep.read(path), pil_pixels(path, 224), err_msg=path.name)


def test_normalise_array_equals_normalise_bit_for_bit():
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    expected = PREP.normalise(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    normalised = PREP.normalise_array(pixels)
    tensor = torch.from_numpy(normalised)
    assert normalised.dtype == np.float32 and tensor.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(tensor, expected)


@pytest.fixture(scope="module")
def probe_with_bad_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = write_image_folder(tmp_path_factory.mktemp("bad"), n_images=23, png_every=4)
    paths = sorted(root.rglob("*.*"))
    paths[3].write_bytes(b"this is not a jpeg")
    paths[8].write_bytes(paths[9].read_bytes()[:300])  # truncated JPEG
    paths[12].write_bytes(paths[13].read_bytes()[:-200])  # JPEG cut short in its image data
    return paths + [root / "missing.jpg"]


def _loader_batches(paths: list[Path], batches: list[list[int]]) -> list[tuple[list[int], torch.Tensor, list[str]]]:
    """The DataLoader path's batches: ProbeImages items, stacked, normalised in torch."""
    dataset = ProbeImages(paths, PREP)
    result = []
    for batch in batches:
        items = [dataset[i] for i in batch]
        result.append(([i for i, _, _ in items], PREP.normalise(torch.stack([image for _, image, _ in items])),
                       [error for _, _, error in items]))
    return result


@pytest.mark.parametrize("depth, threads", [(0, 1), (0, 2), (1, 1), (2, 1), (3, 3)])
def test_threaded_batches_equal_the_loader_path_in_order(probe_with_bad_files, depth, threads):
    paths = probe_with_bad_files
    batches = [list(range(i, min(i + 5, len(paths)))) for i in range(0, len(paths), 5)]  # the last one short
    expected = _loader_batches(paths, batches)
    with ThreadedBatches(paths, PREP, batches, depth=depth, threads=threads) as threaded:
        assert len(threaded) == len(batches)
        got = [(indices, images.clone(), errors) for indices, images, errors in threaded]
    assert [indices for indices, _, _ in got] == batches
    for (_, images, errors), (_, want_images, want_errors) in zip(got, expected):
        assert images.dtype == torch.float32 and images.shape == want_images.shape
        assert torch.equal(images, want_images)
        assert errors == want_errors


def test_unreadable_files_are_recorded_with_pils_error(probe_with_bad_files):
    paths = probe_with_bad_files
    with ThreadedBatches(paths, PREP, [list(range(len(paths)))]) as threaded:
        [(_, images, errors)] = list(threaded)
        bad = [i for i, error in enumerate(errors) if error]
        assert bad == [3, 8, 12, len(paths) - 1]
        assert errors == [pil_error(path) for path in paths]
        assert errors[-1].startswith("FileNotFoundError: ")
        zero = PREP.normalise(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))[0]
        for i in bad:
            assert torch.equal(images[i], zero)


def _decoder_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("probe-decoder")]


def test_an_unexpected_error_is_raised_where_its_batch_is_taken_and_the_threads_end(probe_with_bad_files,
                                                                                   monkeypatch):
    paths = probe_with_bad_files[:20]
    read = Preprocessing.read

    def failing_read(self, path, out=None):
        if path == paths[11]:
            raise RuntimeError("decoder bug")
        return read(self, path, out)

    monkeypatch.setattr(Preprocessing, "read", failing_read)
    batches = [list(range(i, i + 2)) for i in range(0, 20, 2)]
    taken = []
    with pytest.raises(RuntimeError, match="decoder bug"):
        with ThreadedBatches(paths, PREP, batches, depth=3, threads=2) as threaded:
            for indices, _, _ in threaded:
                taken.append(indices)
    assert taken == batches[:5]  # batch 5 holds image 11
    assert not _decoder_threads()


def test_leaving_early_cancels_what_is_not_started(probe_with_bad_files):
    paths = probe_with_bad_files
    batches = [[i] for i in range(len(paths))]
    with ThreadedBatches(paths, PREP, batches, depth=2) as threaded:
        for indices, _, _ in threaded:
            if indices == [1]:
                break
    assert not _decoder_threads()
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        iter(ThreadedBatches(paths, PREP, batches))
    with ThreadedBatches(paths, PREP, []) as threaded:
        assert list(threaded) == []


def test_plain_jpegs_do_not_go_through_pil(varied_images, monkeypatch):
    opened = []
    open_image = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *args: opened.append(Path(path).name) or open_image(path, *args))
    for path in varied_images:
        PREP.read(path)
    cmyk = varied_images[13]
    assert open_image(cmyk).mode == "CMYK"
    assert sorted(opened) == sorted(["crop.png", "png-named.jpg", cmyk.name])
