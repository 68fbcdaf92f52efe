"""``python -m dissect [hydra overrides]``: run the dissection pipeline."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from dissect.attribute import AttributionError
from dissect.audit import AuditError
from dissect.broden import BrodenFormatError
from dissect.embed import EmbedError
from dissect.extract import ExtractError
from dissect.layers import UnknownLayerError
from dissect.models import ModelLoadError
from dissect.pipeline import ConfigError, run_pipeline
from dissect.probe import ProbeSetError
from dissect.tally import TallyError, summary_table
from dissect.thresholds import ThresholdsError
from dissect.topk import TopkError

#: Errors caused by the user's input: reported in one line, without a traceback.
USER_ERRORS = (AttributionError, AuditError, BrodenFormatError, ConfigError, EmbedError, ExtractError, ModelLoadError,
               ProbeSetError, TallyError, ThresholdsError, TopkError, UnknownLayerError)

log = logging.getLogger("dissect")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        outputs = run_pipeline(cfg)
    except USER_ERRORS as error:
        log.error("%s", error)
        sys.exit(2)
    for stage, path in outputs.items():
        if stage != "report":
            print(f"{stage}: {path}")
    if "tally" in outputs:
        print(summary_table(outputs["tally"], [str(layer) for layer in cfg.layers]))
    if "report" in outputs:
        print(f"report: open {outputs['report'].resolve().as_uri()}")


if __name__ == "__main__":
    main()
