"""The stage registry and the runner of ``python -m dissect``.

Stages run in pipeline order; each reads the artifacts of earlier stages from
the run directory and writes its own (see README). A stage module has
``run(cfg) -> Path`` and may have ``check(cfg) -> None``, which refuses bad
settings without touching the disk: the runner calls the check of every
selected stage before the first one runs, so a mistake in a late stage's
settings costs nothing. The stages share one dask cluster
(``dissect.cluster.cluster_session``), started when the first stage needs it. Stage modules are imported only when selected (the
report does not import Captum, a run of one stage not the others).
"""

import importlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from omegaconf import DictConfig, ListConfig

from dissect.cluster import cluster_session
from dissect.errors import ConfigError

log = logging.getLogger(__name__)

#: Every stage, in pipeline order, and the module that implements it.
STAGES: dict[str, str] = {
    "extract": "dissect.stages.extract",
    "thresholds": "dissect.stages.thresholds",
    "tally": "dissect.stages.tally",
    "compositional": "dissect.stages.compositional",
    "topk": "dissect.stages.topk",
    "audit": "dissect.stages.audit",
    "embed": "dissect.stages.embed",
    "attribute": "dissect.stages.attribute",
    "explanations": "dissect.stages.explanations",
    "visualise": "dissect.stages.visualise",
    "report": "reports.build",
}


def selected_stages(requested: str | Sequence[str]) -> list[str]:
    """``all`` or a list of stage names -> the names in pipeline order (unknown names raise)."""
    if isinstance(requested, str):
        if requested == "all":
            return list(STAGES)
        requested = [requested]
    unknown = [name for name in requested if name not in STAGES]
    if unknown:
        raise ConfigError(f"stages={list(requested)} names unknown stage(s) {unknown}; "
                          f"allowed: all, or a list of {', '.join(STAGES)}")
    return [name for name in STAGES if name in requested]


def stage_module(name: str) -> ModuleType:
    """The module of stage ``name`` (imported on first use)."""
    return importlib.import_module(STAGES[name])


def run_pipeline(cfg: DictConfig) -> dict[str, Path]:
    """Check the settings of the selected stages of ``cfg``, then run them in order; return each one's output."""
    requested = list(cfg.stages) if isinstance(cfg.stages, ListConfig) else str(cfg.stages)
    modules = {name: stage_module(name) for name in selected_stages(requested)}
    for module in modules.values():
        if hasattr(module, "check"):
            module.check(cfg)
    outputs = {}
    with cluster_session(cfg.cluster):  # checks the cluster settings; starts the cluster on first use
        for name, module in modules.items():
            log.info("stage %s", name)
            started = time.perf_counter()
            outputs[name] = module.run(cfg)
            log.info("stage %s took %.1f s", name, time.perf_counter() - started)
    return outputs
