"""Per-token calibration for an extraction: a teacher-forced replay on the finished axis.

``axis calibrate`` records per-token projections in the same pass that generates the answers,
because it knows the axis beforehand. An extraction does not: its axis is the difference of
mean activations over *all* rollouts, known only once the last one is in, and keeping every
token's activations until then is what the research's 140-434 GB per model was. So per-token
projections here come from a second, cheap pass after the axis is built: one prefill-only,
teacher-forced forward over a bounded sample of the stored answers, the same rollouts whose
response means calibrate the bundle (each role's ``samples_per_role`` sampled rollouts,
default role included), read on the final axis. That differs from the issue's "same pass": it
costs one prefill per sampled answer (no generation), and the stored answer is re-tokenized,
so its tokens can differ slightly from those generated.

Each role's kept projections (at most :data:`~..token_budget.TOKEN_BUDGET_BYTES` of values per
role) are committed to ``DIR/token_projections/{role}.safetensors`` as soon as the role is
replayed, under a key of the axis and the sample they were read from: a crash resumes with
the next role, and a changed axis (a resumed run with more rollouts, a re-judged run)
replays them again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import Calibration
from ..token_budget import TOKEN_BUDGET_BYTES, keep_rows, tokens_per_answer
from .catalogue import DEFAULT_ROLE
from .store import ExtractionStore, RoleState
from .token_projections import replay_answers

logger = logging.getLogger(__name__)


def replay_key(
    units: Tensor, layers: Sequence[int], ids: Sequence[str], per_answer: int
) -> dict[str, Any]:
    """What a role's replayed projections depend on: the axis rows, the answers, the share."""
    data = units.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return {
        "axis_sha256": hashlib.sha256(data).hexdigest(),
        "layers": [int(x) for x in layers],
        "answers": list(ids),
        "per_answer": int(per_answer),
    }


def replay_role(
    store: ExtractionStore,
    state: RoleState,
    units: Tensor,
    layers: Sequence[int],
    *,
    model: nn.Module,
    tokenizer: Any,
    max_new_tokens: int,
    batch_size: int,
    budget: int = TOKEN_BUDGET_BYTES,
) -> Tensor:
    """The role's kept per-token projections (T, k) on ``units``: committed ones when they
    match, else replayed now and committed."""
    ids = list(state.sample_ids)
    if not ids:
        return torch.zeros(0, len(layers))
    per_answer = tokens_per_answer(len(ids), len(layers), max_new_tokens, budget=budget)
    key = replay_key(units, layers, ids, per_answer)
    rows = store.load_tokens(state.role, key)
    if rows is not None:
        return rows
    conversations = [state.records[rid].conversation() for rid in ids]
    replayed = replay_answers(model, tokenizer, conversations, units, layers, batch_size=batch_size)
    kept = [keep_rows(r, per_answer, max_new_tokens) for r in replayed]
    rows = torch.cat(kept) if kept else torch.zeros(0, len(layers))
    store.save_tokens(state.role, rows, [int(k.shape[0]) for k in kept], key)
    return rows


def token_tables(
    store: ExtractionStore,
    states: Mapping[str, RoleState],
    units: Tensor,
    layers: Sequence[int],
    n_layers: int,
    *,
    model: nn.Module,
    tokenizer: Any,
    max_new_tokens: int,
    batch_size: int,
    budget: int = TOKEN_BUDGET_BYTES,
) -> dict[str, Calibration]:
    """The per-token tables (``roleplay``, ``default``) of a finished extraction.

    Args:
        units: (k, d_model) unit axis on the recorded ``layers``; unrecorded layers of the
            ``n_layers`` get projection 0, as in the response-mean calibration.
        budget: bytes of kept values per role, at most.

    Returns:
        a table per kind that has tokens (none for a kind without sampled answers).
    """
    by_kind: dict[str, list[Tensor]] = {"roleplay": [], "default": []}
    answers = {"roleplay": 0, "default": 0}
    logger.info("replaying the sampled answers on the axis for the per-token calibration")
    for role, state in states.items():
        rows = replay_role(
            store,
            state,
            units,
            layers,
            model=model,
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            budget=budget,
        )
        kind = "default" if role == DEFAULT_ROLE else "roleplay"
        by_kind[kind].append(rows)
        answers[kind] += len(state.sample_ids)
    tables = {}
    index = torch.tensor(list(layers), dtype=torch.long)
    for kind, chunks in by_kind.items():
        rows = torch.cat(chunks) if chunks else torch.zeros(0, len(layers))
        if not rows.shape[0]:
            continue
        full = torch.zeros(rows.shape[0], n_layers)
        full[:, index] = rows
        who = "default" if kind == "default" else "role-play"
        tables[kind] = Calibration.from_projections(
            full,
            source=f"{rows.shape[0]} tokens of {answers[kind]} sampled {who} rollouts, "
            "teacher-forced replay on the final axis",
        )
    return tables
