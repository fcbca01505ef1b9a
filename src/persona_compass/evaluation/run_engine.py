"""The evaluation's engine choice: ``hf`` (the model in this process, one conversation at a
time) or ``vllm`` (every conversation's next turn in one vLLM batch).

This module starts and checks the ``vllm`` engine for an evaluation without loading the Hugging
Face weights: the settings' model fingerprint comes from the model's config, and the dtype is
resolved exactly as the ``hf`` path resolves ``--dtype``. It also gives the simulated user
``model:self`` a backend that writes through the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..axis import Axis, model_fingerprint
from ..capping import CappingConfig
from ..engines.base import ENGINES, CompassRequest
from ..generation import SamplingConfig
from .conditions import Condition
from .run_store import EvaluationError
from .users import DEFAULT_USER_SAMPLING

MAX_BATCH = 256  # conversations one vLLM engine generates together (its max_num_seqs)
KV_CACHE_GIB = 4  # CPU KV cache: a whole shipped run (52 conversations of ~1.3k tokens) fits


def check_engine(engine: Any) -> tuple[str, Any]:
    """``engine`` as (name, started engine or None): a name from :data:`ENGINES` or an
    engine object (its ``name`` says which).

    Raises:
        EvaluationError: an unknown name or an object that is no engine.
    """
    if isinstance(engine, str):
        name = engine.strip().lower()
        if name not in ENGINES:
            raise EvaluationError(
                f"engine {engine!r} is not one of {', '.join(ENGINES)}; use --engine hf (the "
                "model in this process) or --engine vllm (vLLM batches)"
            )
        return name, None
    kind = getattr(engine, "name", None)
    if kind not in ENGINES or not callable(getattr(engine, "respond", None)):
        raise EvaluationError(
            f"engine {engine!r:.80} is not an engine; pass 'hf', 'vllm' or an object from "
            "persona_compass.engines.open_engine"
        )
    return str(kind), engine


@dataclass(frozen=True)
class VLLMModelInfo:
    """What the settings record of the model the ``vllm`` engine will load."""

    folder: str
    fingerprint: str
    dtype: str  # the dtype name passed to vLLM (float32, bfloat16, float16)
    max_model_len: int


def vllm_model_info(spec: str, dtype: str | None) -> VLLMModelInfo:
    """The model folder, config fingerprint and dtype for ``spec``, read from its config only.

    ``dtype`` is resolved as for the ``hf`` engine (None: ``$PERSONA_COMPASS_DTYPE`` or the
    machine's default), so both engines run the same precision for the same ``--dtype``.
    """
    import torch
    from transformers import AutoConfig

    from ..engines.vllm_engine import model_folder
    from ..models.loader import resolve_dtype

    folder = model_folder(spec)
    config = AutoConfig.from_pretrained(folder)
    text = getattr(config, "text_config", None) or config
    resolved: Any = resolve_dtype(dtype)
    if resolved == "auto":  # the checkpoint's own dtype, as from_pretrained(dtype="auto")
        resolved = getattr(text, "torch_dtype", None) or getattr(text, "dtype", None)
        if isinstance(resolved, str):
            resolved = getattr(torch, resolved, None)
        if not isinstance(resolved, torch.dtype):
            resolved = torch.float32
    name = str(resolved).replace("torch.", "")
    # the whole context the model has, so that no conversation that hf can run is cut short;
    # capped so the KV cache can always hold one full-length conversation
    context = int(getattr(text, "max_position_embeddings", 2048) or 2048)
    return VLLMModelInfo(folder, model_fingerprint(config), name, min(context, 8192))


def op_layers(
    axis: Axis, conditions: Sequence[Condition], caps: Mapping[str, CappingConfig | None]
) -> tuple[list[int], int]:
    """The layers the compass op must run on for these conditions (their caps and steering),
    and the distinct cap vectors any one layer needs."""
    layers: set[int] = set()
    vectors: dict[int, set[bytes]] = {}
    for cond in conditions:
        cfg = caps.get(cond.name)
        if cfg is not None:
            layers.update(cfg.layers)
            for i, layer in enumerate(cfg.layers):
                vectors.setdefault(layer, set()).add(cfg.vectors[i].float().numpy().tobytes())
        if cond.steering is not None:
            steer = cond.steering.layers
            layers.update([axis.layer] if steer is None else steer)
    most = max((len(v) for v in vectors.values()), default=1)
    return sorted(layers), most


def check_engine_layers(
    engine: Any,
    axis: Axis,
    conditions: Sequence[Condition],
    caps: Mapping[str, CappingConfig | None],
) -> None:
    """Refuse, before any generation, a started vllm engine that cannot run a condition.

    Raises:
        EvaluationError: a condition caps or steers where the engine's compass op does not run,
            or the engine was made for another axis shape.
    """
    if (engine.axis.n_layers, engine.axis.d_model) != (axis.n_layers, axis.d_model):
        raise EvaluationError(
            "the engine was started with an axis of another shape than the evaluation's bundle; "
            "start it with the same bundle"
        )
    needed, _ = op_layers(axis, conditions, caps)
    missing = sorted(set(needed) - set(engine.layers))
    if missing:
        raise EvaluationError(
            f"the vllm engine runs the compass on layers {list(engine.layers)}, and these "
            f"conditions cap or steer on {missing} too; start it with layers={missing} (or let "
            "run_evaluation start it: engine='vllm')"
        )


def start_vllm_engine(
    info: VLLMModelInfo,
    bundle: Any,
    axis: Axis,
    conditions: Sequence[Condition],
    caps: Mapping[str, CappingConfig | None],
    *,
    batch: int,
    options: Mapping[str, Any] | None = None,
    traits: Sequence[Any] = (),
) -> Any:
    """A :class:`~persona_compass.engines.vllm_engine.VLLMEngine` for an evaluation: the compass
    op on every layer a condition caps or steers, ``max_num_seqs`` for ``batch`` conversations.

    ``options`` override the defaults (``enforce_eager``, ``max_num_seqs``, ``kv_cache_gib``...);
    ``traits`` (trait bundles) are the needles it reads beside the axis.
    """
    from ..engines.vllm_engine import VLLMEngine

    layers, vectors = op_layers(axis, conditions, caps)
    settings: dict[str, Any] = {
        "dtype": info.dtype,
        "layers": layers,
        "vectors_per_layer": max(4, vectors),
        "max_num_seqs": max(8, min(batch, MAX_BATCH)),
        "max_model_len": info.max_model_len,
        "kv_cache_gib": KV_CACHE_GIB,
    }
    if traits:  # only then: the option is newer than the engine's other options
        settings["traits"] = list(traits)
    settings.update(options or {})
    return VLLMEngine(info.folder, bundle, **settings)


class EngineUserBackend:
    """``model:self`` on the ``vllm`` engine: the simulated user's turns are written by the
    model under evaluation through the engine (uncapped, unsteered, one batch per call), with
    the local simulator's sampling (:data:`~.users.DEFAULT_USER_SAMPLING`)."""

    def __init__(self, engine: Any, name: str, sampling: SamplingConfig | None = None) -> None:
        self.engine = engine
        self.name = name
        self.sampling = sampling or DEFAULT_USER_SAMPLING

    def complete_many(self, conversations: Sequence[Sequence[Mapping[str, str]]]) -> list[str]:
        if not conversations:
            return []
        requests = [
            CompassRequest(
                [dict(m) for m in c], mode="off", sampling=self.sampling, read_history=False
            )
            for c in conversations
        ]
        return [answer.text for answer in self.engine.respond(requests)]
