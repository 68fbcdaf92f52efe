"""The dask.distributed cluster every parallel stage runs on (the ``cluster`` config group).

- ``cluster=local`` (default): a ``LocalCluster`` on this machine, one in-process
  worker by default (``cluster.processes=true cluster.n_workers=N`` for worker
  processes);
- ``cluster=slurm``: a ``dask_jobqueue.SLURMCluster`` built from the config,
  scaled to ``jobs`` (or adapting up to ``maximum_jobs``), closed when the run ends;
- ``cluster=address``: a running scheduler at ``cluster.address``;
- ``cluster=cuda``: ``dask_cuda.LocalCUDACluster``, one worker per GPU (the
  ``cuda`` extra).

The pipeline opens one ``cluster_session`` for a whole run; the cluster itself
is started only when the first stage asks for a client (``dask_client``), so a
run of the report alone starts nothing. A stage run outside a session (a test,
a notebook) gets a cluster of its own for the duration of its ``with`` block.
The code that runs on the cluster does not care which kind it is. Workers must
see the run directory and the probe set at the same paths as this process;
``check_worker_paths`` says which worker cannot.

Tasks that need a model keep it in their worker process (``worker_state``), so
it is loaded once per worker, not once per task, and take ``device_lock`` so a
worker with several threads runs one model pass at a time, on all of them.
"""

import importlib.util
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import dask
import torch
from distributed import Client, LocalCluster, as_completed, get_worker
from omegaconf import DictConfig

from dissect.errors import ConfigError, DissectError
from dissect.settings import (
    CLUSTER_KINDS,
    AddressClusterSettings,
    CudaClusterSettings,
    LocalClusterSettings,
    SlurmClusterSettings,
    section,
)

log = logging.getLogger(__name__)

ClusterSettings = LocalClusterSettings | SlurmClusterSettings | AddressClusterSettings | CudaClusterSettings
State = TypeVar("State")


class ClusterError(DissectError):
    """The cluster cannot be started, reached, or used with this run's paths."""


def cluster_settings(cluster_cfg: DictConfig | dict) -> ClusterSettings:
    """The ``cluster`` section as the typed settings of its ``kind`` (ConfigError naming the key)."""
    kind = cluster_cfg.get("kind")
    if kind not in CLUSTER_KINDS:
        raise ConfigError(f"cluster.kind={kind!r} is not allowed; it must be one of {', '.join(CLUSTER_KINDS)} "
                          "(choose a file of conf/cluster/: cluster=local, cluster=slurm, ...)")
    allowed = [item.name for item in fields(CLUSTER_KINDS[kind])]
    unknown = [key for key in cluster_cfg if key not in allowed]
    if unknown:
        raise ConfigError(f"cluster.{unknown[0]} is not a setting of cluster={kind}; its settings: {', '.join(allowed)}")
    return section(cluster_cfg, CLUSTER_KINDS[kind])


def slurm_cluster(settings: SlurmClusterSettings) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` from the settings (no job submitted until it is scaled)."""
    from dask_jobqueue import SLURMCluster

    directives = list(settings.job_extra_directives)
    # a daemonic worker process cannot start the image loader processes of extract.num_workers
    prologue = ["export DASK_DISTRIBUTED__WORKER__DAEMON=False",
                f"export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED={worker_profiler(settings.dashboard_address)}",
                *settings.job_script_prologue]
    if settings.gpus_per_job:
        directives.append(f"--gres=gpu:{settings.gpus_per_job}")
    scheduler_options = {"dashboard_address": settings.dashboard_address}
    if settings.scheduler_host:
        scheduler_options["host"] = settings.scheduler_host
    optional = {key: value for key, value in {
        "queue": settings.queue, "account": settings.account, "local_directory": settings.local_directory,
        "log_directory": settings.log_directory, "interface": settings.interface, "python": settings.python,
    }.items() if value is not None}
    return SLURMCluster(cores=settings.cores, memory=settings.memory, processes=settings.processes,
                        walltime=settings.walltime, job_extra_directives=directives,
                        job_script_prologue=prologue,
                        scheduler_options=scheduler_options, **optional)


def worker_profiler(dashboard_address: str | None) -> bool:
    """Whether dask workers run their statistical profiler: only for a dashboard, whose Profile page shows it.

    The profiler is a thread of every worker that takes the GIL every 10 ms to
    walk the stack of each thread; without a dashboard nobody reads it. In the
    extract stage's in-process worker (the embedded model, 1,024 images, 2
    cores) the stream took 3.02-4.39 s with it and 2.89-3.36 s without (four
    runs each, 2026-12-03).
    """
    return dashboard_address is not None


def require_dask_cuda() -> None:
    """Raise ClusterError naming the extra to install when dask-cuda is missing."""
    if importlib.util.find_spec("dask_cuda") is None:
        raise ClusterError("cluster=cuda needs dask-cuda, which is not installed; install the extra: "
                           "pip install -e '.[cuda]' (or use cluster=local)")


def cuda_cluster(settings: CudaClusterSettings) -> Any:
    """A ``dask_cuda.LocalCUDACluster`` (ClusterError naming the extra when dask-cuda is missing)."""
    require_dask_cuda()
    from dask_cuda import LocalCUDACluster

    optional = {key: value for key, value in {
        "n_workers": settings.n_workers, "CUDA_VISIBLE_DEVICES": settings.visible_devices,
        "local_directory": settings.local_directory}.items() if value is not None}
    return LocalCUDACluster(threads_per_worker=settings.threads_per_worker, host=settings.host,
                            dashboard_address=settings.dashboard_address,
                            scheduler_kwargs=http_server_options(settings.dashboard_address, settings.host),
                            **optional)


def local_cluster(settings: LocalClusterSettings) -> LocalCluster:
    """A ``LocalCluster`` with the machine's cores shared out between its workers unless set."""
    threads = settings.threads_per_worker or max(1, (os.cpu_count() or 1) // settings.n_workers)
    network = {"host": settings.host} if settings.processes else {}  # one in-process worker talks in memory
    return LocalCluster(n_workers=settings.n_workers, threads_per_worker=threads, processes=settings.processes,
                        dashboard_address=settings.dashboard_address,
                        scheduler_kwargs=http_server_options(settings.dashboard_address, settings.host), **network)


def http_server_options(dashboard_address: str | None, host: str) -> dict[str, Any]:
    """Scheduler options: without a dashboard, its small HTTP server (health, metrics) on ``host``, a free port.

    (distributed would otherwise take port 8787 on the machine's address even with no dashboard.)
    """
    return {} if dashboard_address is not None else {"dashboard": False, "dashboard_address": f"{host}:0"}


@contextmanager
def open_client(settings: ClusterSettings) -> Iterator[Client]:
    """Start (or reach) the cluster the settings describe, yield a client on it, close both at the end."""
    if isinstance(settings, AddressClusterSettings):
        try:
            client = Client(settings.address, timeout=f"{settings.timeout_s}s")
        except OSError as error:
            raise ClusterError(f"cluster.address={settings.address!r}: no dask scheduler answers there ({error}); "
                               "start one, or use cluster=local") from error
        with client:
            log.info("cluster: connected to %s (%d workers); its dashboard, if it serves one: %s", settings.address,
                     len(client.scheduler_info()["workers"]), client.dashboard_link)
            yield client
        return
    dask.config.set({"distributed.worker.daemon": False,  # workers may start image loader processes
                     "distributed.worker.profile.enabled": worker_profiler(settings.dashboard_address)})
    if isinstance(settings, SlurmClusterSettings):
        cluster = slurm_cluster(settings)
        if settings.maximum_jobs is not None:
            cluster.adapt(minimum_jobs=settings.jobs, maximum_jobs=settings.maximum_jobs)
        else:
            cluster.scale(jobs=settings.jobs)
    elif isinstance(settings, CudaClusterSettings):
        cluster = cuda_cluster(settings)
    else:
        cluster = local_cluster(settings)
    with cluster, Client(cluster) as client:
        log.info("cluster: %s", _describe(settings, cluster))
        _log_dashboard(client, settings.dashboard_address)
        if isinstance(settings, SlurmClusterSettings):
            log.info("cluster: waiting for the first SLURM worker (at most %.0f s)", settings.wait_for_workers_s)
            try:
                client.wait_for_workers(1, timeout=settings.wait_for_workers_s)
            except TimeoutError as error:
                raise ClusterError(f"no SLURM worker joined within cluster.wait_for_workers_s="
                                   f"{settings.wait_for_workers_s:g} s; check the jobs with squeue and their logs "
                                   f"(cluster.log_directory)") from error
        yield client


def _describe(settings: ClusterSettings, cluster: Any) -> str:
    if isinstance(settings, SlurmClusterSettings):
        scaling = (f"adapting between {settings.jobs} and {settings.maximum_jobs} jobs" if settings.maximum_jobs
                   else f"{settings.jobs} jobs")
        return f"SLURM, {scaling} of {settings.processes} worker(s), scheduler {cluster.scheduler_address}"
    workers = len(cluster.workers)
    return f"{type(cluster).__name__} with {workers} worker(s) at {cluster.scheduler_address}"


def _log_dashboard(client: Client, dashboard_address: str | None) -> None:
    """Print the dashboard's link when the scheduler serves one (``dashboard_address`` set, bokeh installed)."""
    if dashboard_address is None:
        return
    if importlib.util.find_spec("bokeh") is None:
        log.warning("cluster: no dask dashboard: it needs bokeh (pip install bokeh)")
        return
    print(f"dask dashboard: {client.dashboard_link}", flush=True)


class ClusterSession:
    """The cluster of one pipeline run, started on first use and closed when the run ends."""

    def __init__(self, cluster_cfg: DictConfig) -> None:
        """Check the settings; fail now, before any stage writes, where the cluster cannot be had.

        A missing dask-cuda is found at once and a scheduler address is connected to at once. A local
        or SLURM cluster starts on first use: a run whose stages are all current submits no SLURM job.
        """
        self.settings = cluster_settings(cluster_cfg)
        self._opened: Any = None
        self.client: Client | None = None
        if isinstance(self.settings, CudaClusterSettings):
            require_dask_cuda()
        if isinstance(self.settings, AddressClusterSettings):
            self.get()

    def get(self) -> Client:
        """The run's client, starting the cluster the first time."""
        if self.client is None:
            self._opened = open_client(self.settings)
            self.client = self._opened.__enter__()
        return self.client

    def close(self) -> None:
        """Drop what the workers keep (a model on a GPU) and close the cluster, or the connection to it."""
        if self.client is not None:
            self.client.run(clear_worker_state)
        if self._opened is not None:
            self._opened.__exit__(None, None, None)
        self._opened = self.client = None


_SESSION: ContextVar[ClusterSession | None] = ContextVar("cluster_session", default=None)


@contextmanager
def cluster_session(cluster_cfg: DictConfig) -> Iterator[ClusterSession]:
    """Share one cluster between the stages run inside the ``with`` block (settings checked now)."""
    session = ClusterSession(cluster_cfg)
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)
        session.close()


@contextmanager
def dask_client(cluster_cfg: DictConfig) -> Iterator[Client]:
    """The run's client inside a ``cluster_session``; otherwise a cluster of its own, closed on exit."""
    session = _SESSION.get()
    if session is not None:
        yield session.get()
        return
    with open_client(cluster_settings(cluster_cfg)) as client:
        yield client


def worker_count(client: Client) -> int:
    """Workers connected now (at least 1, so that work is cut into at least one piece)."""
    return max(1, len(client.scheduler_info()["workers"]))


def thread_count(client: Client) -> int:
    """Worker threads connected now, over all workers (at least 1)."""
    return max(1, sum(worker["nthreads"] for worker in client.scheduler_info()["workers"].values()))


def results_in_window(client: Client, task: Callable[..., Any], calls: Iterable[tuple],
                      window: int | None = None, keep_going: bool = False) -> Iterator[tuple[int, Any]]:
    """``(i, task(*calls[i]))`` for every call, in the order they finish, with at most ``window`` calls in flight.

    ``calls`` may be a generator: each call is made only when it is submitted.
    A call is submitted only when fewer than ``window`` (default: twice the
    cluster's worker threads, so no thread waits) are running or finished but
    not yet taken, and each future is released once its result is yielded, so
    the results the workers hold at once stay bounded by the window however
    many calls there are (submitting them all at once lets finished results
    pile up in the workers' memory whenever the caller is slower than the workers).

    A call that raises raises here when its turn comes; with ``keep_going``
    the other calls still run and yield, and the first error is raised after
    the last of them (for stages that keep every finished block on disk).
    """
    window = window or 2 * thread_count(client)
    waiting = iter(enumerate(calls))
    index_of: dict[Any, int] = {}
    running = as_completed()
    first_error: BaseException | None = None

    def submit_next() -> None:
        call = next(waiting, None)
        if call is not None:
            future = client.submit(task, *call[1], pure=False)
            index_of[future] = call[0]
            running.add(future)

    for _ in range(window):
        submit_next()
    for future in running:
        index = index_of.pop(future)
        if keep_going and future.status == "error":
            first_error = first_error or future.exception()
            future.release()
            submit_next()
            continue
        result = future.result()
        future.release()
        submit_next()
        yield index, result
    if first_error is not None:
        raise first_error


def runs_in_this_process(client: Client) -> bool:
    """Whether a worker of the client's cluster lives in this process (the default in-process cluster)."""
    return os.getpid() in client.run(os.getpid).values()


def _inaccessible(readable: Sequence[str], writable: Sequence[str]) -> list[str]:
    """What this process cannot do of reading ``readable`` and writing ``writable`` (runs on every worker)."""
    return ([f"cannot read {path}" for path in readable if not os.access(path, os.R_OK)]
            + [f"cannot write {path}" for path in writable if not os.access(path, os.W_OK)])


def check_worker_paths(client: Client, readable: Sequence[Path | str], writable: Sequence[Path | str] = ()) -> None:
    """Raise ClusterError naming the first worker (and its host) that cannot read or write a path it needs.

    ``writable`` folders must exist (the stage creates them first).
    """
    problems_by_worker = client.run(_inaccessible, [str(Path(path).resolve()) for path in readable],
                                    [str(Path(path).resolve()) for path in writable])
    for worker, problems in sorted(problems_by_worker.items()):
        if problems:
            host = client.run(socket.gethostname, workers=[worker])[worker]
            raise ClusterError(f"the dask worker {worker} on host {host} {problems[0]}: workers must see the run "
                               "directory, the probe set and the checkpoint at the same paths as this process "
                               "(a shared file system)")


_STATE: dict[str, Any] = {}
_STATE_LOCK = threading.Lock()
_DEVICE_LOCK = threading.Lock()


def worker_state(key: str, factory: Callable[[], State]) -> State:
    """The value ``factory()`` built once per process for ``key`` (for example a loaded model)."""
    with _STATE_LOCK:
        if key not in _STATE:
            _STATE.clear()  # one model per worker at a time: a new run's model replaces the last one
            _STATE[key] = factory()
        return _STATE[key]


def clear_worker_state() -> None:
    """Forget this process's ``worker_state`` (run on every worker when a run ends)."""
    with _STATE_LOCK:
        _STATE.clear()


@contextmanager
def device_lock() -> Iterator[None]:
    """Hold this process's model lock, so one worker runs one model pass at a time, with all its threads.

    Inside a dask worker, torch's CPU threads in the calling task thread are set
    to the worker's thread count: dask starts worker processes with
    OMP_NUM_THREADS=1, which would leave a worker's other cores idle.
    """
    with _DEVICE_LOCK:
        try:
            threads = get_worker().state.nthreads
        except ValueError:  # not on a dask worker
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)
