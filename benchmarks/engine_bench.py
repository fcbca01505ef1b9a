"""Engine benchmark: the compass inside vLLM against the same vLLM with the compass off.

Three engines run side by side, each in its own process, started once and then driven in
interleaved rounds (the order rotates every round), so all variants see the same machine
load:

  off      plain vLLM (the same release and settings, no compass configuration);
  compass  the vllm engine with the compass: every request capped on the bundle's window
           and read on the monitor layer, readings collected and turned into Answers;
  hf       the hf engine (Hugging Face generate with hooks), capped and read likewise; it
           serves one conversation at a time, so a batch of 8 runs as 8 requests in a row.

vLLM variants generate exactly ``--new-tokens`` per request (end of sequence ignored), so
both do the same work; the hf engine stops at end of turn, and its tokens/s counts what it
generated. Results: ``benchmarks/results/engine.json`` (atomically), and a table.

Usage:
    .venv/bin/python benchmarks/engine_bench.py              # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/engine_bench.py --quick      # smoke run, to $TMPDIR
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

PROMPTS = [
    "Tell me a long story about a lighthouse keeper and the sea.",
    "Explain how a bicycle works, part by part.",
    "I feel lonely lately. Can we talk for a while?",
    "Describe your ideal day in great detail.",
    "Write a letter to a friend you have not seen for years.",
    "What would you do if you were a dragon guarding a mountain?",
    "Teach me the basics of cooking rice, step by step.",
    "Who are you, really? Tell me everything about yourself.",
]


# -- worker: one engine, driven over stdin/stdout ---------------------------------------------
def worker(variant: str, dtype: str, new_tokens: int) -> None:
    from persona_compass import SamplingConfig, render_chat
    from persona_compass.engines import CompassRequest

    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    if variant == "hf":
        from persona_compass.engines import open_engine

        engine: Any = open_engine("hf", "smollm2-135m", "smollm2-135m", dtype=dtype)
    else:
        from persona_compass.engines.vllm_engine import VLLMEngine

        class FixedLength(VLLMEngine):
            """Every request generates exactly ``new_tokens`` (the same work per variant)."""

            def _params(self, req: Any, cap: Any, *, probe: bool) -> Any:
                params = super()._params(req, cap, probe=probe)
                params.ignore_eos, params.stop_token_ids = True, []
                return params

        engine = FixedLength(
            "smollm2-135m",
            "smollm2-135m",
            dtype=dtype,
            compass=variant == "compass",
            max_num_seqs=8,
        )
    print("READY", flush=True)
    for line in sys.stdin:
        batch = int(line)
        messages = [[{"role": "user", "content": p}] for p in PROMPTS[:batch]]
        start = time.perf_counter()
        if variant == "off":
            params = engine._SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            prompts = [
                {
                    "prompt_token_ids": render_chat(
                        engine.tokenizer, m, add_generation_prompt=True
                    ).input_ids
                }
                for m in messages
            ]
            outs = engine.llm.generate(prompts, params, use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        else:
            requests = [
                CompassRequest(m, "on", sampling=sampling, read_history=False) for m in messages
            ]
            answers = engine.respond(requests)
            tokens = sum(a.completion_tokens for a in answers)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


# -- driver -----------------------------------------------------------------------------------
class Proc:
    def __init__(self, variant: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", variant, "--dtype", args.dtype]
        cmd += ["--new-tokens", str(args.new_tokens)]
        self.variant = variant
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        t0 = time.perf_counter()
        for line in self.p.stdout:  # type: ignore[union-attr]
            if line.strip() == "READY":
                break
        else:
            raise RuntimeError(f"{variant} engine did not start")
        self.startup = time.perf_counter() - t0

    def run(self, batch: int) -> dict[str, float]:
        self.p.stdin.write(f"{batch}\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]
        while True:
            line = self.p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"{self.variant} engine died")
            if line.startswith("{"):
                return json.loads(line)

    def close(self) -> None:
        self.p.stdin.close()  # type: ignore[union-attr]
        self.p.wait(timeout=120)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per batch size")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=["off", "compass", "hf"])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 8 tokens, to $TMPDIR")
    ap.add_argument("--out", help="result file (default benchmarks/results/engine.json)")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.dtype, args.new_tokens)
        return
    if args.quick:
        args.rounds, args.new_tokens = 2, 8
    out = (
        Path(args.out)
        if args.out
        else (
            Path(tempfile.gettempdir()) / "persona-compass-bench" / "engine-quick.json"
            if args.quick
            else RESULTS / "engine.json"
        )
    )
    procs = {v: Proc(v, args) for v in args.variants}
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "loadavg_start": list(os.getloadavg()),
        "startup_seconds": {v: round(p.startup, 1) for v, p in procs.items()},
        "batches": {},
    }
    try:
        for batch in args.batch_sizes:
            for p in procs.values():  # warm-up round, not timed
                p.run(batch)
            rates: dict[str, list[float]] = {v: [] for v in procs}
            order = list(procs)
            for r in range(args.rounds):
                for v in order[r % len(order) :] + order[: r % len(order)]:
                    res = procs[v].run(batch)
                    rates[v].append(res["tokens"] / res["seconds"])
            entry: dict[str, Any] = {}
            for v, xs in rates.items():
                entry[v] = {
                    "tokens_per_s": xs,
                    "median": median(xs),
                    "min": min(xs),
                    "max": max(xs),
                }
            if "off" in rates and "compass" in rates:
                paired = [c / o for c, o in zip(rates["compass"], rates["off"], strict=True)]
                entry["compass_over_off"] = {
                    "ratio_of_medians": median(rates["compass"]) / median(rates["off"]),
                    "paired_median": median(paired),
                    "paired": paired,
                }
            if "hf" in rates and "compass" in rates:
                entry["compass_over_hf"] = median(rates["compass"]) / median(rates["hf"])
            report["batches"][str(batch)] = entry
    finally:
        for p in procs.values():
            p.close()
    report["loadavg_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(
        f"engine benchmark ({args.dtype}, {args.new_tokens} tokens, {args.rounds} rounds) -> {out}"
    )
    for batch, entry in report["batches"].items():
        cells = [
            f"{v} {entry[v]['median']:.1f} tok/s [{entry[v]['min']:.1f}-{entry[v]['max']:.1f}]"
            for v in procs
        ]
        line = f"batch {batch}: " + ", ".join(cells)
        if "compass_over_off" in entry:
            c = entry["compass_over_off"]
            line += f"; compass/off {c['ratio_of_medians']:.3f} (paired {c['paired_median']:.3f})"
        print(line)


if __name__ == "__main__":
    main()
