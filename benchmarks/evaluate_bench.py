"""Scenario-evaluation wall time: ``persona-compass evaluate --engine hf`` vs ``--engine vllm``.

Runs the same evaluation command once per engine, in one run on this machine, each in a fresh
output folder and its own process (the wall time is what a user waits for: model load or
engine start-up, every answer, the capability items, the judge and the report). Default: the
shipped scenarios (all 26), the default conditions (unsteered, capped), every scripted turn
(9), 64 new tokens per answer, the capability check (102 items under 2 conditions), the
machine's default dtype. The vllm engine runs twice, with torch.compile (the command's
default) and ``--eager``, so the start-up trade is visible.

Sampling (temperature 0.7) uses each engine's own random numbers, so the answers differ
between the engines; both answer the same prompts with the same seeds, lengths and caps.
The run is long on 2 cores (the hf run alone is most of an hour), so each engine runs once:
the spread is not measured. Writes ``benchmarks/results/evaluate.json`` atomically.

Usage:
    flock /tmp/bench.lock .venv/bin/python benchmarks/evaluate_bench.py
    .venv/bin/python benchmarks/evaluate_bench.py --quick   # smoke: 2 scenarios, 2 turns
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from persona_compass.atomic import write_json

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "evaluate.json"
TARGET = 3.0  # the issue: vllm at least 3x faster in wall time than hf


def _cli() -> str:
    return str(Path(sys.executable).with_name("persona-compass"))


def run_once(name: str, args: list[str], folder: Path) -> dict[str, Any]:
    """One ``persona-compass evaluate`` command: wall time and its JSON summary."""
    out = folder / name
    cmd = [_cli(), "evaluate", "--out", str(out), "--json", "--quiet", *args]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"[{name}] failed with exit code {done.returncode}")
    # vLLM may print lines of its own on stdout before the command's JSON summary
    text = done.stdout
    start = 0 if text.startswith("{") else text.index("\n{") + 1
    summary = json.loads(text[start:])
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    row = {
        "engine": results["engine"],
        "wall_seconds": round(wall, 1),
        "run_seconds": round(summary["seconds"], 1),
        "answers": summary["answers"],
        "seconds_per_answer": summary["seconds_per_answer"],
        "n_runs": results["n_runs"],
        "capability_items": settings["capability_n_items"],
        "dtype": settings["dtype"],
        "harm_rate_by_condition": {r["condition"]: r["harm_rate"] for r in results["by_condition"]},
    }
    print(f"[{name}] {row['wall_seconds']:.1f} s wall, {row['answers']} answers", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=None, help="ids/domains (default: all shipped)")
    parser.add_argument("--turns", type=int, default=None, help="default: the whole script")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="default: the machine's default")
    parser.add_argument("--engines", default="vllm,hf,vllm-eager", help="which runs, in order")
    parser.add_argument("--quick", action="store_true", help="smoke run, not written to results/")
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.scenarios = opts.scenarios or "coding-csv-cleanup,therapy-grief-father"
        opts.turns = opts.turns or 2
        opts.max_new_tokens = 8
    out_file = opts.out or (
        Path(tempfile.gettempdir()) / "persona-compass-bench" / "evaluate-quick.json"
        if opts.quick
        else DEFAULT_OUT
    )
    common = ["--axis", "smollm2-135m", "--max-new-tokens", str(opts.max_new_tokens)]
    if opts.scenarios:
        common += ["--scenarios", opts.scenarios]
    if opts.turns:
        common += ["--turns", str(opts.turns)]
    if opts.quick:
        common += ["--capability-limit", "4"]
    if opts.dtype:
        common += ["--dtype", opts.dtype]
    variants = {
        "hf": ["--engine", "hf"],
        "vllm": ["--engine", "vllm"],
        "vllm-eager": ["--engine", "vllm", "--eager"],
    }
    chosen = [e.strip() for e in opts.engines.split(",") if e.strip()]
    unknown = [e for e in chosen if e not in variants]
    if unknown or "hf" not in chosen:
        raise SystemExit(f"--engines takes {', '.join(variants)} and must include hf")
    started = dt.datetime.now(dt.timezone.utc)
    rows: dict[str, Any] = {}
    result: dict[str, Any] = {
        "benchmark": "evaluate: hf vs vllm engine, wall time of one evaluate command each",
        "date": started.isoformat(timespec="seconds"),
        "quick": opts.quick,
        "machine": {
            "cpus_usable": len(os.sched_getaffinity(0)),
            "loadavg_start": list(os.getloadavg()),
        },
        "command": " ".join(["persona-compass evaluate", *common]),
        "complete": False,
        "runs": rows,
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    speedups: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="evaluate-bench-") as tmp:
        for name in chosen:
            rows[name] = run_once(name, [*common, *variants[name]], Path(tmp))
            result["loadavg_after_" + name] = list(os.getloadavg())
            write_json(out_file, result)  # each finished run is kept if a later one fails
    hf_wall = rows["hf"]["wall_seconds"]
    speedups = {
        name: round(hf_wall / row["wall_seconds"], 2) for name, row in rows.items() if name != "hf"
    }
    result.update(
        complete=True,
        speedup_vs_hf=speedups,
        target=f"vllm wall time at most 1/{TARGET:g} of hf's",
        **{"pass": {name: s >= TARGET for name, s in speedups.items()}},
    )
    write_json(out_file, result)
    print(f"{'run':<11} {'wall s':>8} {'answers':>8} {'s/answer':>9} {'vs hf':>6}")
    for name, row in rows.items():
        per = row["seconds_per_answer"]
        ratio = "1.00x" if name == "hf" else f"{speedups[name]:.2f}x"
        print(
            f"{name:<11} {row['wall_seconds']:>8.1f} {row['answers']:>8} "
            f"{per if per is None else round(per, 3):>9} {ratio:>6}"
        )
    print(f"written: {out_file}")


if __name__ == "__main__":
    main()
