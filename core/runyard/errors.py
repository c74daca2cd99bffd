"""Exceptions runyard raises for bad input; each names what failed, where, and the fix."""

from __future__ import annotations


class RunyardError(Exception):
    """Base class of every error runyard raises on purpose."""


class ConfigError(RunyardError):
    """A configuration file or mapping is malformed or holds a wrong value.

    The CLI turns it into exit code 2.
    """


class DefinitionError(RunyardError):
    """A job or step is defined wrongly (unknown input, cycle, duplicate name, ...)."""


class JobLoadError(RunyardError):
    """A job could not be loaded from its code pointer (missing file, unknown job, ...)."""


class PluginError(RunyardError):
    """A plugin is missing, duplicated, incompatible, or failed to import."""


class PluginChoiceError(PluginError, ConfigError):
    """A configuration names a plugin that is unknown, not installed or failed to load.

    The message names the file (or other layer) and the key path; the CLI exits 2.
    """


class StepSelectionError(RunyardError):
    """A step selection names steps the job does not have, or lacks upstream outputs."""


class OutputSerializationError(RunyardError):
    """A step returned a value the output store cannot serialize."""

    def __init__(self, step_key: str, value: object, cause: BaseException) -> None:
        self.step_key = step_key
        self.type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        super().__init__(
            f"step '{step_key}' returned a {self.type_name} that cannot be stored "
            f"({type(cause).__name__}: {cause}); return a picklable value "
            "(plain data, or an object whose class is importable) instead"
        )


class OutputPathError(RunyardError, ValueError):
    """An output reference (run id, step key, stored ref) would leave the output store's root."""


class StorageError(RunyardError):
    """The run storage cannot be read or written: a full disk, a corrupt or empty database
    file, a database server gone for longer than its reconnect period. The message names
    the database and what to do."""
