"""Benchmarks: decode throughput with capping/monitoring, then extraction rollouts/s.

Part 1 (decode) runs SmolLM2-135M-Instruct (bf16 by default), greedy, a fixed number of new
tokens with end-of-sequence disabled, at batch 1 and batch 8 (left-padded), for five variants:

  (a) plain ``model.generate``;
  (b) ``persona_compass`` capping on 8 blocks (16..23), thresholds calibrated so caps engage;
  (c) (b) plus a ``DriftMonitor`` recording every token's projection on the device;
  (d) a reference-style implementation (benchmarks/decode.py): plain hooks that re-normalise
      the vector every call, plus a monitor that calls ``.item()`` every step;
  (e) ``persona_compass.DriftMonitor`` alone (no capping): the live-monitor overhead, reported
      as the ratio (e)/(a) against its own target (>= 0.98);
  (f) (e) with three trait needles (random trait axes at the monitor layer and 4 blocks
      either side): the cost of the needles, reported as (f)/(e) against its target (>= 0.99).

Warm-up runs first, then the variants are interleaved round-robin (rotating the order each
round) for N repeats; medians, spreads and ratios to (a) go to
``benchmarks/results/decode.json`` (written atomically) and a table is printed. A ``--quick``
smoke run never writes into ``benchmarks/results/``: its JSON goes to the system temporary
folder (``$TMPDIR/persona-compass-bench/``) unless ``--out`` names a file.

Part 2 (extract, benchmarks/extract_bench.py) then measures rollouts/s of single-pass
activation capture against a two-pass baseline (generate, then re-forward) on the same model,
written to ``benchmarks/results/extract.json``. ``--only decode|extract`` runs one part.

Usage:
    .venv/bin/python benchmarks/run.py                  # both parts (several minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick          # smoke run of both (about a minute)
    .venv/bin/python benchmarks/run.py --only decode    # just the decode part
    .venv/bin/python benchmarks/run.py --only extract   # just the extraction part
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, compare, fmt_spread, machine_info
from decode import (
    EngagementCounter,
    PassthroughModel,
    ReferenceCapping,
    ReferenceMonitor,
    StepClock,
    benchmark_batch,
    contrast_directions,
    generate_kwargs,
    generated_projections,
    percentile_thresholds,
    timed_generate,
)
from extract_bench import main as extract_main

from persona_compass.atomic import write_json
from persona_compass.axis import Axis, model_fingerprint
from persona_compass.capping import CappingConfig
from persona_compass.interventions import capping
from persona_compass.layers import find_decoder_blocks, parse_layer_spec
from persona_compass.models import load_model
from persona_compass.monitor import DriftMonitor

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "decode.json"
# A smoke run never writes into results/ (not even the git-ignored *-quick.json files there).
QUICK_DIR = Path(tempfile.gettempdir()) / "persona-compass-bench"
QUICK_OUT = QUICK_DIR / "decode-quick.json"
QUICK_EXTRACT_OUT = QUICK_DIR / "extract-quick.json"

VARIANTS: dict[str, str] = {
    "a": "plain generate",
    "b": "capping (persona_compass)",
    "c": "capping + DriftMonitor",
    "d": "reference-style hooks + .item() monitor",
    "e": "DriftMonitor only (live-monitor overhead)",
    "f": "DriftMonitor + 3 trait needles",
}
TARGET_RATIO = 0.97  # the target: (b) and (c) within 3% of (a)
MONITOR_VARIANT = "e"
MONITOR_TARGET_RATIO = 0.98  # the target: the live monitor alone within 2% of (a)
TARGETS = {"b": TARGET_RATIO, "c": TARGET_RATIO, MONITOR_VARIANT: MONITOR_TARGET_RATIO}
TRAITS_VARIANT = "f"
TRAITS_TARGET_RATIO = 0.99  # issue 14: three trait needles within 1% of decoding with (e)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model alias or path for load_model")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--reps",
        type=int,
        nargs="+",
        default=[9, 7],
        help="timed repeats per variant, one per batch size (or one for all)",
    )
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--warmup", type=int, default=2, help="untimed plain runs per batch size")
    p.add_argument("--layers", default="16:24", help="capped blocks, e.g. '16:24' (half-open)")
    p.add_argument("--monitor-layer", type=int, default=20)
    p.add_argument(
        "--percentile",
        type=float,
        default=25.0,
        help="cap threshold per layer = this percentile of generated-token projections",
    )
    p.add_argument(
        "--hook-steps", type=int, default=1000, help="steps per isolated hook-cost timing"
    )
    p.add_argument("--hook-rounds", type=int, default=5, help="isolated hook-cost rounds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="decode part's JSON (default results/decode.json; with --quick "
        f"{QUICK_OUT}, never results/)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 new tokens, 2 repeats, 1 warm-up (numbers are not meaningful); "
        f"results go to {QUICK_DIR}, not results/",
    )
    p.add_argument(
        "--only",
        choices=("decode", "extract"),
        default=None,
        help="run only one part (default: decode, then extract)",
    )
    p.add_argument(
        "--extract-rounds",
        type=int,
        default=None,
        help="extract part: interleaved rounds (default: extract_bench.py's)",
    )
    p.add_argument(
        "--extract-new-tokens",
        type=int,
        nargs="+",
        default=None,
        help="extract part: answer budgets (default: extract_bench.py's)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.reps, args.warmup = 8, [2], 1
        args.hook_steps, args.hook_rounds = 100, 2
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.quick and args.out.resolve().parent == (HERE / "results").resolve():
        p.error(f"--quick never writes into {HERE / 'results'}; pass another --out")
    if len(args.reps) == 1:
        args.reps = args.reps * len(args.batch_sizes)
    if len(args.reps) != len(args.batch_sizes):
        p.error(f"--reps takes one value or one per batch size ({len(args.batch_sizes)})")
    if min(args.reps) < 1 or args.new_tokens < 1 or min(args.batch_sizes) < 1:
        p.error("--reps, --new-tokens and --batch-sizes must be positive")
    return args


class Bench:
    """Holds the model, the axis and the capping config; runs one variant once."""

    def __init__(self, model: Any, tokenizer: Any, axis: Axis, config: CappingConfig, args: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.axis = axis
        self.config = config
        self.blocks = find_decoder_blocks(model)
        self.layers = list(config.layers)
        self.caps = dict(zip(self.layers, config.thresholds, strict=True))
        self.raw_vectors = {layer: axis.directions[layer] for layer in self.layers}
        self.kwargs = generate_kwargs(tokenizer, args.new_tokens)
        self.traits = trait_needles(axis)

    @contextmanager
    def hooks(self, variant: str, model: Any) -> Iterator[Callable[[], int]]:
        """Attach a variant's hooks to ``model``; yields a function reading the monitor."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}")
        blocks = find_decoder_blocks(model)
        layer = self.axis.layer
        with ExitStack() as stack:
            readout: Callable[[], int] = lambda: 0  # noqa: E731
            if variant in ("b", "c"):
                stack.enter_context(capping(model, self.config))
            if variant in ("c", MONITOR_VARIANT):
                mon = stack.enter_context(DriftMonitor(model, self.axis))
                readout = lambda: mon.token_projections().numel()  # noqa: E731
            elif variant == TRAITS_VARIANT:
                needles = stack.enter_context(DriftMonitor(model, self.axis, traits=self.traits))
                readout = lambda: sum(  # noqa: E731
                    x.numel() for x in needle_readings(needles)
                )
            elif variant == "d":
                stack.enter_context(ReferenceCapping(blocks, self.raw_vectors, self.caps))
                ref = stack.enter_context(
                    ReferenceMonitor(blocks[layer], self.axis.directions[layer])
                )
                readout = lambda: len(ref.values)  # noqa: E731
            yield readout

    def run(
        self, variant: str, batch: dict[str, torch.Tensor]
    ) -> tuple[float, torch.Tensor, int, StepClock]:
        """One timed request: (seconds, new ids, monitor readings, per-step clock).

        The time covers entering the hooks' contexts, ``generate`` and (for monitors) taking
        the readings, i.e. everything a caller pays per request.
        """
        clock = StepClock()
        start = time.perf_counter()
        with self.hooks(variant, self.model) as readout:
            _, new_ids = timed_generate(self.model, batch, self.kwargs, clock)
            readings = readout()
        return time.perf_counter() - start, new_ids, readings, clock

    def hook_cost(self, batch_size: int, steps: int, rounds: int) -> dict[str, list[float]]:
        """Seconds per decode step spent in each variant's hooks alone, per round.

        The hooks go on a :class:`PassthroughModel` with the real config; a (B, 1, D) hidden
        state of realistic norm runs through the hooked blocks ``steps`` times. Variant (a)
        is the pass-through cost itself, to subtract.
        """
        dtype = next(self.model.parameters()).dtype
        harness = PassthroughModel(self.model.config, len(self.blocks), dtype)
        blocks = find_decoder_blocks(harness)
        needle_layers = {t.layer for t in self.traits}
        touched = [blocks[i] for i in sorted(set(self.layers) | {self.axis.layer} | needle_layers)]
        d_model = self.axis.d_model
        gen = torch.Generator().manual_seed(0)
        hidden = (torch.randn(batch_size, 1, d_model, generator=gen) * 10.0).to(dtype)

        def step() -> None:
            h = hidden
            for block in touched:
                h = block(h)

        per_step: dict[str, list[float]] = {v: [] for v in VARIANTS}
        order = list(VARIANTS)
        for rnd in range(rounds):
            for v in order[rnd % len(order) :] + order[: rnd % len(order)]:
                with self.hooks(v, harness) as readout, torch.inference_mode():
                    for _ in range(max(10, steps // 10)):
                        step()
                    start = time.perf_counter()
                    for _ in range(steps):
                        step()
                    per_step[v].append((time.perf_counter() - start) / steps)
                    readout()
        return per_step

    def engagement(self, batch: dict[str, torch.Tensor]) -> dict[int, float]:
        """Fraction of decode-step tokens where each cap engages, measured under (b)."""
        with capping(self.model, self.config):
            counter = EngagementCounter(self.model, self.blocks, self.axis.units(), self.caps)
            try:
                timed_generate(self.model, batch, self.kwargs)
            finally:
                counter.remove()
        return counter.fractions()


def needle_readings(mon: DriftMonitor) -> list[torch.Tensor]:
    """Every reading of a monitor with trait needles: its axis' and each needle's."""
    return [mon.token_projections(), *(mon.trait_token_projections(n) for n in mon.trait_names)]


def trait_needles(axis: Axis) -> list[Axis]:
    """Three random trait axes (monitor layer, 4 blocks below, 4 above) with the axis' shape:
    their cost does not depend on what they point at."""
    gen = torch.Generator().manual_seed(14)
    layers = [axis.layer, max(0, axis.layer - 4), min(axis.n_layers - 1, axis.layer + 4)]
    return [
        Axis(
            directions=torch.randn(axis.directions.shape, generator=gen),
            model_id=axis.model_id,
            fingerprint=axis.fingerprint,
            monitor_layer=layer,
            metadata={"kind": "trait", "trait": name},
        )
        for name, layer in zip(("needle_a", "needle_b", "needle_c"), layers, strict=True)
    ]


def agreement(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x == y).float().mean())


def bench_batch_size(bench: Bench, batch_size: int, reps: int, args: Any) -> dict[str, Any]:
    tok = bench.tokenizer
    batch = benchmark_batch(tok, batch_size)
    n_new = bench.kwargs["max_new_tokens"]
    n_tokens = batch_size * n_new
    for _ in range(args.warmup):
        timed_generate(bench.model, batch, bench.kwargs)

    # One untimed run per variant: warms its hooks and gives the outputs for sanity checks.
    first: dict[str, torch.Tensor] = {}
    readings: dict[str, int] = {}
    for v in VARIANTS:
        _, first[v], readings[v], _ = bench.run(v, batch)
        got = tuple(first[v].shape)
        if got != (batch_size, n_new):
            raise RuntimeError(f"variant {v} generated {got}, expected a full batch")
    engaged = bench.engagement(batch)

    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    prefill: dict[str, list[float]] = {v: [] for v in VARIANTS}
    steps: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    deterministic = {v: True for v in VARIANTS}
    order = list(VARIANTS)
    loadavg: list[float] = []
    for rep in range(reps):
        rotated = order[rep % len(order) :] + order[: rep % len(order)]
        for v in rotated:
            secs, new_ids, _, clock = bench.run(v, batch)
            seconds[v].append(secs)
            prefill[v].append(clock.prefill_seconds())
            steps[v].append(clock.decode_step_seconds())
            deterministic[v] &= bool(torch.equal(new_ids, first[v]))
        loadavg.append(os.getloadavg()[0])
        line = "  ".join(f"{v}={n_tokens / seconds[v][-1]:6.1f}" for v in order)
        print(
            f"  batch {batch_size} round {rep + 1}/{reps}: tok/s {line}  (load {loadavg[-1]:.2f})",
            flush=True,
        )

    # End-to-end: generated tokens / wall time of the request (prefill included).
    e2e = compare({v: [n_tokens / x for x in seconds[v]] for v in VARIANTS}, "a")
    # Decode steps: batch / median step duration of each run; a burst of machine noise that
    # hits a few steps of a run barely moves that run's median.
    step = compare(
        {v: [batch_size / statistics.median(run) for run in steps[v]] for v in VARIANTS}, "a"
    )
    pooled = {v: statistics.median([x for run in steps[v] for x in run]) for v in VARIANTS}
    for v in VARIANTS:
        step[v]["pooled_median_step_ms"] = pooled[v] * 1e3
        step[v]["pooled_ratio"] = pooled["a"] / pooled[v]

    targets = {
        v: {
            "target": f"ratio to (a) >= {target}",
            "end_to_end_ratio": e2e[v]["ratio_of_medians"],
            "end_to_end_pass": e2e[v]["ratio_of_medians"] >= target,
            "decode_step_ratio": step[v]["pooled_ratio"],
            "decode_step_pass": step[v]["pooled_ratio"] >= target,
        }
        for v, target in TARGETS.items()
    }
    mean_engaged = sum(engaged.values()) / len(engaged)

    # The same hooks alone on pass-through blocks: a low-noise estimate of their cost.
    per_step = bench.hook_cost(batch_size, args.hook_steps, args.hook_rounds)
    base_step = statistics.median(per_step["a"])
    hook_cost: dict[str, Any] = {}
    for v in VARIANTS:
        cost = statistics.median(per_step[v]) - base_step
        hook_cost[v] = {
            "seconds_per_step_raw": per_step[v],
            "overhead_us_per_step": cost * 1e6,
            "implied_ratio": pooled["a"] / (pooled["a"] + cost),
        }
    m = MONITOR_VARIANT
    monitor_overhead = {
        "what": "decode tokens/s with persona_compass.DriftMonitor attached (e) vs without (a)",
        "variant": m,
        "baseline": "a",
        "target": f"(e)/(a) >= {MONITOR_TARGET_RATIO}",
        "end_to_end_ratio": e2e[m]["ratio_of_medians"],
        "end_to_end_paired_ratio_median": e2e[m]["paired_ratio"]["median"],
        "decode_step_ratio": step[m]["pooled_ratio"],
        "hook_cost_us_per_step": hook_cost[m]["overhead_us_per_step"],
        "hook_implied_ratio": hook_cost[m]["implied_ratio"],
        "end_to_end_pass": targets[m]["end_to_end_pass"],
        "decode_step_pass": targets[m]["decode_step_pass"],
        "hook_implied_pass": hook_cost[m]["implied_ratio"] >= MONITOR_TARGET_RATIO,
    }
    f = TRAITS_VARIANT
    trait_overhead = {
        "what": "decode tokens/s with three trait needles on the DriftMonitor (f) vs the "
        "monitor alone (e)",
        "variant": f,
        "baseline": m,
        "target": f"(f)/(e) >= {TRAITS_TARGET_RATIO}",
        "end_to_end_ratio": e2e[f]["ratio_of_medians"] / e2e[m]["ratio_of_medians"],
        "decode_step_ratio": pooled[m] / pooled[f],
        "hook_cost_us_per_step": hook_cost[f]["overhead_us_per_step"]
        - hook_cost[m]["overhead_us_per_step"],
    }
    extra = trait_overhead["hook_cost_us_per_step"] * 1e-6
    trait_overhead["hook_implied_ratio"] = pooled[m] / (pooled[m] + extra)
    for key in ("end_to_end", "decode_step", "hook_implied"):
        trait_overhead[f"{key}_pass"] = trait_overhead[f"{key}_ratio"] >= TRAITS_TARGET_RATIO
    return {
        "batch_size": batch_size,
        "prompt_tokens_padded": int(batch["input_ids"].shape[1]),
        "prompt_tokens_real": [int(x) for x in batch["attention_mask"].sum(dim=1)],
        "generated_tokens_per_run": n_tokens,
        "repeats": reps,
        "loadavg_1min_per_round": loadavg,
        "seconds_raw": seconds,
        "prefill_seconds_raw": prefill,
        "decode_step_seconds_raw": {
            v: [[round(x, 7) for x in run] for run in steps[v]] for v in VARIANTS
        },
        "end_to_end_tokens_per_s": e2e,
        "decode_step_tokens_per_s": step,
        "targets": targets,
        "monitor_overhead": monitor_overhead,
        "trait_overhead": trait_overhead,
        "cap_engagement": {
            "per_layer": {str(k): val for k, val in engaged.items()},
            "mean_over_layers": mean_engaged,
            "measured_on": "decode steps of one (b) run, pre-cap block output vs threshold",
        },
        "isolated_hook_cost": {
            "method": (
                f"hooks on pass-through blocks, (B, 1, D) input, {args.hook_steps} steps x "
                f"{args.hook_rounds} interleaved rounds; overhead = median minus (a)'s; "
                "implied ratio = t / (t + overhead), t = pooled median decode step of (a)"
            ),
            "variants": hook_cost,
        },
        "sanity": {
            "same_tokens_every_repeat": deterministic,
            "b_vs_a_token_agreement": agreement(first["b"], first["a"]),
            "b_vs_d_token_agreement": agreement(first["b"], first["d"]),
            "c_vs_b_token_agreement": agreement(first["c"], first["b"]),
            "e_vs_a_token_agreement": agreement(first["e"], first["a"]),
            "monitor_readings": {v: readings[v] for v in ("c", "d", "e", "f")},
            "f_vs_e_token_agreement": agreement(first["f"], first["e"]),
            "sample_text_row0": {
                v: tok.decode(first[v][0], skip_special_tokens=True) for v in ("a", "b", "d")
            },
        },
    }


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    st = result["settings"]
    print()
    print(
        f"{st['model']} {m['dtype']}, {st['new_tokens']} new tokens/seq, greedy, eos off; "
        f"{m['cpus_usable']} CPUs, torch {m['torch']} ({m['torch_threads']} threads); "
        f"caps on blocks {st['capped_layers'][0]}..{st['capped_layers'][-1]}, "
        f"monitor block {st['monitor_layer']}"
    )
    print(
        "e2e = generated tokens / request wall time (median of runs, [min-max]); ratio = "
        "median / median of (a), paired = per-round ratio [min-max];\nstep = decode-step "
        "ratio (pooled median step time of (a) / of the variant); hook us = isolated hook cost "
        "per decode step, implied = ratio it predicts"
    )
    head = (
        f"{'batch':>5}  {'variant':<33} {'e2e tok/s':>9} {'[min-max]':>13} {'ratio':>6} "
        f"{'paired [min-max]':>20} {'step':>6} {'hook us':>7} {'implied':>7}  target e2e/step"
    )
    print(head)
    print("-" * len(head))
    labels = {
        "a": "plain generate",
        "b": "capping (persona_compass)",
        "c": "capping + DriftMonitor",
        "d": "reference-style hooks + .item()",
        "e": "DriftMonitor only",
        "f": "DriftMonitor + 3 trait needles",
    }
    verdict = {True: "PASS", False: "FAIL"}
    for res in result["results"]:
        for v in VARIANTS:
            e = res["end_to_end_tokens_per_s"][v]
            p = e["paired_ratio"]
            hc = res["isolated_hook_cost"]["variants"][v]
            target = ""
            if v in res["targets"]:
                t = res["targets"][v]
                target = f"{verdict[t['end_to_end_pass']]}/{verdict[t['decode_step_pass']]}"
            paired_txt = f"{p['median']:.3f} {fmt_spread(p, 2)}"
            line = (
                f"{res['batch_size']:>5}  ({v}) {labels[v]:<29} {e['median']:>9.1f} "
                f"{fmt_spread(e, 1):>13} {e['ratio_of_medians']:>6.3f} {paired_txt:>20} "
                f"{res['decode_step_tokens_per_s'][v]['pooled_ratio']:>6.3f} "
                f"{hc['overhead_us_per_step']:>7.0f} {hc['implied_ratio']:>7.3f}  {target}"
            )
            print(line.rstrip())
        eng = res["cap_engagement"]
        per = " ".join(f"{k}:{val:.0%}" for k, val in eng["per_layer"].items())
        step_ms = res["decode_step_tokens_per_s"]["a"]["pooled_median_step_ms"]
        print(
            f"{'':>7}(a) median decode step {step_ms:.1f} ms; cap engagement on decode tokens "
            f"{eng['mean_over_layers']:.1%} mean ({per})"
        )
        mo = res["monitor_overhead"]
        print(
            f"{'':>7}live-monitor overhead (e)/(a): e2e {mo['end_to_end_ratio']:.3f} "
            f"{verdict[mo['end_to_end_pass']]}, step {mo['decode_step_ratio']:.3f} "
            f"{verdict[mo['decode_step_pass']]}, hook-implied {mo['hook_implied_ratio']:.4f} "
            f"{verdict[mo['hook_implied_pass']]} ({mo['hook_cost_us_per_step']:.0f} us/step; "
            f"target >= {MONITOR_TARGET_RATIO})"
        )
        to = res["trait_overhead"]
        print(
            f"{'':>7}three trait needles (f)/(e): e2e {to['end_to_end_ratio']:.3f} "
            f"{verdict[to['end_to_end_pass']]}, step {to['decode_step_ratio']:.3f} "
            f"{verdict[to['decode_step_pass']]}, hook-implied {to['hook_implied_ratio']:.4f} "
            f"{verdict[to['hook_implied_pass']]} ({to['hook_cost_us_per_step']:.0f} us/step; "
            f"target >= {TRAITS_TARGET_RATIO})"
        )
    print(
        f"targets: (b) and (c) ratio >= {TARGET_RATIO}, (e) ratio >= {MONITOR_TARGET_RATIO} "
        "(PASS/FAIL on e2e / on step)"
    )
    if m["busy_at_start"]:
        print(
            "note: the 1-minute load average was above 1 before the benchmark started: other "
            "processes shared the CPUs and the numbers are noisier than usual"
        )
    print(
        f"wall {result['wall_seconds']:.0f} s; load average start {m['loadavg_start'][0]:.2f}, "
        f"end {m['loadavg_end'][0]:.2f}; written to {result['output_path']}"
    )


def extract_argv(args: argparse.Namespace) -> list[str]:
    """The command line of the extract part, from the shared and ``--extract-*`` flags."""
    argv = ["--model", args.model, "--dtype", args.dtype]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.quick:
        argv += ["--quick", "--out", str(QUICK_EXTRACT_OUT)]  # never into results/
    if args.extract_rounds is not None:
        argv += ["--rounds", str(args.extract_rounds)]
    if args.extract_new_tokens is not None:
        argv += ["--new-tokens", *map(str, args.extract_new_tokens)]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = tokenizer = None
    if args.only != "extract":
        model, tokenizer = run_decode(args)
    if args.only != "decode":
        print("\n== extraction: single-pass capture vs two-pass ==", flush=True)
        # --quick on the extract part overrides --extract-* sizes, as it does for decode.
        return extract_main(extract_argv(args), model=model, tokenizer=tokenizer)
    return 0


def run_decode(args: argparse.Namespace) -> tuple[Any, Any]:
    """The decode part (unchanged); returns the loaded model and tokenizer for reuse."""
    t_start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    info = machine_info(args.dtype)
    print(f"loading {args.model} ({args.dtype}) ...", flush=True)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0

    blocks = find_decoder_blocks(model)
    layers = parse_layer_spec(args.layers, len(blocks))
    max_batch = benchmark_batch(tokenizer, max(args.batch_sizes))
    kwargs = generate_kwargs(tokenizer, args.new_tokens)

    print("calibrating axis and thresholds ...", flush=True)
    t0 = time.perf_counter()
    directions = contrast_directions(model, tokenizer)
    axis = Axis(
        directions=directions,
        model_id=args.model,
        fingerprint=model_fingerprint(model),
        monitor_layer=args.monitor_layer,
        metadata={"source": "benchmark contrast axis (default minus role-play means)"},
    )
    _, calib_ids = timed_generate(model, max_batch, kwargs)
    projections = generated_projections(model, max_batch, calib_ids, axis.units(), layers)
    thresholds = percentile_thresholds(projections, args.percentile)
    config = CappingConfig.from_axis(axis, layers, thresholds)
    calib_s = time.perf_counter() - t0

    bench = Bench(model, tokenizer, axis, config, args)
    results = []
    for batch_size, reps in zip(args.batch_sizes, args.reps, strict=True):
        print(f"batch {batch_size}: warm-up, then {reps} interleaved rounds ...", flush=True)
        results.append(bench_batch_size(bench, batch_size, reps, args))

    info["loadavg_end"] = list(os.getloadavg())
    info["busy_at_start"] = info["loadavg_start"][0] > 1.0
    out_path: Path = args.out
    result = {
        "benchmark": "decode throughput with capping and live monitoring",
        "note": "quick smoke run: numbers are not meaningful" if args.quick else "",
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "settings": {
            "model": args.model,
            "new_tokens": args.new_tokens,
            "batch_sizes": args.batch_sizes,
            "repeats": args.reps,
            "warmup_runs": args.warmup,
            "quick": args.quick,
            "decoding": "greedy, eos_token_id=None (every run generates new_tokens per row)",
            "padding": "left",
            "capped_layers": layers,
            "cap_form": "floor: h <- h + max(tau - h.v, 0) v, v the unit axis",
            "thresholds": dict(zip([str(x) for x in layers], thresholds, strict=True)),
            "threshold_rule": (
                f"p{args.percentile:g} of the projections of the generated tokens of one "
                f"uncapped warm-up generation at batch {max(args.batch_sizes)}"
            ),
            "monitor_layer": axis.layer,
            "axis": (
                "contrast: mean(default chat) - mean(role-play chats) per layer, with the "
                "component along the first (attention-sink) token's state projected out"
            ),
            "timing": (
                "wall time of entering the variant's hooks + generate (prefill included) + "
                "reading the monitor; variants interleaved round-robin, order rotated per round; "
                "decode steps timed by a generate streamer (same cost in every variant)"
            ),
            "variants": VARIANTS,
            "targets": {v: f"ratio to (a) >= {t}" for v, t in TARGETS.items()},
            "hook_steps": args.hook_steps,
            "hook_rounds": args.hook_rounds,
        },
        "load_seconds": load_s,
        "calibration_seconds": calib_s,
        "results": results,
        "wall_seconds": time.perf_counter() - t_start,
        "output_path": str(out_path),
    }
    write_json(out_path, result)
    print_table(result)
    return model, tokenizer


if __name__ == "__main__":
    raise SystemExit(main())
