"""persona-compass: find a model's Assistant Axis, monitor persona drift live, and cap it.

Example:
    >>> import persona_compass as pc
    >>> model, tok = pc.load_model("smollm2-135m")
    >>> axis = pc.Axis.load("bundle/")
    >>> cap = pc.CappingConfig.load("bundle/")
    >>> with pc.capping(model, cap), pc.DriftMonitor(model, axis) as mon:
    ...     model.generate(...)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .alerts import Alert, AlertRules
from .axis import Axis, model_fingerprint
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

__all__ = [
    "AdaptivePolicy",
    "AddVector",
    "Alert",
    "AlertRules",
    "Axis",
    "AxisFileError",
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
