"""The stage registry and the runner of ``python -m dissect``.

Stages run in pipeline order; each reads the artifacts of earlier stages from
the run directory and writes its own (see README). No stage imports another.
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from dissect import attribute, audit, embed, extract, tally, thresholds, topk
from reports import build as report

log = logging.getLogger(__name__)

Stage = Callable[[DictConfig], Path]

#: Every stage, in pipeline order.
STAGES: dict[str, Stage] = {
    "extract": extract.run,
    "thresholds": thresholds.run,
    "tally": tally.run,
    "topk": topk.run,
    "audit": audit.run,
    "embed": embed.run,
    "attribute": attribute.run,
    "report": report.run,
}


class ConfigError(ValueError):
    """A configuration value that is not allowed."""


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


def run_pipeline(cfg: DictConfig) -> dict[str, Path]:
    """Run the selected stages of ``cfg`` in order; return each stage's output path."""
    requested = list(cfg.stages) if isinstance(cfg.stages, ListConfig) else str(cfg.stages)
    outputs = {}
    for name in selected_stages(requested):
        log.info("stage %s", name)
        outputs[name] = STAGES[name](cfg)
    return outputs
