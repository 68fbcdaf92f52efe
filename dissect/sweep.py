"""Sweeps: every job of ``python -m dissect -m ...`` names its run directory; at the end, one comparison page.

Hydra runs each job of a sweep (``-m model=alexnet,vgg16``, ``-m
model.checkpoint=a.pt,b.pt``) with the basic launcher in this process, or with
``hydra/launcher=submitit_local`` / ``submitit_slurm`` as separate processes
or SLURM jobs. Each job writes its own run directory (``out_dir``) and leaves
its path in its job folder of the sweep (``<sweep dir>/<job>/run_dir.txt``).
When every job has ended, ``CompareRuns`` (a Hydra callback, configured under
``hydra.callbacks`` in ``conf/config.yaml``) reads those files and writes the
comparison page of the runs (``dissect.compare``) to ``<sweep dir>/compare/``.
"""

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dissect.errors import DissectError

log = logging.getLogger(__name__)

#: The file in each job's folder of a sweep that holds the job's run directory.
RUN_DIR_FILE = "run_dir.txt"


def record_run_dir(out_dir: str) -> None:
    """Leave the run directory of this job in its sweep folder (a no-op outside a sweep)."""
    hydra_cfg = HydraConfig.get()
    if str(hydra_cfg.mode) != "RunMode.MULTIRUN":
        return
    job_dir = Path(hydra_cfg.runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / RUN_DIR_FILE).write_text(str(Path(out_dir).resolve()) + "\n", encoding="utf-8")


def swept_run_dirs(sweep_dir: Path) -> list[Path]:
    """The run directories the jobs of a sweep recorded, in job order."""
    files = sorted(sweep_dir.glob(f"*/{RUN_DIR_FILE}"), key=lambda path: int(path.parent.name.split("-")[0]))
    return list(dict.fromkeys(Path(path.read_text(encoding="utf-8").strip()) for path in files))


class CompareRuns(Callback):
    """At the end of a sweep, the comparison page of its runs in ``<sweep dir>/compare/index.html``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dissect.compare import compare, write_comparison

        sweep_dir = Path(str(config.hydra.sweep.dir))
        run_dirs = swept_run_dirs(sweep_dir)
        if not run_dirs:
            log.warning("sweep: no job recorded a run directory in %s; no comparison page", sweep_dir)
            return
        try:
            page = write_comparison(compare(run_dirs), sweep_dir / "compare")
        except DissectError as error:
            log.error("sweep: no comparison page: %s", error)
            return
        print(f"comparison of {len(run_dirs)} runs: open {page.resolve().as_uri()}", flush=True)
