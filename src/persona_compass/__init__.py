"""persona-compass: find a model's Assistant Axis, monitor persona drift live, and cap it.

Example:
    >>> import persona_compass as pc
    >>> bundle = pc.Bundle.open("smollm2-135m")   # a bundle folder, or a shipped alias
    >>> model, tok = bundle.load_model()          # the bundle's model, checked against it
    >>> axis, cap = bundle.axis, bundle.capping
    >>> with pc.capping(model, cap), pc.DriftMonitor(model, axis) as mon:
    ...     model.generate(...)

The names below load on first use (PEP 562), so ``import persona_compass`` and
``persona-compass --help`` do not import torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these
    from .alerts import Alert, AlertRules
    from .axis import Axis, model_fingerprint
    from .bundle import Bundle
    from .bundles import resolve_bundle
    from .calibration import Calibration
    from .capping import CappingConfig
    from .chat import RenderedChat, TurnSpan, render_chat, supports_system_role
    from .compass import AdaptivePolicy, CompassSession, Steering, respond
    from .errors import (
        AxisFileError,
        CappingConfigError,
        ChatTemplateError,
        LayerError,
        ModelNotInstalledError,
        ModelSpecError,
        PersonaCompassError,
        TranscriptError,
        UnsafeFileError,
    )
    from .generation import SamplingConfig, generate_chat
    from .interventions import (
        AddVector,
        CapCeiling,
        CapEngagement,
        CapFloor,
        add_hooks,
        capping,
        steering,
    )
    from .layers import find_decoder_blocks
    from .models import load_model, model_display_name
    from .monitor import DriftMonitor, TurnProjection, TurnReading, project_conversation
    from .record import SpanMeanRecorder, record_span_means
    from .transcripts import Transcript, load_transcripts

# The module (in this package) that defines each public name; the same names as above.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "alerts": ("Alert", "AlertRules"),
    "axis": ("Axis", "model_fingerprint"),
    "bundle": ("Bundle",),
    "bundles": ("resolve_bundle",),
    "calibration": ("Calibration",),
    "capping": ("CappingConfig",),
    "chat": ("RenderedChat", "TurnSpan", "render_chat", "supports_system_role"),
    "compass": ("AdaptivePolicy", "CompassSession", "Steering", "respond"),
    "errors": (
        "AxisFileError",
        "CappingConfigError",
        "ChatTemplateError",
        "LayerError",
        "ModelNotInstalledError",
        "ModelSpecError",
        "PersonaCompassError",
        "TranscriptError",
        "UnsafeFileError",
    ),
    "generation": ("SamplingConfig", "generate_chat"),
    "interventions": (
        "AddVector",
        "CapCeiling",
        "CapEngagement",
        "CapFloor",
        "add_hooks",
        "capping",
        "steering",
    ),
    "layers": ("find_decoder_blocks",),
    "models": ("load_model", "model_display_name"),
    "monitor": ("DriftMonitor", "TurnProjection", "TurnReading", "project_conversation"),
    "record": ("SpanMeanRecorder", "record_span_means"),
    "transcripts": ("Transcript", "load_transcripts"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "AdaptivePolicy",
    "AddVector",
    "Alert",
    "AlertRules",
    "Axis",
    "AxisFileError",
    "Bundle",
    "Calibration",
    "CapCeiling",
    "CapEngagement",
    "CapFloor",
    "CappingConfig",
    "CappingConfigError",
    "ChatTemplateError",
    "CompassSession",
    "DriftMonitor",
    "LayerError",
    "ModelNotInstalledError",
    "ModelSpecError",
    "PersonaCompassError",
    "RenderedChat",
    "SamplingConfig",
    "SpanMeanRecorder",
    "Steering",
    "Transcript",
    "TranscriptError",
    "TurnProjection",
    "TurnReading",
    "TurnSpan",
    "UnsafeFileError",
    "__version__",
    "add_hooks",
    "capping",
    "find_decoder_blocks",
    "generate_chat",
    "load_model",
    "load_transcripts",
    "model_display_name",
    "model_fingerprint",
    "project_conversation",
    "record_span_means",
    "render_chat",
    "resolve_bundle",
    "respond",
    "steering",
    "supports_system_role",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use; else a submodule (``pc.engines``)."""
    module = _MODULE_OF.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups find it without calling this
        return value
    # Submodules stay reachable as attributes, as when the eager imports loaded them.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


class _Package(types.ModuleType):
    """This package's module type, so that ``persona_compass.capping`` stays the context
    manager: importing the submodule ``persona_compass.capping`` (which defines
    ``CappingConfig``) would otherwise bind the package attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _MODULE_OF:
            return  # the public name wins; the submodule is still in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
