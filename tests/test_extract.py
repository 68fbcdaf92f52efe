"""The extract stage against a direct forward pass, kill-and-resume, unreadable images."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image

from conftest import REPO, tiny_overrides, write_image_folder
from dissect.artifacts import open_activations
from dissect.embedded_model import SmallCNN
from dissect.stages.extract import ExtractError, chunk_length, run
from dissect.layout import RunLayout


def direct_outputs(checkpoint: Path, image_paths: list[Path]) -> dict[str, np.ndarray]:
    """Each recorded layer's float32 output computed by hand: PIL resize, normalise, plain hooks."""
    model = SmallCNN(num_classes=4, width=4)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    images = []
    for path in image_paths:
        rgb = Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR)
        images.append((np.asarray(rgb, dtype=np.float32) / 255.0 - 0.5) / 0.25)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    outputs = {}
    with torch.no_grad():
        x = batch
        for name, module in model.features.named_children():  # conv, bn, relu, pool, ... in order
            x = module(x)
            outputs[f"features.{name}"] = x.clone()
        fc1 = model.classifier.fc1(model.pool(x).flatten(1))
    return {"features.conv2": outputs["features.conv2"].numpy(), "features.conv4": outputs["features.conv4"].numpy(),
            "classifier.fc1": fc1.numpy()}


def test_arrays_equal_a_direct_forward_pass(image_folder, tiny_checkpoint, tmp_path, compose_config):
    cfg = compose_config(tiny_overrides(image_folder, tmp_path / "run", tiny_checkpoint))
    run(cfg)
    store = open_activations(tmp_path / "run")
    ids = list(store["image_ids"][:])
    paths = [image_folder / image_id for image_id in ids]
    assert ids == sorted(ids) and len(ids) == 40
    expected = direct_outputs(tiny_checkpoint, paths)
    for layer in ("features.conv2", "features.conv4"):
        maps = store[layer]["maps"][:]
        assert maps.dtype == np.float16 and maps.shape == expected[layer].shape
        np.testing.assert_allclose(maps.astype(np.float32), expected[layer], rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(store[layer]["maxima"][:], maps.max(axis=(2, 3)).astype(np.float32))
    vector = store["classifier.fc1"]["activations"][:]
    np.testing.assert_allclose(vector.astype(np.float32), expected["classifier.fc1"], rtol=2e-3, atol=2e-3)
    assert store["valid"][:].all()
    assert store.attrs["layers"]["features.conv4"] == {"kind": "map", "shape": [32, 4, 4], "module": "Conv2d"}
    assert store.attrs["preprocessing"]["input_size"] == 64


def test_chunks_hold_whole_batches_of_at_least_the_asked_size(image_folder, tiny_checkpoint, tmp_path,
                                                              compose_config):
    cfg = compose_config(tiny_overrides(image_folder, tmp_path / "run", tiny_checkpoint))
    run(cfg)
    store = zarr.open_group(RunLayout(tmp_path / "run").activations, mode="r")
    maps = store["features.conv2"]["maps"]
    per_image = 8 * 16 * 16 * 2
    assert maps.chunks[0] == chunk_length(per_image, 4, 0.01) == 4 * -(-int(0.01 * 2**20) // (4 * per_image))
    assert maps.chunks[0] * per_image >= 0.01 * 2**20 and maps.chunks[0] % 4 == 0
    assert maps.chunks[1:] == maps.shape[1:]
    # every array shares the chunk length of the largest (features.conv2's maps), so a chunk is one unit of work
    for layer, array in (("features.conv2", "maxima"), ("features.conv4", "maps"), ("classifier.fc1", "activations")):
        assert store[layer][array].chunks[0] == maps.chunks[0]


def test_second_run_skips_and_other_config_is_refused(image_folder, tiny_checkpoint, tmp_path, compose_config):
    overrides = tiny_overrides(image_folder, tmp_path / "run", tiny_checkpoint)
    layout = RunLayout(tmp_path / "run")
    run(compose_config(overrides))
    mtimes = {path: path.stat().st_mtime_ns for path in (layout.extract_fingerprint, layout.stamp("extract"))}
    run(compose_config(overrides))
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    with pytest.raises(ExtractError, match="different layers"):
        run(compose_config(overrides + ["layers=[features.conv3]"]))


def test_unreadable_images_are_skipped_listed_and_zeroed(tiny_checkpoint, tmp_path, compose_config):
    probe = write_image_folder(tmp_path / "probe", n_images=10)
    (probe / "a" / "img0001.jpg").write_bytes(b"this is not a jpeg")
    (probe / "b" / "img0004.jpg").write_bytes((probe / "b" / "img0002.jpg").read_bytes()[:200])  # truncated
    cfg = compose_config(tiny_overrides(probe, tmp_path / "run", tiny_checkpoint))
    run(cfg)
    store = open_activations(tmp_path / "run")
    ids = list(store["image_ids"][:])
    bad = {ids.index("a/img0001.jpg"), ids.index("b/img0004.jpg")}
    skipped = pd.read_csv(RunLayout(tmp_path / "run").skipped_images)
    assert set(skipped["index"]) == bad
    assert set(skipped["image_id"]) == {"a/img0001.jpg", "b/img0004.jpg"}
    assert skipped["error"].str.len().gt(0).all()
    valid = store["valid"][:]
    assert set(np.flatnonzero(~valid)) == bad
    maxima = store["features.conv4"]["maxima"][:]
    assert (maxima[sorted(bad)] == 0).all() and (maxima[valid] != 0).any()


def _extract_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dissect", "stages=[extract]", *overrides]


@pytest.mark.slow  # three fresh CLI processes, one killed mid-run: about 32 s
def test_killed_run_resumes_to_identical_arrays(tiny_checkpoint, tmp_path):
    probe = write_image_folder(tmp_path / "probe", n_images=160, size=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_extract_command(tiny_overrides(probe, reference, tiny_checkpoint)), cwd=REPO, env=env,
                   check=True, capture_output=True)

    resumed = tmp_path / "resumed"
    overrides = tiny_overrides(probe, resumed, tiny_checkpoint)
    process = subprocess.Popen(_extract_command(overrides), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = RunLayout(resumed).extract_chunks
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if markers.is_dir() and len(list(markers.glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    n_chunks = -(-160 // 4)
    assert len(list(markers.glob("*.json"))) < n_chunks, "the run finished before it could be killed"
    assert not zarr.open_group(RunLayout(resumed).activations, mode="r").attrs.get("complete")
    assert not RunLayout(resumed).stamp("extract").exists(), "an unfinished extract has no stamp"
    subprocess.run(_extract_command(overrides), cwd=REPO, env=env, check=True, capture_output=True)

    first, second = open_activations(reference), open_activations(resumed)
    for layer, array in (("features.conv2", "maps"), ("features.conv2", "maxima"),
                         ("features.conv4", "maps"), ("classifier.fc1", "activations")):
        np.testing.assert_array_equal(first[layer][array][:], second[layer][array][:])
    assert list(first["image_ids"][:]) == list(second["image_ids"][:])


def test_loader_processes_and_decoder_threads_give_identical_arrays(tiny_checkpoint, tmp_path, compose_config):
    probe = write_image_folder(tmp_path / "probe", n_images=30)  # JPEGs and PNGs
    (probe / "a" / "img0005.jpg").write_bytes(b"not an image")
    stores = {}
    for workers in (0, 2):
        out = tmp_path / f"run{workers}"
        run(compose_config(tiny_overrides(probe, out, tiny_checkpoint)[:-2] + [f"extract.num_workers={workers}",
                                                                              "extract.chunk_mib=0.01"]))
        stores[workers] = open_activations(out)
    for layer, array in (("features.conv2", "maps"), ("features.conv2", "maxima"),
                         ("features.conv4", "maps"), ("classifier.fc1", "activations")):
        np.testing.assert_array_equal(stores[0][layer][array][:], stores[2][layer][array][:])
    np.testing.assert_array_equal(stores[0]["valid"][:], stores[2]["valid"][:])
    assert (~stores[0]["valid"][:]).sum() == 1
    skipped = [pd.read_csv(RunLayout(tmp_path / f"run{workers}").skipped_images) for workers in (0, 2)]
    pd.testing.assert_frame_equal(*skipped)
