"""``python -m dissect [hydra overrides]``: run the dissection pipeline.

A mistake the user can fix (a ``DissectError``, or an override that Hydra
cannot compose: an unknown config group choice, a misspelled key) is printed as
one line and exits with code 2; any other exception is a bug and keeps its
traceback.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dissect.errors import DissectError
from dissect.pipeline import run_pipeline, stage_module
from dissect.sweep import record_run_dir

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: Command-line flags of Hydra that do not compose a config (they print help, info or a shell completion).
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc",
              "--version", "--multirun", "-m")

log = logging.getLogger("dissect")


def composition_error(overrides: list[str]) -> str | None:
    """Compose the config with ``overrides`` as Hydra will; the error in one line, or None if it composes."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        text = str(error) + (f"\n{error.__cause__}" if error.__cause__ else "")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        kept = [line for line in lines if not line.startswith(("full_key:", "object_type=", "Config search path",
                                                                "provider=", "Set the environment variable",
                                                                "reference_type="))]
        return "configuration error: " + " ".join(kept).replace(": ", ": ")
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    record_run_dir(str(cfg.out_dir))
    try:
        outputs = run_pipeline(cfg)
    except DissectError as error:
        log.error("%s", error)
        sys.exit(2)
    for stage, path in outputs.items():
        if stage != "report":
            print(f"{stage}: {path}")
    if "tally" in outputs:
        print(stage_module("tally").summary_table(outputs["tally"], [str(layer) for layer in cfg.layers]))
    if "report" in outputs:
        print(f"report: open {outputs['report'].resolve().as_uri()}")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not any(argument.split("=")[0] in INFO_FLAGS for argument in arguments):
        problem = composition_error(arguments)
        if problem:
            print(problem, file=sys.stderr)
            sys.exit(2)
    main()
