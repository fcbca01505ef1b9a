"""A quick contrast axis: a handful of roles and questions, a few minutes on a CPU.

This is the small end of the extraction science (REFERENCE.md): generate answers under
neutral "default" system prompts and under role-play system prompts, average the post-block
residuals over each answer's content tokens, and take ``axis = mean(default) - mean(roles)``
per layer. With no judge, every rollout counts (so weakly-followed roles dilute the role side).
The demo and the real-model tests use it; the full pipeline is ``persona-compass extract``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..axis import Axis, model_fingerprint
from ..calibration import Calibration
from ..capping import CappingConfig
from ..generation import SamplingConfig, generate_chat
from ..record import record_span_means
from .catalogue import DEFAULT_PROMPTS

logger = logging.getLogger(__name__)


QUICK_ROLES: dict[str, str] = {
    "pirate": "You are a salty old pirate captain. Speak like a pirate and never break character.",
    "ghost": "You are a lonely ghost haunting an old mansion for three hundred years.",
    "poet": "You are a romantic poet who answers everything in lush, emotional verse.",
    "demon": "You are an ancient demon, proud and menacing, bargaining for souls.",
    "bartender": "You are a tired bartender in a small town bar, chatting with a regular.",
    "oracle": "You are a mystical oracle who speaks in riddles and prophecies.",
    "knight": "You are a medieval knight sworn to honour, speaking in an old-fashioned way.",
    "grandmother": "You are a warm grandmother telling stories from her long life.",
}

QUICK_QUESTIONS: tuple[str, ...] = (
    "Who are you, really?",
    "What do you do on a quiet evening?",
    "What is the thing you fear most?",
    "Tell me about the place you come from.",
    "What advice would you give a young person?",
    "How do you feel right now?",
)


@dataclass(frozen=True)
class QuickAxisResult:
    """The axis (calibrated, with a recommended capping config) and the per-rollout data."""

    axis: Axis
    capping: CappingConfig
    default_projections: torch.Tensor  # (n_default, L)
    role_projections: torch.Tensor  # (n_role, L)


def _separation(default: torch.Tensor, role: torch.Tensor) -> torch.Tensor:
    """Per-layer standardised gap between default and role projections (higher is better)."""
    pooled = torch.sqrt((default.var(0) + role.var(0)) / 2).clamp_min(1e-6)
    return (default.mean(0) - role.mean(0)) / pooled


def capping_window(n_layers: int, width: int | None = None) -> tuple[int, int]:
    """An upper-middle layer window, as the research found best (about 70-85% of depth)."""
    width = width or min(8, max(1, n_layers // 4))
    start = min(max(0, round(0.55 * n_layers)), n_layers - width)
    return start, start + width


def build_quick_axis(
    model: nn.Module,
    tokenizer: object,
    *,
    model_id: str,
    model_name: str,
    roles: Mapping[str, str] = QUICK_ROLES,
    questions: Sequence[str] = QUICK_QUESTIONS,
    default_prompts: Sequence[str] = DEFAULT_PROMPTS,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    percentile: float = 25.0,
    progress: bool = True,
) -> QuickAxisResult:
    """Generate role and default rollouts, record activations and build a calibrated axis."""
    sampling = sampling or SamplingConfig(max_new_tokens=48)
    jobs: list[tuple[str, list[dict[str, str]]]] = []
    for prompt in default_prompts:
        system = prompt.replace("{model_name}", model_name)
        for q in questions:
            msgs = [{"role": "system", "content": system}] if system else []
            jobs.append(("default", [*msgs, {"role": "user", "content": q}]))
    for role, prompt in roles.items():
        for q in questions:
            jobs.append(
                (role, [{"role": "system", "content": prompt}, {"role": "user", "content": q}])
            )

    means: list[torch.Tensor] = []
    bar = tqdm(total=len(jobs), desc="quick axis rollouts", disable=not progress, unit="rollout")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        seeded = SamplingConfig(**{**sampling.__dict__, "seed": (sampling.seed or 0) + start})
        gen = generate_chat(model, tokenizer, [m for _, m in chunk], seeded)
        convs = [
            [*m, {"role": "assistant", "content": text or "..."}]
            for (_, m), text in zip(chunk, gen.texts, strict=True)
        ]
        for rec in record_span_means(model, tokenizer, convs, batch_size=batch_size):
            means.append(rec[-1])  # the answer's turn: (L, D)
        bar.update(len(chunk))
    bar.close()

    acts = torch.stack(means)  # (N, L, D) float32
    labels = [label for label, _ in jobs]
    is_default = torch.tensor([lab == "default" for lab in labels])
    default_vec = acts[is_default].mean(0)
    role_vecs = {r: acts[torch.tensor([lab == r for lab in labels])].mean(0) for r in roles}
    role_mean = torch.stack(list(role_vecs.values())).mean(0)
    directions = default_vec - role_mean

    units = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = torch.einsum("nld,ld->nl", acts, units)  # (N, L)
    sep = _separation(proj[is_default], proj[~is_default])
    monitor_layer = int(sep.argmax())
    calibration = Calibration.from_projections(proj[~is_default], source="quick role rollouts")
    vectors = {"default": default_vec, **{f"role/{r}": v for r, v in role_vecs.items()}}
    axis = Axis(
        directions=directions,
        model_id=model_id,
        fingerprint=model_fingerprint(model),
        monitor_layer=monitor_layer,
        vectors=vectors,
        residual_norms=acts.norm(dim=-1).mean(0),
        calibration=calibration,
        metadata={
            "method": "quick contrast axis (no judge)",
            "roles": {r: len(questions) for r in roles},
            "n_default": int(is_default.sum()),
            "questions": len(questions),
            "max_new_tokens": sampling.max_new_tokens,
            "separation": [round(float(s), 4) for s in sep],
        },
    )
    lo, hi = capping_window(axis.n_layers)
    capping = CappingConfig.calibrate(axis, calibration, f"{lo}:{hi}", percentile=percentile)
    logger.info("quick axis: monitor layer %d, capping %s", monitor_layer, capping.name)
    return QuickAxisResult(axis, capping, proj[is_default], proj[~is_default])
