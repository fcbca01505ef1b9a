"""Published axes on the Hugging Face Hub: import, calibrate, push.

The research release publishes Gemma 2 27B's, Qwen 3 32B's and Llama 3.3 70B's axes (and,
for Qwen and Llama, capping configs) in the dataset repository
``lu-christina/assistant-axis-vectors``, one folder per model. Three calls take one of them
to a watched and capped model:

Example:
    >>> from persona_compass import hub
    >>> src = "hf:lu-christina/assistant-axis-vectors/qwen-3-32b"
    >>> hub.import_from_hub(src, "Qwen/Qwen3-32B", "axes/qwen3-32b")
    >>> run = hub.calibrate_bundle("axes/qwen3-32b", "Qwen/Qwen3-32B", engine="vllm")
    >>> run.n_answers, run.p25_interval
    >>> hub.push_bundle("axes/my-model", "hf:me/my-axes/my-model")   # for your own axes
"""

from __future__ import annotations

from .calibrate import CalibrateSettings, CalibrationRun, bootstrap_interval, calibrate_bundle
from .importer import ImportResult, import_from_hub
from .model_card import model_card
from .model_config import ModelShape, model_shape
from .push import PushResult, push_bundle
from .source import HubError, HubSource, is_hub_source, parse_source

__all__ = [
    "CalibrateSettings",
    "CalibrationRun",
    "HubError",
    "HubSource",
    "ImportResult",
    "ModelShape",
    "PushResult",
    "bootstrap_interval",
    "calibrate_bundle",
    "import_from_hub",
    "is_hub_source",
    "model_card",
    "model_shape",
    "parse_source",
    "push_bundle",
]
