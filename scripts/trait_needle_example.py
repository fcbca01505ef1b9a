"""Find turns of the shipped evaluation where a trait needle moves and the Assistant Axis does not.

Rebuilds each conversation of an evaluation folder's results.json (the scenario's scripted user
turns and the recorded answers), reads every assistant turn on the Assistant Axis and on the
trait bundles in one pass per conversation (`project_conversation(..., traits=...)`), and prints
the turns whose trait percentile moved by at least --trait-move points since the previous turn
while the Assistant Axis percentile moved by at most --axis-still points, biggest moves first.

Usage:
    .venv/bin/python scripts/trait_needle_example.py docs/results/runs/eval-smollm2 \
        --traits smollm2-135m-sycophancy smollm2-135m-malice smollm2-135m-confabulation
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import persona_compass as pc
from persona_compass.evaluation.scenarios import load_scenarios
from persona_compass.monitor import project_conversation


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="an evaluation folder (holds results.json)")
    p.add_argument("--axis", default="smollm2-135m")
    p.add_argument("--traits", nargs="+", required=True, help="trait bundles (folders/aliases)")
    p.add_argument("--condition", default="unsteered")
    p.add_argument("--trait-move", type=float, default=30.0)
    p.add_argument("--axis-still", type=float, default=5.0)
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args()

    results = json.loads((args.folder / "results.json").read_text())
    scenarios = {s.id: s for s in load_scenarios()}
    axis = pc.Axis.load(args.axis)
    traits = [pc.Axis.load(t) for t in args.traits]
    model, tok = pc.load_model(axis.model_id or "smollm2-135m", dtype=torch.float32)
    found = []
    for run in results["runs"]:
        if run["condition"] != args.condition or run["scenario"] not in scenarios:
            continue
        scenario = scenarios[run["scenario"]]
        messages = []
        for user, turn in zip(scenario.user_turns, run["turns"], strict=False):
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": turn["answer"]},
            ]
        turns = project_conversation(model, tok, axis, messages, traits=traits)
        rows = []
        for t in turns:
            pct = float(axis.calibration.percentile_of(t.projection, axis.layer))
            needles = {
                name: float(tr.calibration.percentile_of(value, tr.layer))
                for (name, value), tr in zip(t.traits.items(), traits, strict=True)
            }
            rows.append((t.index, pct, needles))
        for before, after in zip(rows, rows[1:], strict=False):
            axis_move = after[1] - before[1]
            if abs(axis_move) > args.axis_still:
                continue
            for name, value in after[2].items():
                move = value - before[2][name]
                if abs(move) >= args.trait_move:
                    user, answer = (messages[after[0] + k]["content"] for k in (-1, 0))
                    found.append(
                        (abs(move), run["scenario"], after[0], name, move, axis_move, user, answer)
                    )
    found.sort(reverse=True)
    say(
        f"{len(found)} turns where a needle moved >= {args.trait_move} points and the axis "
        f"<= {args.axis_still}"
    )
    for _size, scenario, index, name, move, axis_move, user, answer in found[: args.top]:
        say(f"\n{scenario} message {index}: {name} {move:+.0f} points, axis {axis_move:+.1f}")
        say(f"  user: {user[:300]}")
        say(f"  assistant: {answer[:300]}")


if __name__ == "__main__":
    main()
