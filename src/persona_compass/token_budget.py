"""How many per-token projections a calibration keeps, and which ones.

Per-token calibration (:attr:`persona_compass.Calibration.tokens`) needs the projections of
individual answer tokens, not only each answer's mean. Every stored token costs one float32
per layer, so a run keeps at most :data:`TOKEN_BUDGET_BYTES` of them per role: each answer
keeps the same share of its tokens (``per_answer`` of ``max_new_tokens``, rounded up), spread
evenly over the answer. The same share everywhere keeps the mix per token honest: a long
answer still contributes more tokens than a short one, as it does to the tokens capping acts on.
"""

from __future__ import annotations

import torch

TOKEN_BUDGET_BYTES = 1_000_000
"""Per-token projections stored per role (float32 values, all layers), at most."""

BYTES_PER_VALUE = 4  # float32


class TokenBudgetError(ValueError):
    """A run too large to keep even one token per answer within the budget."""


def tokens_per_answer(
    n_answers: int,
    n_layers: int,
    max_new_tokens: int,
    *,
    budget: int = TOKEN_BUDGET_BYTES,
) -> int:
    """The most tokens one answer of a role with ``n_answers`` answers may keep.

    Never more than ``max_new_tokens`` (an answer has no more), at least 1.

    Raises:
        TokenBudgetError: ``n_answers`` answers of one token each already exceed the budget.
    """
    if min(n_answers, n_layers, max_new_tokens) < 1:
        raise TokenBudgetError(
            f"n_answers={n_answers}, n_layers={n_layers} and max_new_tokens={max_new_tokens} "
            "must all be at least 1"
        )
    fits = budget // (n_answers * n_layers * BYTES_PER_VALUE)
    if fits < 1:
        raise TokenBudgetError(
            f"{n_answers} answers per role x {n_layers} layers do not fit one token each in "
            f"{budget} bytes; calibrate on fewer answers per role (fewer prompts or questions)"
        )
    return min(int(fits), int(max_new_tokens))


def kept_count(n_tokens: int, per_answer: int, max_new_tokens: int) -> int:
    """Tokens an answer of ``n_tokens`` keeps: the share ``per_answer / max_new_tokens`` of
    them, rounded up, and never more than ``per_answer`` (a re-tokenized answer may be
    longer than ``max_new_tokens``); every answer with content keeps at least one."""
    if n_tokens <= 0:
        return 0
    share = -(-n_tokens * per_answer // max_new_tokens)  # ceil without floats
    return min(n_tokens, per_answer, share)


def kept_positions(n_tokens: int, keep: int) -> torch.Tensor:
    """``keep`` evenly spread positions of an answer of ``n_tokens`` (all when keep >= n).

    Position ``j`` is the middle of the ``j``-th of ``keep`` equal parts, so the picks are
    distinct and cover the answer from start to end.
    """
    if keep >= n_tokens:
        return torch.arange(max(n_tokens, 0))
    j = torch.arange(keep)
    return (2 * j + 1) * n_tokens // (2 * keep)


def keep_rows(rows: torch.Tensor, per_answer: int, max_new_tokens: int) -> torch.Tensor:
    """The kept rows of one answer's (n_tokens, n_layers) projections."""
    n = int(rows.shape[0])
    return rows[kept_positions(n, kept_count(n, per_answer, max_new_tokens))]
