"""The stage contract: skip work done with the same inputs, redo work whose inputs changed.

A stage (or one layer of a per-layer stage) declares its *inputs*: the config
values it reads, the identity of the model or probe set where it matters, and
the stamp digests of the upstream artifacts it consumes. When it has written
every output, it writes a *stamp* beside them (``RunLayout.stamp``): the
inputs, the stage's output format version and a digest of both. Before it runs,
``is_current`` compares the stamp with the inputs of this run, for every stage
alike:

- same inputs and format -> skip, and say so;
- no stamp -> run (outputs without a stamp were never finished, whatever they hold);
- other inputs -> say which ones changed and run again, replacing the outputs.
  Right before it overwrites the first output the stage calls ``start``, which
  removes the stamp and the report's index page, so that outputs being
  replaced are never taken or shown as current if the run is killed (a run
  refused before that point, for a bad input, leaves the finished outputs,
  their stamp and the report as they were).

Because a downstream stage's inputs hold its upstream stamps' digests, new
thresholds change the tally's and topk's inputs, a new tally changes the
attribute stage's, and so on down the pipeline. The stamp is written last and
atomically: a kill at any moment leaves either the old stamp or none.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from dissect.artifacts import read_json, write_json_atomic
from dissect.errors import ArtifactError
from dissect.layout import RunLayout

log = logging.getLogger(__name__)


def canonical(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` as they read back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def digest(inputs: dict[str, Any], version: int) -> str:
    """SHA-256 (hex, 16 characters) of the canonical inputs and the format version."""
    text = json.dumps({"inputs": canonical(inputs), "format": version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON values (a whole value when not both dicts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".") or "(all)"]


def is_current(path: Path, inputs: dict[str, Any], version: int, what: str) -> bool:
    """Whether the stamp at ``path`` was written from ``inputs`` at format ``version``.

    Logs the decision for ``what`` (for example "tally of layer4").
    """
    if not path.is_file():
        return False
    stamp = read_json(path)
    if stamp.get("digest") == digest(inputs, version):
        log.info("%s: done with these settings and inputs, skipping", what)
        return True
    if stamp.get("format") != version:
        reason = f"the output format changed ({stamp.get('format')} -> {version})"
    else:
        keys = changed_keys(stamp.get("inputs"), canonical(inputs))
        reason = "changed: " + ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    log.info("%s: %s; running again", what, reason)
    return False


def start(layout: RunLayout, stage: str, layer: str | None = None) -> None:
    """Remove a stage's stamp before the outputs it vouches for are overwritten, and the report that shows them.

    The report is rebuilt by the report stage; until then no page presents
    the outputs being replaced as current.
    """
    layout.stamp(stage, layer).unlink(missing_ok=True)
    if layout.report_index.exists():
        layout.report_index.unlink()
        log.info("report: %s removed while %s is replaced; the report stage rebuilds it (stages=[report])",
                 layout.report_index, stage)


def write_stamp(path: Path, inputs: dict[str, Any], version: int) -> str:
    """Write the stamp (after every output is written); return its digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    value = digest(inputs, version)
    write_json_atomic(path, {"inputs": canonical(inputs), "format": version, "digest": value})
    return value


def stamp_digest(path: Path, stage: str) -> str:
    """The digest of a finished upstream stage's stamp; raises ArtifactError naming the stage to run."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: the {stage} stage has not finished for this run; "
                            f"run it first (stages=[{stage}])")
    return str(read_json(path)["digest"])


def optional_digest(path: Path) -> str | None:
    """The digest of a stamp, or None where the stage has not finished (for inputs that may be absent)."""
    return str(read_json(path)["digest"]) if path.is_file() else None
