"""User-facing errors.

Every problem caused by something a user handed in (a model spec, an axis file, a transcript,
a config) raises a subclass of :class:`PersonaCompassError` whose message names the problem and
says how to fix it. The command line turns these into one error line and a non-zero exit.

A message puts the Python parameters a caller can change in backticks, as in
"`out` /x already exists; pass `force=True` to replace it"; the command line shows the flags of
the command that ran instead ("--out /x already exists; pass --force to replace it"), see
:mod:`persona_compass.cli.param_flags`.
"""

from __future__ import annotations


class PersonaCompassError(Exception):
    """Base class for every error a user can fix."""


class ModelSpecError(PersonaCompassError):
    """A model spec (alias, HF id, folder or .gguf file) cannot be resolved or loaded."""


class ModelNotInstalledError(ModelSpecError):
    """An offline model alias is known but its weight package is not installed."""


class LayerError(PersonaCompassError):
    """Decoder blocks cannot be found, or a layer index is out of range."""


class ChatTemplateError(PersonaCompassError):
    """A conversation cannot be rendered or its turns cannot be located in the tokens."""


class AxisFileError(PersonaCompassError):
    """An axis bundle or reference axis file is missing, malformed or does not fit the model."""


class UnsafeFileError(AxisFileError):
    """A pickle file asks to run code; it was refused and nothing from it ran."""


class CappingConfigError(PersonaCompassError):
    """A capping configuration is malformed or does not fit the axis or model."""


class TranscriptError(PersonaCompassError):
    """A transcript file is unreadable or not in a known layout."""
