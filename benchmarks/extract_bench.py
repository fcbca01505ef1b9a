"""Extraction-throughput benchmark: single-pass capture vs generate-then-re-forward.

Measures rollouts per second of the persona-vector extraction's inner step on
SmolLM2-135M-Instruct (bf16 by default): a fixed batch of 16 role-play rollouts (4 roles x
2 system prompts x 2 questions from the shipped catalogue), sampled with the extraction's
settings (temperature 0.7, top_p 0.9, repetition penalty 1.1, end-of-turn on), for two variants:

  single    ``persona_space.extract.generate_with_capture``: the answer's mean activations are
            captured while ``generate`` runs (it generates ``new_tokens + 1`` and keeps
            ``new_tokens``, so the last kept token is captured too);
  two-pass  the research-style baseline: ``generation.generate_chat`` (plain ``generate``),
            then ``record.record_span_means`` over the finished conversations (a teacher-forced
            re-forward of prompt + answer); both timed together.

Both variants use the same seed, so they sample the same answers. After one untimed warm-up
run of each variant, the variants are interleaved for ``--rounds`` rounds (the order
alternating each round) at each ``--new-tokens`` length; the first round's outputs are
checked (same texts in both variants, activations that agree). The two-pass time is also split
into its generate and re-forward parts, which gives the ceiling (two-pass time / its generate
time: the ratio a free capture would reach) and the capture's cost over plain generate.
Medians, spreads, the single/two-pass ratio (of medians and per round) and PASS/FAIL against
the issue's 1.2x target go to ``benchmarks/results/extract.json`` (written atomically) and a
table is printed. Nothing is asserted.

Usage:
    .venv/bin/python benchmarks/extract_bench.py            # full run (~3-5 minutes on 2 cores)
    .venv/bin/python benchmarks/extract_bench.py --quick    # smoke run (numbers meaningless)
    .venv/bin/python benchmarks/run.py --only extract       # the same, through make bench's driver
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, compare, fmt_spread, machine_info, summary

from persona_compass.atomic import write_json
from persona_compass.generation import SamplingConfig, generate_chat
from persona_compass.models import load_model
from persona_compass.persona_space.catalogue import DEFAULT_ROLE, load_catalogue
from persona_compass.persona_space.extract import Job, generate_with_capture, plan_jobs
from persona_compass.record import record_span_means

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "extract.json"
QUICK_OUT = HERE / "results" / "extract-quick.json"  # a smoke run never overwrites real results

VARIANTS: dict[str, str] = {
    "single": "single-pass capture (generate_with_capture)",
    "two_pass": "two-pass: generate_chat, then record_span_means",
}
TARGET_RATIO = 1.2  # the target: single-pass rollouts/s >= 1.2x the two-pass baseline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model alias or path for load_model")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument(
        "--new-tokens",
        type=int,
        nargs="+",
        default=[64, 128],
        help="answer budgets (max_new_tokens) to measure, one block of rounds each",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant and length")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per variant (first length only)"
    )
    p.add_argument("--batch", type=int, default=16, help="rollouts per batch")
    p.add_argument("--roles", type=int, default=4, help="catalogue roles to draw jobs from")
    p.add_argument("--prompts-per-role", type=int, default=2)
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same in both variants)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default results/extract.json, or results/extract-quick.json with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 new tokens, 2 rounds, 1 warm-up (numbers are not meaningful)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds, args.warmup = [8], 2, 1
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.rounds < 1 or args.batch < 1 or min(args.new_tokens) < 1 or args.warmup < 0:
        p.error("--rounds, --batch and --new-tokens must be positive, --warmup >= 0")
    return args


def plan_batch(model_name: str, args: Any) -> list[Job]:
    """The first ``--batch`` role-play (non-default) jobs of a small catalogue selection."""
    cat = load_catalogue().select(
        roles=args.roles, prompts_per_role=args.prompts_per_role, questions=args.questions
    )
    jobs = [j for j in plan_jobs(cat, model_name) if j.role != DEFAULT_ROLE]
    if len(jobs) < args.batch:
        raise SystemExit(
            f"the selection gives {len(jobs)} role-play jobs, fewer than --batch {args.batch}; "
            "raise --roles, --prompts-per-role or --questions"
        )
    return jobs[: args.batch]


def run_single(
    model: Any, tok: Any, batch: Sequence[Job], sampling: SamplingConfig, seed: int
) -> tuple[float, dict[str, Any]]:
    """One timed single-pass batch: (seconds, outputs)."""
    start = time.perf_counter()
    texts, n_tokens, means, counts = generate_with_capture(model, tok, batch, sampling, seed)
    secs = time.perf_counter() - start
    return secs, {"texts": texts, "n_tokens": n_tokens, "means": means}


def run_two_pass(
    model: Any, tok: Any, batch: Sequence[Job], sampling: SamplingConfig
) -> tuple[float, dict[str, Any]]:
    """One timed two-pass batch: (seconds, outputs incl. the generate / re-forward split)."""
    start = time.perf_counter()
    gen = generate_chat(model, tok, [job.messages() for job in batch], sampling)
    mid = time.perf_counter()
    convs = [
        [*job.messages(), {"role": "assistant", "content": text}]
        for job, text in zip(batch, gen.texts, strict=True)
    ]
    recorded = record_span_means(model, tok, convs, batch_size=len(convs))
    end = time.perf_counter()
    means = torch.stack([r[-1] for r in recorded])
    return end - start, {
        "texts": gen.texts,
        "n_tokens": [len(ids) for ids in gen.new_ids],
        "means": means,
        "generate_seconds": mid - start,
        "reforward_seconds": end - mid,
    }


def activation_agreement(a: torch.Tensor, b: torch.Tensor, n_tokens: Sequence[int]) -> float:
    """Minimum cosine over rows with an answer and over layers of two (B, L, D) mean tensors."""
    rows = [i for i, n in enumerate(n_tokens) if n > 0]
    if not rows:
        return float("nan")
    cos = torch.nn.functional.cosine_similarity(a[rows].float(), b[rows].float(), dim=-1)
    return float(cos.min())


def bench_length(
    model: Any, tok: Any, batch: Sequence[Job], new_tokens: int, args: Any
) -> dict[str, Any]:
    sampling = SamplingConfig(max_new_tokens=new_tokens, seed=args.seed)
    n = len(batch)

    def run(v: str) -> tuple[float, dict[str, Any]]:
        if v == "single":
            return run_single(model, tok, batch, sampling, args.seed)
        return run_two_pass(model, tok, batch, sampling)

    first: dict[str, dict[str, Any]] = {}  # each variant's outputs in the first round
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    gen_s: list[float] = []
    refwd_s: list[float] = []
    same_texts_every_round = {v: True for v in VARIANTS}
    loadavg: list[float] = []
    order = list(VARIANTS)
    for rnd in range(args.rounds):
        for v in order if rnd % 2 == 0 else order[::-1]:
            secs, out = run(v)
            seconds[v].append(secs)
            first.setdefault(v, out)
            same_texts_every_round[v] &= out["texts"] == first[v]["texts"]
            if v == "two_pass":
                gen_s.append(out["generate_seconds"])
                refwd_s.append(out["reforward_seconds"])
        loadavg.append(os.getloadavg()[0])
        line = "  ".join(f"{v}={n / seconds[v][-1]:5.2f}" for v in order)
        print(
            f"  {new_tokens} tokens round {rnd + 1}/{args.rounds}: rollouts/s {line}  "
            f"(load {loadavg[-1]:.2f})",
            flush=True,
        )

    rps = compare({v: [n / s for s in seconds[v]] for v in VARIANTS}, "two_pass")
    ratio = rps["single"]["ratio_of_medians"]
    paired = rps["single"]["paired_ratio"]["median"]
    single_out, two_out = first["single"], first["two_pass"]
    agree = [a == b for a, b in zip(single_out["texts"], two_out["texts"], strict=True)]
    two_total = statistics.median(seconds["two_pass"])
    # Per round: what a free capture would reach, and what the capture costs over generate.
    ceiling = [t / g for t, g in zip(seconds["two_pass"], gen_s, strict=True)]
    overhead = [s / g - 1 for s, g in zip(seconds["single"], gen_s, strict=True)]
    return {
        "new_tokens": new_tokens,
        "rollouts_per_batch": n,
        "answer_tokens": {
            "per_rollout": single_out["n_tokens"],
            "mean": statistics.mean(single_out["n_tokens"]),
            "hit_budget": sum(t >= new_tokens for t in single_out["n_tokens"]),
        },
        "seconds_raw": seconds,
        "two_pass_split": {
            "generate_seconds_raw": gen_s,
            "reforward_seconds_raw": refwd_s,
            "generate_median_s": statistics.median(gen_s),
            "reforward_median_s": statistics.median(refwd_s),
            "reforward_share_of_median_total": statistics.median(refwd_s) / two_total,
            "ceiling_ratio": summary(ceiling),
            "ceiling_ratio_raw": ceiling,
            "ceiling_note": (
                "per round, two-pass seconds / its generate seconds: the single/two-pass ratio "
                "a capture costing nothing over plain generate would reach"
            ),
            "single_over_generate": summary(overhead),
            "single_over_generate_raw": overhead,
            "single_over_generate_note": (
                "per round, single-pass seconds / two-pass generate seconds - 1: the cost of "
                "capturing (hooks on every block, one extra decode step) over plain generate"
            ),
        },
        "rollouts_per_s": rps,
        "loadavg_per_round": loadavg,
        "target": {
            "target": f"single / two_pass rollouts/s >= {TARGET_RATIO}",
            "ratio_of_medians": ratio,
            "paired_ratio_median": paired,
            "pass": ratio >= TARGET_RATIO,
        },
        "sanity": {
            "same_texts_every_round": same_texts_every_round,
            "texts_identical_across_variants": sum(agree),
            "answer_token_counts_identical": single_out["n_tokens"] == two_out["n_tokens"],
            "activation_min_cosine_single_vs_two_pass": activation_agreement(
                single_out["means"], two_out["means"], single_out["n_tokens"]
            ),
            "sample_text_row0": single_out["texts"][0],
        },
    }


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    st = result["settings"]
    print()
    print(
        f"{st['model']} {m['dtype']}, {st['rollouts_per_batch']} rollouts/batch "
        f"({st['jobs']}), sampled T={st['temperature']} top_p={st['top_p']} seed {st['seed']}, "
        f"eos on; {m['cpus_usable']} CPUs, torch {m['torch']} ({m['torch_threads']} threads); "
        f"{st['rounds']} interleaved rounds"
    )
    print(
        "rollouts/s = batch / wall time of the batch (median of rounds, [min-max]); ratio = "
        "median / median of two-pass, paired = per-round ratio [min-max];\n"
        "gen s / re-fwd s = two-pass generate and re-forward seconds (medians); answer = mean "
        "answer tokens (rows that hit the budget);\nceiling = two-pass time / its generate time "
        "(the ratio a free capture would reach), capture = single-pass time over plain generate "
        "(per-round medians)"
    )
    head = (
        f"{'new tok':>7}  {'variant':<48} {'rollouts/s':>10} {'[min-max]':>13} {'ratio':>6} "
        f"{'paired [min-max]':>20} {'gen s':>6} {'re-fwd s':>8} {'answer':>11}  target"
    )
    print(head)
    print("-" * len(head))
    verdict = {True: "PASS", False: "FAIL"}
    for res in result["results"]:
        split = res["two_pass_split"]
        ans = res["answer_tokens"]
        ans_txt = f"{ans['mean']:.0f} ({ans['hit_budget']}/{res['rollouts_per_batch']})"
        for v in VARIANTS:
            e = res["rollouts_per_s"][v]
            p = e["paired_ratio"]
            paired_txt = f"{p['median']:.3f} {fmt_spread(p, 2)}"
            gen = f"{split['generate_median_s']:.2f}" if v == "two_pass" else ""
            ref = f"{split['reforward_median_s']:.2f}" if v == "two_pass" else ""
            target = verdict[res["target"]["pass"]] if v == "single" else ""
            line = (
                f"{res['new_tokens']:>7}  {VARIANTS[v]:<48} {e['median']:>10.2f} "
                f"{fmt_spread(e, 2):>13} {e['ratio_of_medians']:>6.3f} {paired_txt:>20} "
                f"{gen:>6} {ref:>8} {ans_txt if v == 'single' else '':>11}  {target}"
            )
            print(line.rstrip())
        s = res["sanity"]
        print(
            f"{'':>9}same answers in both variants: {s['texts_identical_across_variants']}/"
            f"{res['rollouts_per_batch']}; min activation cosine single vs two-pass "
            f"{s['activation_min_cosine_single_vs_two_pass']:.4f}; re-forward = "
            f"{split['reforward_share_of_median_total']:.1%} of two-pass time; ceiling "
            f"{split['ceiling_ratio']['median']:.3f} {fmt_spread(split['ceiling_ratio'], 2)}; "
            f"capture +{split['single_over_generate']['median']:.1%} over plain generate"
        )
    print(f"target: single / two-pass rollouts/s >= {TARGET_RATIO} (ratio of medians)")
    if m["busy_at_start"]:
        print(
            "note: the 1-minute load average was above 1 before the benchmark started: other "
            "processes shared the CPUs and the numbers are noisier than usual"
        )
    print(
        f"wall {result['wall_seconds']:.0f} s; load average start {m['loadavg_start'][0]:.2f}, "
        f"end {m['loadavg_end'][0]:.2f}; written to {result['output_path']}"
    )


def main(argv: list[str] | None = None, *, model: Any = None, tokenizer: Any = None) -> int:
    """Run the benchmark; ``model``/``tokenizer`` skip loading (``run.py`` passes its own)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    info = machine_info(args.dtype)
    load_s: float | None = None
    if model is None or tokenizer is None:
        print(f"loading {args.model} ({args.dtype}) ...", flush=True)
        t0 = time.perf_counter()
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
        load_s = time.perf_counter() - t0
    model.eval()

    batch = plan_batch(args.model, args)
    if args.warmup:
        print(f"extract: {args.warmup} untimed warm-up run(s) per variant ...", flush=True)
        sampling = SamplingConfig(max_new_tokens=args.new_tokens[0], seed=args.seed)
        for _ in range(args.warmup):
            run_single(model, tokenizer, batch, sampling, args.seed)
            run_two_pass(model, tokenizer, batch, sampling)
    results = []
    for new_tokens in args.new_tokens:
        print(
            f"extract, {new_tokens} new tokens: {args.rounds} interleaved rounds of "
            f"{len(batch)} rollouts ...",
            flush=True,
        )
        results.append(bench_length(model, tokenizer, batch, new_tokens, args))

    info["loadavg_end"] = list(os.getloadavg())
    info["busy_at_start"] = info["loadavg_start"][0] > 1.0
    sampling = SamplingConfig(seed=args.seed)
    out_path: Path = args.out
    result = {
        "benchmark": "extraction rollouts/s: single-pass capture vs generate + re-forward",
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "settings": {
            "model": args.model,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "warmup_runs": args.warmup,
            "warmup_note": "untimed runs of each variant before the first length only",
            "quick": args.quick,
            "rollouts_per_batch": len(batch),
            "jobs": (
                f"first {len(batch)} role-play jobs of load_catalogue().select(roles="
                f"{args.roles}, prompts_per_role={args.prompts_per_role}, questions="
                f"{args.questions})"
            ),
            "job_ids": [job.id for job in batch],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "repetition_penalty": sampling.repetition_penalty,
            "seed": args.seed,
            "decoding": (
                "sampled, end-of-turn on (rows stop early); same seed in both variants and "
                "every round, so both sample the same answers every time"
            ),
            "timing": (
                "wall time of one variant call for the whole batch (rendering, generate, "
                "decoding the texts, and for two-pass the re-forward); variants interleaved, "
                "order alternating per round; rollouts/s = batch / seconds"
            ),
            "variants": VARIANTS,
            "target": f"single / two_pass >= {TARGET_RATIO}",
        },
        "load_seconds": load_s,
        "results": results,
        "wall_seconds": time.perf_counter() - t_start,
        "output_path": str(out_path),
    }
    write_json(out_path, result)
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
