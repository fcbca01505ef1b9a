"""Extraction rollouts/s of the two engines in one run: ``--engine hf`` vs ``--engine vllm``.

Both engines generate the same role-play jobs (the shipped catalogue) with the extraction's
sampling settings and capture the per-layer mean activations of every answer in the same
pass: hf with ``generate_with_capture`` in batches of ``--batch`` (as ``extract`` does), vllm
with :class:`~persona_compass.persona_space.vllm_rollouts.VLLMRollouts` (continuous
batching, sums kept in the engine). Startup is not timed. Rounds alternate hf, vllm, hf, ...
(A/B/A), medians and spreads go to ``benchmarks/results/extract-engines.json`` (atomic).

Usage:
    flock /tmp/bench.lock .venv/bin/python benchmarks/extract_engines_bench.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path

import torch
from common import machine_info

from persona_compass.atomic import write_json
from persona_compass.generation import eos_ids
from persona_compass.models import load_model
from persona_compass.persona_space.catalogue import DEFAULT_ROLE, load_catalogue
from persona_compass.persona_space.extract import (
    ExtractSettings,
    generate_with_capture,
    plan_jobs,
)
from persona_compass.persona_space.vllm_rollouts import VLLMRollouts

HERE = Path(__file__).resolve().parent
TARGET = 2.0  # the issue's target: vllm rollouts/s >= 2x hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--jobs", type=int, default=64, help="rollouts per round")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="hf batch (the quick preset's)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="hf rounds; vllm gets one fewer")
    p.add_argument("--out", type=Path, default=HERE / "results" / "extract-engines.json")
    args = p.parse_args()
    settings = ExtractSettings.from_preset(args.model, "quick", max_new_tokens=args.new_tokens)
    sampling = settings.sampling()
    cat = load_catalogue().select(roles=16, prompts_per_role=2, questions=4)
    jobs = [j for j in plan_jobs(cat, "SmolLM2") if j.role != DEFAULT_ROLE][: args.jobs]
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    n_layers = model.config.num_hidden_layers
    t0 = time.perf_counter()
    engine = VLLMRollouts(
        args.model,
        tok,
        eos_ids(model, tok),
        layers=list(range(n_layers)),
        n_layers=n_layers,
        dtype=args.dtype,
        enforce_eager=True,
        max_num_seqs=args.max_num_seqs,
    )
    startup = time.perf_counter() - t0

    def hf() -> tuple[float, int]:
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(jobs), args.batch):
            _, n, _, _ = generate_with_capture(model, tok, jobs[i : i + args.batch], sampling, i)
            tokens += sum(n)
        return time.perf_counter() - start, tokens

    def vllm() -> tuple[float, int]:
        start, tokens = time.perf_counter(), 0
        for _, (_, n, _, _) in engine.batches(jobs, sampling, 0, args.batch):
            tokens += sum(n)
        return time.perf_counter() - start, tokens

    runs: dict[str, list[dict[str, float]]] = {"hf": [], "vllm": []}
    order = ["hf", "vllm"] * args.rounds
    for name in order[:-1]:  # hf, vllm, hf, ..., hf
        secs, tokens = (hf if name == "hf" else vllm)()
        row = {"seconds": secs, "rollouts_per_s": len(jobs) / secs, "tokens": tokens}
        runs[name].append(row)
        print(f"{name:>5}: {secs:7.2f} s  {row['rollouts_per_s']:.3f} rollouts/s  {tokens} tok")
    med = {k: statistics.median(r["rollouts_per_s"] for r in v) for k, v in runs.items()}
    spread = {
        k: [min(r["rollouts_per_s"] for r in v), max(r["rollouts_per_s"] for r in v)]
        for k, v in runs.items()
    }
    ratio = med["vllm"] / med["hf"]
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.dtype),
        "torch_threads": torch.get_num_threads(),
        "settings": {**vars(args), "out": str(args.out), "temperature": sampling.temperature},
        "vllm_startup_seconds": startup,
        "runs": runs,
        "median_rollouts_per_s": med,
        "spread_rollouts_per_s": spread,
        "ratio_vllm_over_hf": ratio,
        "target": TARGET,
        "pass": ratio >= TARGET,
    }
    write_json(args.out, result)
    print(
        f"median rollouts/s: hf {med['hf']:.3f} "
        f"(spread {spread['hf'][0]:.3f}-{spread['hf'][1]:.3f}),"
        f" vllm {med['vllm']:.3f} (spread {spread['vllm'][0]:.3f}-{spread['vllm'][1]:.3f}); "
        f"vllm/hf {ratio:.2f}x ({'PASS' if ratio >= TARGET else 'FAIL'} vs {TARGET}x)"
    )
    engine.close()


if __name__ == "__main__":
    main()
