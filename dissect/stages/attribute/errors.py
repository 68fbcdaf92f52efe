"""The attribute stage's error: a configuration, model or run directory it cannot explain."""

from __future__ import annotations

from dissect.errors import DissectError


class AttributionError(DissectError):
    """The attributions cannot be computed with this configuration, model or run directory."""
