"""The dask.distributed client the parallel stages run on.

By default an in-process local cluster (one worker, a thread per core, no set-up); with
``cluster.address=tcp://host:port`` an existing dask.distributed cluster (for
example one started on SLURM nodes with ``dask-scheduler``/``dask-worker``).
Workers must see the run directory and the probe set at the same paths.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster
from omegaconf import DictConfig


@contextmanager
def dask_client(cluster_cfg: DictConfig) -> Iterator[Client]:
    """A client on ``cluster_cfg.address``, or on a new in-process LocalCluster when it is null."""
    if cluster_cfg.address:
        with Client(str(cluster_cfg.address)) as client:
            yield client
        return
    threads = cluster_cfg.threads_per_worker or os.cpu_count() or 1
    with LocalCluster(n_workers=int(cluster_cfg.n_workers), threads_per_worker=int(threads),
                      processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        yield client
