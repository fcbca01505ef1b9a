"""``axis calibrate --engine vllm``: rollouts whose per-token projections are captured in vLLM.

:class:`TokenRollouts` is the extraction's :class:`~..persona_space.vllm_rollouts.VLLMRollouts`
with the capture's per-token projections switched on (:mod:`..engines.vllm_capture`): the
axis is known before generation, so every counted token's projection on every layer's unit
axis is written on the device in the same pass that sums the response means, and only each
answer's kept share of tokens (:mod:`..token_budget`) comes back.

The rollouts hand over their captures by vLLM request id inside ``stream``; a rollout comes
out right after its request's capture was taken, in the same order, so the kept tokens of
the ``i``-th rollout are those of the ``i``-th id taken. Every answer's token count is checked
against that pairing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..engines.base import EngineError
from ..generation import SamplingConfig
from ..persona_space.extract import Job
from ..persona_space.vllm_rollouts import Rollout, VLLMRollouts
from ..token_budget import kept_count

Outputs = tuple[list[str], list[int], Tensor, Tensor, list[Tensor | None]]


class TokenRollouts(VLLMRollouts):
    """VLLMRollouts that also capture each answer's kept per-token projections on ``units``.

    Args:
        units: (n_layers, d_model) unit axis, one row per recorded layer (all layers).
        per_answer: the most tokens an answer keeps (:func:`..token_budget.tokens_per_answer`).
        max_new_tokens: the run's token budget per answer (the share kept is
            ``per_answer / max_new_tokens``).
        *args, **kwargs: as for :class:`VLLMRollouts`; ``enforce_eager`` must hold on GPUs.
    """

    def __init__(
        self, *args: Any, units: Tensor, per_answer: int, max_new_tokens: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.per_answer, self.max_new_tokens = int(per_answer), int(max_new_tokens)
        self._order: deque[str] = deque()
        self._tokens: dict[str, Tensor] = {}
        try:
            self.llm.collective_rpc(
                "persona_compass_capture_project",
                args=(units.to(torch.float32), max_new_tokens + 1, per_answer, max_new_tokens),
            )
        except BaseException:
            self.close()
            raise

    def take(self, ids: Sequence[str]) -> dict[str, tuple[Tensor, int]]:
        out = super().take(ids)
        tokens = self.llm.collective_rpc("persona_compass_capture_take_tokens", args=(list(ids),))
        self._tokens.update(tokens[0])
        self._order.extend(ids)
        return out

    def stream_tokens(
        self, jobs: Sequence[Job], sampling: SamplingConfig, seed: int
    ) -> Iterator[tuple[Rollout, Tensor]]:
        """:meth:`stream`, each rollout with its kept per-token projections (n_kept, L)."""
        for rollout in self.stream(jobs, sampling, seed):
            cid = self._order.popleft()
            rows = self._tokens.pop(cid, None)
            expected = kept_count(rollout.count, self.per_answer, self.max_new_tokens)
            if rows is None or rows.shape[0] != expected:
                got = None if rows is None else rows.shape[0]
                raise EngineError(
                    f"{rollout.job.id}: vLLM returned {got} per-token projections for a "
                    f"{rollout.count}-token answer, expected {expected}"
                )
            yield rollout, rows

    def batches_with_tokens(
        self, jobs: Sequence[Job], sampling: SamplingConfig, seed: int, size: int
    ) -> Iterator[tuple[list[Job], Outputs]]:
        """Batches of up to ``size`` finished rollouts, as :meth:`batches` gives them plus
        each answer's kept per-token projections."""
        chunk: list[tuple[Rollout, Tensor]] = []
        for item in self.stream_tokens(jobs, sampling, seed):
            chunk.append(item)
            if len(chunk) == size:
                yield _with_tokens(chunk)
                chunk = []
        if chunk:
            yield _with_tokens(chunk)


def _with_tokens(chunk: Sequence[tuple[Rollout, Tensor]]) -> tuple[list[Job], Outputs]:
    return [r.job for r, _ in chunk], (
        [r.text for r, _ in chunk],
        [len(r.content_ids) for r, _ in chunk],
        torch.stack([r.means for r, _ in chunk]),
        torch.tensor([r.count for r, _ in chunk]),
        [rows for _, rows in chunk],
    )
