"""The one base class of every error a user can cause, and its main kinds.

``python -m dissect`` prints a ``DissectError`` as one line (what is wrong and
what is allowed) and exits with code 2; any other exception is a bug and keeps
its traceback. Stages raise these classes, or a subclass of their own that
says which stage failed (``ExtractError``, ``AttributionError``, ...).
"""


class DissectError(Exception):
    """A mistake the user can fix: its message names what is wrong and what is allowed."""


class ConfigError(DissectError):
    """A configuration value (a key, a group choice, a stage name) that is not allowed."""


class ArtifactError(DissectError):
    """A run-directory artifact that a stage needs is missing, unfinished or from another run."""


class DeviceError(ConfigError):
    """A device was asked for that this machine does not have."""


class DataError(DissectError):
    """Probe data (images, masks, label tables) that cannot be read."""
