"""Extraction rollouts generated in vLLM, their activations captured in the same pass.

:class:`VLLMRollouts` starts vLLM with the capture plugin (:mod:`..engines.vllm_capture`):
the chosen layers' block outputs of every generated token are summed per request on the
device, and only the sums and token counts come back. Rollouts stream through vLLM's
continuous batching (a finished answer's place is taken by the next job at once) and come
out in batches of finished rollouts, in the order they finish, for the extraction to judge
and commit.

The answers and means follow :func:`.extract.generate_with_capture` exactly: ``max_new_tokens
+ 1`` tokens are generated and ``max_new_tokens`` kept, so every kept content token was fed
back and captured; end-of-turn tokens count nothing. Each job has its own sampling seed
(from the run's seed and the job id), so an answer does not depend on what ran beside it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..chat import render_chat
from ..engines.base import EngineError
from ..engines.vllm_capture import CAPTURE_KEY
from ..errors import PersonaCompassError
from ..generation import SamplingConfig
from .extract import Job, _truncate

WORKER_EXTENSION = "persona_compass.engines.vllm_capture.CaptureWorkerExtension"
Outputs = tuple[list[str], list[int], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Rollout:
    """One finished rollout: its prompt and kept content ids, text, and captured means."""

    job: Job
    prompt_ids: list[int]
    content_ids: list[int]
    text: str
    means: torch.Tensor  # (n recorded layers, d_model) float32; zeros when count is 0
    count: int


def _outputs(chunk: Sequence[Rollout]) -> tuple[list[Job], Outputs]:
    return [r.job for r in chunk], (
        [r.text for r in chunk],
        [len(r.content_ids) for r in chunk],
        torch.stack([r.means for r in chunk]),
        torch.tensor([r.count for r in chunk]),
    )


def job_seed(seed: int, job_id: str) -> int:
    """A rollout's own sampling seed: the same whatever batch it runs in."""
    return int(hashlib.sha256(f"{seed}/{job_id}".encode()).hexdigest()[:8], 16)


class VLLMRollouts:
    """Generate extraction rollouts in vLLM and capture their per-layer mean activations.

    Args:
        model: a persona-compass model spec (alias, folder or hub id; not ``.gguf``).
        tokenizer: the model's tokenizer (renders prompts exactly as the hf path does).
        stop_ids: end-of-turn token ids (the hf path's ``eos_ids``).
        layers: recorded decoder blocks (sorted indices); ``n_layers``: the model's depth.
        dtype: vLLM's dtype (``"auto"``: the checkpoint's).
        max_num_seqs: rollouts vLLM runs at once.
        kv_cache_gib: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``).
        **vllm_options: passed to ``vllm.LLM`` (``enforce_eager``, ``max_model_len``, ...).

    Example:
        >>> engine = VLLMRollouts("smollm2-135m", tok, [2], layers=list(range(30)), n_layers=30)
        >>> for batch, (texts, n_tokens, means, counts) in engine.batches(jobs, sampling, 0, 16):
        ...     ...
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        tokenizer: Any,
        stop_ids: Sequence[int],
        *,
        layers: Sequence[int],
        n_layers: int,
        dtype: str = "auto",
        max_num_seqs: int = 64,
        kv_cache_gib: int = 2,
        **vllm_options: Any,
    ) -> None:
        from ..engines.vllm_engine import _import_vllm, model_folder

        self.tokenizer = tokenizer
        self.stop_ids = sorted({int(x) for x in stop_ids})
        self.layers = sorted(int(x) for x in layers)
        self.max_num_seqs = int(max_num_seqs)
        self.folder = model_folder(model)
        # vLLM reads these when the engine starts: in this process (the worker extension
        # is called directly, sums come back without serialisation), CPU KV cache size.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
            # unset, vLLM serves with one torch thread: the rollouts are the only work here
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        vllm = _import_vllm()
        options: dict[str, Any] = {
            "max_model_len": 2048,
            "seed": 0,
            "enable_prefix_caching": True,  # prompts share system prompts; they count nothing
            # a finished request must never run one more step (it would feed its end token)
            "async_scheduling": False,
            # vLLM 0.32 rewinds a seeded request's generator after a partial prefill, which a
            # CPU generator cannot do: on CPUs, prompts are prefilled whole
            "enable_chunked_prefill": torch.cuda.is_available(),
            **vllm_options,
        }
        self.max_model_len = int(options["max_model_len"])
        self.llm = vllm.LLM(
            model=self.folder,
            tokenizer=self.folder,
            dtype=dtype,
            max_num_seqs=self.max_num_seqs,
            additional_config={CAPTURE_KEY: {"layers": self.layers, "n_layers": int(n_layers)}},
            worker_extension_cls=WORKER_EXTENSION,
            **options,
        )
        self._SamplingParams = vllm.SamplingParams
        info = self.llm.collective_rpc("persona_compass_capture_info")[0]
        if list(info["layers"]) != self.layers:
            raise EngineError(f"vLLM captures layers {info['layers']}, not {self.layers}")

    def _params(self, sampling: SamplingConfig, seed: int, capture_id: str) -> Any:
        greedy = sampling.temperature == 0
        return self._SamplingParams(
            max_tokens=sampling.max_new_tokens + 1,  # the extra step feeds the last kept token
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            seed=seed,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
            extra_args={CAPTURE_KEY: {"id": capture_id}},
        )

    def take(self, ids: Sequence[str]) -> dict[str, tuple[torch.Tensor, int]]:
        """Collect (and free) the sums (n_layers, d_model) and counts of finished requests."""
        return dict(self.llm.collective_rpc("persona_compass_capture_take", args=(list(ids),))[0])

    def stream(self, jobs: Sequence[Job], sampling: SamplingConfig, seed: int) -> Iterator[Rollout]:
        """Run every job; yield each rollout as it finishes (in finishing order)."""
        engine = self.llm.llm_engine
        pending = list(reversed(jobs))
        running: dict[str, tuple[Job, list[int]]] = {}
        window = 2 * self.max_num_seqs  # waiting requests fill a finished one's place at once
        budget, stops = sampling.max_new_tokens, set(self.stop_ids)
        try:
            while pending or running:
                while pending and len(running) < window:
                    job = pending.pop()
                    rendered = render_chat(
                        self.tokenizer, job.messages(), add_generation_prompt=True
                    )
                    prompt = list(rendered.input_ids)
                    if len(prompt) + budget + 1 > self.max_model_len:
                        raise PersonaCompassError(
                            f"{job.id}: a {len(prompt)}-token prompt and {budget} new tokens "
                            f"exceed the vllm engine's max_model_len {self.max_model_len}; lower "
                            "`max_new_tokens`"
                        )
                    cid = uuid.uuid4().hex
                    params = self._params(sampling, job_seed(seed, job.id), cid)
                    engine.add_request(cid, {"prompt_token_ids": prompt}, params)
                    running[cid] = (job, prompt)
                finished = [out for out in engine.step() if out.finished]
                if not finished:
                    continue
                taken = self.take([out.request_id for out in finished])
                for out in finished:
                    job, prompt = running.pop(out.request_id)
                    if out.request_id not in taken:
                        raise EngineError(
                            f"vLLM returned no captured activations for {job.id}: the capture "
                            "op did not run (a stale compile cache?)"
                        )
                    sums, count = taken[out.request_id]
                    content = _truncate(list(out.outputs[0].token_ids), stops, budget)
                    if count != len(content):
                        raise PersonaCompassError(
                            f"{job.id}: vLLM captured {count} tokens for a "
                            f"{len(content)}-token answer"
                        )
                    text = self.tokenizer.decode(content, skip_special_tokens=True).strip()
                    yield Rollout(job, prompt, content, text, sums / max(count, 1), count)
        finally:
            if running:  # interrupted: leave nothing running in the engine
                engine.abort_request(list(running))
                self.take(list(running))

    def batches(
        self, jobs: Sequence[Job], sampling: SamplingConfig, seed: int, size: int
    ) -> Iterator[tuple[list[Job], Outputs]]:
        """Run every job; yield batches of up to ``size`` finished rollouts as
        ``(jobs, (texts, content token counts, means (B, n_layers, D), counts (B,)))``, the
        shape of :func:`.extract.generate_with_capture`'s result."""
        if size < 1:
            raise PersonaCompassError(f"batch size {size} must be at least 1")
        chunk: list[Rollout] = []
        for rollout in self.stream(jobs, sampling, seed):
            chunk.append(rollout)
            if len(chunk) == size:
                yield _outputs(chunk)
                chunk = []
        if chunk:
            yield _outputs(chunk)

    def close(self) -> None:
        """Shut vLLM down and free its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.llm = None
        import gc

        gc.collect()
