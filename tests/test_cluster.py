"""The cluster back end: every kind of cluster from config, extract on worker processes, a lost worker, SLURM."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from distributed import Client
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, on_cluster, tiny_overrides, write_image_folder
from dissect.artifacts import open_activations, read_json
from dissect.cluster import ClusterError, check_worker_paths, cluster_settings, open_client, slurm_cluster
from dissect.errors import ConfigError
from dissect.layout import RunLayout
from dissect.stages import extract

def assert_same_activations(first_dir: Path, second_dir: Path) -> None:
    first, second = open_activations(first_dir), open_activations(second_dir)
    assert list(first["image_ids"][:]) == list(second["image_ids"][:])
    np.testing.assert_array_equal(first["valid"][:], second["valid"][:])
    assert first.attrs["layer_order"] == second.attrs["layer_order"]
    for layer in first.attrs["layer_order"]:
        assert sorted(first[layer].array_keys()) == sorted(second[layer].array_keys())
        for array in first[layer].array_keys():
            np.testing.assert_array_equal(first[layer][array][:], second[layer][array][:])


def marker_pids(run_dir: Path) -> set[int]:
    return {read_json(path)["pid"] for path in RunLayout(run_dir).extract_chunks.glob("*.json")}


@pytest.fixture(scope="module")
def probe_80(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("probe80"), n_images=80)


@pytest.fixture(scope="module")
def in_process_reference(probe_80, tiny_checkpoint, tmp_path_factory):
    """The activations of the 80 images extracted by ``python -m dissect`` on its default in-process cluster.

    With one thread, as each worker of ``two_workers`` has: the same CPU kernels then run, so the arrays must be
    bit-identical. (With other thread counts, convolutions sum in another order and a few float16 values
    differ in the last bit.)
    """
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    overrides = [*tiny_overrides(probe_80, run_dir, tiny_checkpoint), "cluster.threads_per_worker=1"]
    subprocess.run([sys.executable, "-m", "dissect", "stages=[extract]", *overrides], cwd=REPO, check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg, run_dir


def test_extract_on_two_worker_processes_equals_the_in_process_run(in_process_reference, two_workers, tmp_path):
    cfg, reference = in_process_reference
    run_dir = tmp_path / "run"
    extract.run(on_cluster(cfg, two_workers, out_dir=str(run_dir)))
    assert_same_activations(reference, run_dir)
    worker_pids = {worker.process.pid for worker in two_workers.workers.values()}
    assert marker_pids(run_dir) == worker_pids  # both worker processes wrote chunks, this process none
    assert RunLayout(run_dir).skipped_images.read_text() == RunLayout(reference).skipped_images.read_text()


def test_a_worker_killed_mid_extract_costs_only_its_unfinished_chunks(in_process_reference, two_workers, tmp_path):
    cfg, reference = in_process_reference
    run_dir = tmp_path / "run"
    layout = RunLayout(run_dir)
    errors: list[BaseException] = []

    def extract_in_background() -> None:
        try:
            extract.run(on_cluster(cfg, two_workers, out_dir=str(run_dir), extract={"chunk_mib": 0.001}))
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=extract_in_background)
    thread.start()
    worker_pids = {worker.process.pid for worker in two_workers.workers.values()}
    deadline, victim = time.monotonic() + 120, None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        written = marker_pids(run_dir) if layout.extract_chunks.is_dir() else set()
        if written & worker_pids:
            victim = sorted(written & worker_pids)[0]
        time.sleep(0.005)
    assert victim is not None, "no worker wrote a chunk"
    chunks_before = len(list(layout.extract_chunks.glob("*.json")))
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors
    n_chunks = len(open_activations(run_dir)["valid"][:]) // 4  # a tiny chunk_mib: one batch of 4 per chunk
    assert chunks_before < n_chunks, "the run finished before the worker was killed"
    assert len(list(layout.extract_chunks.glob("*.json"))) == n_chunks
    replacement = {worker.process.pid for worker in two_workers.workers.values()} - worker_pids
    assert replacement, "the nanny restarted the killed worker under a new pid"
    assert_same_activations(reference, run_dir)


def test_a_path_a_worker_cannot_read_is_named_with_the_worker_and_its_host(two_workers, tmp_path):
    missing = tmp_path / "not-shared" / "probe"
    with Client(two_workers) as client:
        with pytest.raises(ClusterError, match=r"dask worker tcp://127\.0\.0\.1:\d+ on host \S+ cannot read "
                                               + str(missing)):
            check_worker_paths(client, [tmp_path, missing])
        with pytest.raises(ClusterError, match="cannot write " + str(missing)):
            check_worker_paths(client, [tmp_path], writable=[missing])
        check_worker_paths(client, [tmp_path], writable=[tmp_path])  # readable and writable paths pass


def test_cluster_settings_name_the_wrong_key(compose_config):
    with pytest.raises(ConfigError, match="cluster.n_workers=2 is not allowed"):
        cluster_settings(compose_config(["cluster.n_workers=2"]).cluster)  # in-process: one worker
    with pytest.raises(ConfigError, match="cluster.processes=16 is not allowed"):
        cluster_settings(compose_config(["cluster=slurm", "cluster.processes=16"]).cluster)
    with pytest.raises(ConfigError, match="cluster.kind='lsf' is not allowed"):
        cluster_settings(OmegaConf.create({"kind": "lsf"}))
    assert cluster_settings(compose_config(["cluster=address", "cluster.address=tcp://10.0.0.1:8786"]).cluster).address


def test_workers_run_no_profiler_without_a_dashboard(compose_config):
    with open_client(cluster_settings(compose_config([]).cluster)) as client:
        running = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert running and not any(running.values())


def test_slurm_job_script_carries_the_asked_resources(compose_config):
    cfg = compose_config(["cluster=slurm", "cluster.queue=gpu", "cluster.account=vision", "cluster.memory=48GB",
                          "cluster.walltime=04:30:00", "cluster.gpus_per_job=1", "cluster.cores=6",
                          "cluster.processes=2", "cluster.job_script_prologue=[module load cuda]",
                          "cluster.dashboard_address=null"])
    cluster = slurm_cluster(cluster_settings(cfg.cluster))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH -p gpu" in directives
    assert "#SBATCH -A vision" in directives
    assert "#SBATCH --mem=45G" in directives  # dask-jobqueue writes 48 GB as GiB, rounded down
    assert "#SBATCH -t 04:30:00" in directives
    assert "#SBATCH --gres=gpu:1" in directives
    assert "#SBATCH --cpus-per-task=6" in directives
    body = script.split("\n")
    assert "module load cuda" in body and "export DASK_DISTRIBUTED__WORKER__DAEMON=False" in body
    assert "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in body  # no dashboard, no profiler
    assert "--nworkers 2" in script and "--nthreads 3" in script


FAKE_SBATCH = """#!/bin/bash
# sbatch without SLURM: keep the job script, run it in the background in its own session, print the job id
set -e
script="${@: -1}"
id=$(( $(ls "$FAKE_SLURM_DIR" | grep -c '\\.pid$' || true) + 1001 ))
cp "$script" "$FAKE_SLURM_DIR/job_$id.sh"
setsid bash "$FAKE_SLURM_DIR/job_$id.sh" > "$FAKE_SLURM_DIR/job_$id.log" 2>&1 < /dev/null &
echo $! > "$FAKE_SLURM_DIR/job_$id.pid"
echo "Submitted batch job $id"
"""
FAKE_SCANCEL = """#!/bin/bash
# scancel without SLURM: stop the process group of each job
for id in "$@"; do
  pid=$(cat "$FAKE_SLURM_DIR/job_$id.pid" 2>/dev/null) && kill -TERM -- "-$pid" 2>/dev/null
done
exit 0
"""
FAKE_SQUEUE = """#!/bin/bash
# squeue without SLURM: the jobs whose process still runs
echo "JOBID STATE"
for f in "$FAKE_SLURM_DIR"/job_*.pid; do
  [ -e "$f" ] || continue
  id=$(basename "$f" .pid); id=${id#job_}
  kill -0 "$(cat "$f")" 2>/dev/null && echo "$id RUNNING"
done
exit 0
"""


def fake_slurm(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def kill_jobs(jobs_dir: Path) -> None:
    """Stop every process group the fake sbatch started, by pid."""
    for pid_file in jobs_dir.glob("job_*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_cluster_slurm_starts_workers_through_sbatch_and_they_extract_and_tally(tiny_checkpoint, tmp_path):
    from data_prep.synthetic_broden import generate

    probe = generate(tmp_path / "broden", n_images=24, size=64, seed=5, workers=1)
    bin_dir, jobs_dir = tmp_path / "bin", tmp_path / "jobs"
    fake_slurm(bin_dir)
    jobs_dir.mkdir()
    common = ["stages=[extract,thresholds,tally]", "dataset=default", f"dataset.root={probe}",
              "layers=[features.conv2,features.conv3]", "thresholds.quantile=0.02"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAKE_SLURM_DIR": str(jobs_dir),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    subprocess.run([sys.executable, "-m", "dissect", *tiny_overrides(probe, local_dir, tiny_checkpoint), *common,
                    "cluster.threads_per_worker=1"], cwd=REPO, env=env, check=True, capture_output=True)
    slurm = ["cluster=slurm", "cluster.jobs=1", "cluster.cores=1", "cluster.processes=1", "cluster.memory=2GB",
             "cluster.walltime=00:10:00", "cluster.interface=lo", "cluster.dashboard_address=null",
             "cluster.wait_for_workers_s=120", f"cluster.local_directory={tmp_path / 'scratch'}"]
    try:
        result = subprocess.run([sys.executable, "-m", "dissect", *tiny_overrides(probe, slurm_dir, tiny_checkpoint),
                                 *common, *slurm], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        kill_jobs(jobs_dir)
    scripts = list(jobs_dir.glob("job_*.sh"))
    assert len(scripts) == 1 and "--interface lo" in scripts[0].read_text()
    job_pid = int(next(jobs_dir.glob("job_*.pid")).read_text())
    chunk_writers = marker_pids(slurm_dir)
    assert chunk_writers and not chunk_writers & {os.getpid(), job_pid}  # a worker process under the job wrote
    assert_same_activations(local_dir, slurm_dir)
    for layer in ("features.conv2", "features.conv3"):
        assert RunLayout(local_dir).tally_csv(layer).read_bytes() == RunLayout(slurm_dir).tally_csv(layer).read_bytes()


#: Files of a run directory that record when, where or by whom (times, pids, hosts), not what was computed.
RUN_RECORDS = ("logs/", "extract/chunks/", "activations.zarr/zarr.json")
#: JSON keys that hold times or the workers that ran a stage, in files that otherwise hold results.
RECORD_KEYS = {"seconds", "pairs_per_second", "workers"}


def without_records(value):
    """A JSON value without RECORD_KEYS at any depth."""
    if isinstance(value, dict):
        return {key: without_records(item) for key, item in value.items() if key not in RECORD_KEYS}
    if isinstance(value, list):
        return [without_records(item) for item in value]
    return value


def run_files(run_dir: Path) -> dict[str, object]:
    """Every file of a run directory by relative path (JSON without RECORD_KEYS), except RUN_RECORDS."""
    files: dict[str, object] = {}
    for path in sorted(run_dir.rglob("*")):
        name = str(path.relative_to(run_dir))
        if path.is_file() and not name.startswith(RUN_RECORDS):
            files[name] = without_records(json.loads(path.read_bytes())) if path.suffix == ".json" else path.read_bytes()
    return files


@pytest.mark.slow
def test_every_stage_on_two_worker_processes_writes_what_the_in_process_run_writes(tiny_checkpoint, two_workers,
                                                                                  tmp_path):
    from data_prep.synthetic_broden import generate

    probe = generate(tmp_path / "broden", n_images=32, size=64, seed=4, workers=1)
    stages = "stages=[extract,thresholds,tally,topk,audit,attribute]"
    common = ["dataset=default", f"dataset.root={probe}", "layers=[features.conv2,features.conv3,classifier.fc1]",
              "thresholds.quantile=0.02", stages]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    local_dir, cluster_dir = tmp_path / "local", tmp_path / "cluster"
    for run_dir, cluster in ((local_dir, ["cluster.threads_per_worker=1"]),
                             (cluster_dir, ["cluster=address", f"cluster.address={two_workers.scheduler_address}"])):
        result = subprocess.run([sys.executable, "-m", "dissect", *tiny_overrides(probe, run_dir, tiny_checkpoint),
                                 *common, *cluster], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    worker_pids = {worker.process.pid for worker in two_workers.workers.values()}
    assert marker_pids(cluster_dir) <= worker_pids and len(marker_pids(cluster_dir)) == 2
    local, cluster = run_files(local_dir), run_files(cluster_dir)
    assert sorted(local) == sorted(cluster)
    assert any(name.endswith("maps.zarr/zarr.json") for name in local) and any(".jpg" in name for name in local)
    differing = [name for name in local if local[name] != cluster[name]]
    assert not differing, differing


_STARTED: list[int] = []


def _square_after_noting(i: int) -> int:
    """A task for results_in_window: notes that call i started (in-process workers share this list)."""
    _STARTED.append(i)
    return i * i


def test_results_in_window_gives_every_result_once_and_never_starts_more_than_the_window_ahead():
    from dissect.cluster import results_in_window

    _STARTED.clear()
    window, taken = 3, []
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        for index, result in results_in_window(client, _square_after_noting, [(i,) for i in range(40)], window):
            taken.append(index)
            # calls started so far, minus those taken (this one included), never exceed the window
            assert len(_STARTED) - len(taken) <= window
            assert result == index ** 2
    assert sorted(taken) == list(range(40))
    assert sorted(_STARTED) == list(range(40))


def _square_unless_seven(i: int) -> int:
    if i == 7:
        raise ValueError("seven")
    return i * i


def test_results_in_window_keep_going_yields_every_other_result_then_raises_the_error():
    from dissect.cluster import results_in_window

    taken: dict[int, int] = {}
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        with pytest.raises(ValueError, match="seven"):
            for index, result in results_in_window(client, _square_unless_seven, [(i,) for i in range(20)], 3,
                                                   keep_going=True):
                taken[index] = result
        assert taken == {i: i * i for i in range(20) if i != 7}
        with pytest.raises(ValueError, match="seven"):  # without keep_going the error stops the loop
            list(results_in_window(client, _square_unless_seven, [(i,) for i in range(20)], 3))
