"""Load test for ``persona-compass serve``: N concurrent streaming clients for M seconds.

Loopback only: the script refuses any URL that is not this machine, and every run stops by
itself (no new requests after ``--duration`` seconds; whatever is still in flight
``--grace`` seconds later is cancelled and counted as lost).

    # against a running server
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 8 --duration 60
    # start the server itself (a subprocess on a free loopback port), then load it
    python benchmarks/load.py --spawn --model smollm2-135m --axis smollm2-135m --cap on \\
        --clients 8 --duration 60
    # capping + telemetry (--cap on) against a server started with --cap off, phases
    # interleaved A/B/A/B (--rounds 2), medians over the phases
    python benchmarks/load.py --compare --model smollm2-135m --axis smollm2-135m \\
        --clients 8 --duration 30 --rounds 2
    # or compare two running servers
    python benchmarks/load.py --compare --url http://127.0.0.1:8000 --url-b http://127.0.0.1:8001
    # the engines side by side: hf, the vllm engine with the compass (cap on and off), and
    # vLLM's own OpenAI server without any compass; phases in the order A B C D D C B A ...
    python benchmarks/load.py --spawn --variants hf:on,vllm:on,vllm:off,vllm-plain \
        --model smollm2-135m --axis smollm2-135m --dtype bfloat16 --clients 8 --duration 60

Every request streams (``stream: true`` with ``include_usage``) and is checked: a role chunk
first, a final chunk with a finish reason and the ``persona_compass`` telemetry, usage, and
``[DONE]``; anything else counts as an error. Reported per phase and per configuration:
p50/p95 time to first token (queue wait included), p50/p95 per-token latency (first to last
content chunk over the tokens between), tokens/s (completion tokens / phase wall time),
requests sent, completed, errored and lost (sent - completed - errored). Results go to a JSON
file written atomically (``--out``). ``vllm-plain`` (vLLM's own server) sends no telemetry, so
its streams are checked without it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "What is a good way to learn a new language?",
    "Explain how a rainbow forms, briefly.",
    "Give me three tips for sleeping better.",
    "What should I pack for a weekend hike?",
    "How do I make a simple tomato soup?",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "What is the difference between weather and climate?",
]


class LoadError(Exception):
    """A setting or a server problem that stops the run."""


# -- safety: loopback only -----------------------------------------------------------------------
def check_loopback(url: str) -> str:
    """The URL without a trailing slash, if it points at this machine; else LoadError."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise LoadError(f"{url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    host = parsed.hostname
    loopback = host.lower() == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise LoadError(
            f"refusing {url}: this load test only runs against this machine "
            "(127.0.0.1, ::1 or localhost)"
        )
    return url.rstrip("/")


# -- one request ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    ok: bool
    error: str | None = None
    ttft: float | None = None
    per_token: float | None = None
    tokens: int = 0
    seconds: float = 0.0


async def stream_once(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    *,
    telemetry_expected: bool = True,
) -> Outcome:
    """Send one streaming completion and check the stream from role chunk to [DONE]."""
    start = time.perf_counter()
    first = last = None
    saw_role = done = telemetry = False
    finish = None
    usage = None
    async with client.stream(
        "POST", url + "/v1/chat/completions", json=payload, headers=headers
    ) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")[:200]
            return Outcome(False, f"HTTP {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                return Outcome(False, f"not a server-sent event line: {line[:80]!r}")
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return Outcome(False, f"error event: {chunk['error'].get('message')}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("role") == "assistant":
                    saw_role = True
                if delta.get("content"):
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    telemetry = "turn" in (chunk.get("persona_compass") or {})
    missing = [
        name
        for name, present in (
            ("role chunk", saw_role),
            ("finish_reason", finish is not None),
            ("persona_compass telemetry", telemetry or not telemetry_expected),
            ("usage", usage is not None),
            ("[DONE]", done),
        )
        if not present
    ]
    if missing:
        return Outcome(False, f"incomplete stream: no {', '.join(missing)}")
    assert usage is not None
    tokens = int(usage["completion_tokens"])
    end = time.perf_counter()
    per_token = None
    if first is not None and last is not None and tokens > 1 and last > first:
        per_token = (last - first) / (tokens - 1)
    return Outcome(
        True,
        ttft=None if first is None else first - start,
        per_token=per_token,
        tokens=tokens,
        seconds=end - start,
    )


# -- one phase -----------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def latency_percentiles(ttft: list[float], per_token: list[float]) -> dict[str, float | None]:
    """p50/p95 of time to first token and of per-token latency."""
    return {
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "per_token_p50_s": percentile(per_token, 50),
        "per_token_p95_s": percentile(per_token, 95),
    }


@dataclass
class Phase:
    label: str
    url: str
    clients: int
    duration_s: float
    wall_s: float = 0.0
    sent: int = 0
    completed: int = 0
    errors: int = 0
    lost: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    per_token: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "url": self.url,
            "clients": self.clients,
            "duration_s": self.duration_s,
            "wall_s": round(self.wall_s, 3),
            "sent": self.sent,
            "completed": self.completed,
            "errors": self.errors,
            "lost": self.lost,
            "completion_tokens": self.tokens,
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s > 0 else None,
            **latency_percentiles(self.ttft, self.per_token),
            "error_samples": self.error_samples[:5],
        }


def auth_headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def request_body(
    client_id: int, n: int, args: argparse.Namespace, model: str = "persona-compass"
) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[(client_id + n) % len(PROMPTS)]}],
        "max_tokens": args.max_tokens,
        # explicit, so every server samples alike (the compass and vLLM default differently)
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": 1000 * client_id + n,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class Target:
    """A server to load: its URL, the model name its requests carry, whether it reports
    telemetry (vLLM's own server does not)."""

    url: str
    model: str = "persona-compass"
    telemetry: bool = True


async def run_phase(label: str, target: Target, args: argparse.Namespace) -> Phase:
    """``args.clients`` clients send streaming requests back to back for ``args.duration`` s."""
    url = target.url
    phase = Phase(label, url, args.clients, args.duration)
    headers = auth_headers(args)
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.duration + args.grace + 30, connect=10)
    start = time.perf_counter()
    deadline = start + args.duration

    async def client_loop(client: httpx.AsyncClient, cid: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            phase.sent += 1
            try:
                outcome = await stream_once(
                    client,
                    url,
                    request_body(cid, n, args, target.model),
                    headers,
                    telemetry_expected=target.telemetry,
                )
            except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
                outcome = Outcome(False, f"{type(exc).__name__}: {exc}")
            n += 1
            if outcome.ok:
                phase.completed += 1
                phase.tokens += outcome.tokens
                if outcome.ttft is not None:
                    phase.ttft.append(outcome.ttft)
                if outcome.per_token is not None:
                    phase.per_token.append(outcome.per_token)
            else:
                phase.errors += 1
                if outcome.error and len(phase.error_samples) < 20:
                    phase.error_samples.append(outcome.error)
                await asyncio.sleep(0.05)  # do not spin on a failing server

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        tasks = [asyncio.create_task(client_loop(client, i)) for i in range(args.clients)]
        _, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        for task in pending:  # the hard stop: in-flight requests are lost
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
    phase.wall_s = time.perf_counter() - start
    phase.lost = phase.sent - phase.completed - phase.errors
    return phase


async def warm_up(target: Target, args: argparse.Namespace) -> None:
    """A few short requests, not measured (first generations pay one-time costs)."""
    async with httpx.AsyncClient(timeout=300) as client:
        body = request_body(0, 0, args, target.model) | {"max_tokens": min(8, args.max_tokens)}
        for _ in range(2):
            outcome = await stream_once(
                client, target.url, body, auth_headers(args), telemetry_expected=target.telemetry
            )
            if not outcome.ok:
                raise LoadError(f"the warm-up request to {target.url} failed: {outcome.error}")


def server_info(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    url = target.url
    if not target.telemetry:
        return {"server": "vllm (its own OpenAI server, no compass)", "model": target.model}
    try:
        r = httpx.get(url + "/v1/compass", headers=auth_headers(args), timeout=10)
        return r.json() if r.status_code == 200 else {"status": r.status_code}
    except httpx.HTTPError as exc:
        raise LoadError(f"cannot reach {url}: {exc}") from None


# -- spawning servers ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


VARIANTS = ("hf:off", "hf:on", "hf:adaptive", "vllm:off", "vllm:on", "vllm:adaptive", "vllm-plain")


def parse_variants(text: str) -> list[str]:
    """``hf:on,vllm:on,vllm-plain`` -> checked names (engine:cap, or vLLM's own server)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise LoadError(f"--variants {text!r}: each must be one of {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise LoadError(f"--variants {text!r} names a variant twice")
    return names


def phase_order(names: list[str], rounds: int) -> list[str]:
    """A B C, C B A, A B C, ...: each variant's mean position is the same, so a machine
    that drifts (warms, throttles, another job starts) drifts against all of them alike."""
    order: list[str] = []
    for r in range(rounds):
        order += names if r % 2 == 0 else names[::-1]
    return order


class SpawnedServer:
    """``persona-compass serve`` (or vLLM's own server) in a subprocess on a loopback port."""

    def __init__(self, args: argparse.Namespace, variant: str, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.variant = variant
        engine, _, cap = variant.partition(":")
        self.cap = cap
        env = dict(os.environ)
        env.pop("PERSONA_COMPASS_API_KEY", None)
        self.target = Target(self.url)
        if engine == "vllm-plain":
            folder = vllm_model_folder(args)
            self.target = Target(self.url, model=folder, telemetry=False)
            cmd = [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                folder,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--max-num-seqs",
                str(args.clients),
                "--max-model-len",
                "2048",
                "--seed",
                "0",
                "--no-enable-log-requests",
                "--uvicorn-log-level",
                "warning",
            ]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        else:
            cmd = [
                sys.executable,
                "-m",
                "persona_compass.cli",
                "serve",
                "--axis",
                args.axis,
                "--cap",
                cap,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--queue",
                str(max(16, args.clients)),
                "--max-tokens",
                str(max(args.max_tokens, 8)),
                "--log-level",
                "warning",
            ]
            if engine == "vllm":
                cmd += ["--engine", "vllm", "--max-concurrency", str(args.clients)]
            if args.model:
                cmd += ["--model", args.model]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            if args.api_key:
                env["PERSONA_COMPASS_API_KEY"] = args.api_key  # not on the command line
        name = variant.replace(":", "-")
        self.log_path = log_dir / f"server-{name}-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LoadError(
                    f"the server ({self.variant}) exited with {self.proc.returncode}:\n"
                    + self.log_tail()
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise LoadError(f"the server ({self.variant}) did not answer /health within {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# -- the runs ------------------------------------------------------------------------------------
def aggregate(phases: list[Phase]) -> dict[str, Any]:
    """Medians over a configuration's phases, pooled percentiles, and summed counts."""
    rows = [p.summary() for p in phases]

    def median_of(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    pooled = latency_percentiles(
        [v for p in phases for v in p.ttft], [v for p in phases for v in p.per_token]
    )
    return {
        "phases": len(phases),
        "median": {key: median_of(key) for key in ("tokens_per_s", *pooled)},
        "pooled": pooled,
        "sent": sum(p.sent for p in phases),
        "completed": sum(p.completed for p in phases),
        "errors": sum(p.errors for p in phases),
        "lost": sum(p.lost for p in phases),
        "completion_tokens": sum(p.tokens for p in phases),
    }


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def print_table(configs: dict[str, dict[str, Any]]) -> None:
    head = (
        f"{'config':<22}{'tok/s':>8}{'ttft p50':>10}{'ttft p95':>10}{'tok p50':>9}"
        f"{'tok p95':>9}{'sent':>6}{'done':>6}{'err':>5}{'lost':>5}"
    )
    print(head)
    print("-" * len(head))
    for name, agg in configs.items():
        med = agg["median"]
        print(
            f"{name:<22}{fmt(med['tokens_per_s']):>8}"
            f"{fmt(med['ttft_p50_s'], 1000, 0) + 'ms':>10}"
            f"{fmt(med['ttft_p95_s'], 1000, 0) + 'ms':>10}"
            f"{fmt(med['per_token_p50_s'], 1000, 1) + 'ms':>9}"
            f"{fmt(med['per_token_p95_s'], 1000, 1) + 'ms':>9}"
            f"{agg['sent']:>6}{agg['completed']:>6}{agg['errors']:>5}{agg['lost']:>5}"
        )


def vllm_model_folder(args: argparse.Namespace) -> str:
    """The Hugging Face folder vLLM's own server loads for --model (default: the bundle's)."""
    from persona_compass.axis import Axis
    from persona_compass.bundles import resolve_bundle
    from persona_compass.engines.vllm_engine import model_folder

    spec = args.model or Axis.load(resolve_bundle(args.axis)).model_id or "smollm2-135m"
    return model_folder(spec)


def ratios(configs: dict[str, dict[str, Any]], phases: dict[str, list[Phase]]) -> dict:
    """tokens/s of every variant over every other: ratio of medians, and the median of the
    per-round ratios (round r of A against round r of B)."""
    out: dict[str, Any] = {}
    for a in configs:
        for b in configs:
            if a == b:
                continue
            ma, mb = configs[a]["median"]["tokens_per_s"], configs[b]["median"]["tokens_per_s"]
            paired = [
                pa.tokens / pa.wall_s / (pb.tokens / pb.wall_s)
                for pa, pb in zip(phases[a], phases[b], strict=True)
                if pa.wall_s and pb.wall_s and pb.tokens
            ]
            out[f"{a} / {b}"] = {
                "ratio_of_medians": (ma / mb) if ma and mb else None,
                "paired": paired,
                "paired_median": statistics.median(paired) if paired else None,
            }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the load as configured; return the results (also written to ``args.out``)."""
    servers: list[SpawnedServer] = []
    try:
        if args.spawn:
            log_dir = Path(tempfile.mkdtemp(prefix="pc-load-"))
            if args.variants:
                variants = parse_variants(args.variants)
                names = variants
            else:
                caps = [args.cap, args.cap_b] if args.compare else [args.cap]
                variants = [f"hf:{cap}" for cap in caps]
                names = [f"cap {cap}" for cap in caps]
            servers = [SpawnedServer(args, v, log_dir) for v in variants]
            for server in servers:
                server.wait_ready(args.startup_timeout)
            targets = [s.target for s in servers]
        else:
            targets = [Target(check_loopback(args.url))]
            if args.compare:
                targets.append(Target(check_loopback(args.url_b)))
            names = ["A", "B"][: len(targets)]
        infos = [server_info(t, args) for t in targets]
        if not args.spawn:
            names = [
                f"{n}: cap {i.get('cap_mode', '?')}" for n, i in zip(names, infos, strict=True)
            ]
        for target in targets:
            asyncio.run(warm_up(target, args))
        rounds = args.rounds if (args.compare or args.variants) else 1
        by_name = dict(zip(names, targets, strict=True))
        phases: dict[str, list[Phase]] = {name: [] for name in names}
        for name in phase_order(names, rounds):
            phase = asyncio.run(run_phase(f"{name} #{len(phases[name]) + 1}", by_name[name], args))
            phases[name].append(phase)
            s = phase.summary()
            print(
                f"  {phase.label}: {fmt(s['tokens_per_s'])} tok/s, "
                f"{phase.completed}/{phase.sent} done, {phase.errors} errors, "
                f"{phase.lost} lost",
                flush=True,
            )
        configs = {name: aggregate(ph) for name, ph in phases.items()}
        result: dict[str, Any] = {
            "kind": "persona-compass-load",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {
                "clients": args.clients,
                "duration_s": args.duration,
                "grace_s": args.grace,
                "rounds": rounds,
                "order": phase_order(names, rounds),
                "max_tokens": args.max_tokens,
                "sampling": {
                    "temperature": args.temperature,
                    "top_p": args.top_p,
                    "repetition_penalty": args.repetition_penalty,
                },
                "spawn": args.spawn,
                "variants": args.variants,
                "model": args.model,
                "axis": args.axis,
                "dtype": args.dtype,
            },
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            },
            "servers": dict(zip(names, infos, strict=True)),
            "configs": configs,
            "phases": {name: [p.summary() for p in ph] for name, ph in phases.items()},
        }
        if len(names) == 2:
            pair = ratios(configs, phases)[f"{names[0]} / {names[1]}"]
            result["comparison"] = {
                "a": names[0],
                "b": names[1],
                "tokens_per_s_ratio_of_medians": pair["ratio_of_medians"],
                "tokens_per_s_paired_ratios": pair["paired"],
                "tokens_per_s_paired_median": pair["paired_median"],
            }
        elif len(names) > 2:
            result["ratios"] = ratios(configs, phases)
        return result
    finally:
        for server in servers:
            server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Concurrent streaming load against persona-compass serve (loopback only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", help="A running server, e.g. http://127.0.0.1:8000 (loopback only).")
    p.add_argument("--url-b", help="With --compare: the second running server.")
    p.add_argument("--spawn", action="store_true", help="Start the server(s) in subprocesses.")
    p.add_argument("--compare", action="store_true", help="Run A and B phases interleaved.")
    p.add_argument("--model", default=None, help="--spawn: model spec (default: the bundle's).")
    p.add_argument("--axis", default=None, help="--spawn: axis bundle folder or alias.")
    p.add_argument("--cap", default="on", choices=["off", "on", "adaptive"], help="A's cap mode.")
    p.add_argument("--cap-b", default="off", choices=["off", "on", "adaptive"], help="B's cap.")
    p.add_argument(
        "--variants",
        default=None,
        help="--spawn: comma list of servers to compare, each hf:CAP, vllm:CAP (CAP: off, on, "
        "adaptive) or vllm-plain (vLLM's own OpenAI server, no compass); phases run "
        "A B C, C B A, ... for --rounds rounds.",
    )
    p.add_argument("--dtype", default=None, help="--spawn: model dtype.")
    p.add_argument("--api-key", default=os.environ.get("PERSONA_COMPASS_API_KEY"))
    p.add_argument("--clients", type=int, default=8, help="Concurrent streaming clients.")
    p.add_argument("--duration", type=float, default=60.0, help="Seconds of load per phase.")
    p.add_argument("--rounds", type=int, default=2, help="--compare: phases per configuration.")
    p.add_argument("--grace", type=float, default=60.0, help="Seconds to finish in-flight work.")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request.")
    p.add_argument(
        "--temperature", type=float, default=0.7, help="Sampling temperature of each request."
    )
    p.add_argument("--top-p", type=float, default=0.9, help="top_p of each request.")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.1, help="repetition_penalty of each request."
    )
    p.add_argument("--startup-timeout", type=float, default=300.0, help="--spawn: /health wait.")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: results/).")
    args = p.parse_args(argv)
    if args.spawn:
        if args.url or args.url_b:
            p.error("--spawn starts its own servers; leave out --url/--url-b")
        if not args.axis:
            p.error("--spawn needs --axis (and optionally --model)")
        if args.variants and args.compare:
            p.error("--variants compares its servers already; leave out --compare")
    else:
        if args.variants:
            p.error("--variants needs --spawn (it starts the servers)")
        if not args.url:
            p.error("give --url of a running server, or --spawn with --axis/--model")
        if args.compare and not args.url_b:
            p.error("--compare against running servers needs --url and --url-b")
    if not 1 <= args.clients <= 256:
        p.error("--clients must be in 1..256")
    if not 0 < args.duration <= 3600 or not 0 <= args.grace <= 600:
        p.error("--duration must be in (0, 3600] and --grace in [0, 600] seconds")
    if not 1 <= args.rounds <= 20 or not 1 <= args.max_tokens <= 4096:
        p.error("--rounds must be in 1..20 and --max-tokens in 1..4096")
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        p.error("--temperature must be in [0, 2] and --top-p in (0, 1]")
    if not 0 < args.repetition_penalty <= 10:
        p.error("--repetition-penalty must be in (0, 10]")
    if args.out is None:
        name = "load-engines" if args.variants else "load-compare" if args.compare else "load"
        args.out = HERE / "results" / f"{name}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.url:
            check_loopback(args.url)
        if args.url_b:
            check_loopback(args.url_b)
        result = run(args)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from persona_compass.atomic import write_json

    write_json(args.out, result)  # creates the folder
    print()
    print_table(result["configs"])
    comparison = result.get("comparison")
    if comparison and comparison["tokens_per_s_ratio_of_medians"] is not None:
        print(
            f"\ntokens/s {comparison['a']} / {comparison['b']}: "
            f"{comparison['tokens_per_s_ratio_of_medians']:.3f} (ratio of medians), "
            f"{fmt(comparison['tokens_per_s_paired_median'], 1, 3)} (median of paired phases)"
        )
    for pair, r in (result.get("ratios") or {}).items():
        print(
            f"tokens/s {pair}: {fmt(r['ratio_of_medians'], 1, 3)} (ratio of medians), "
            f"{fmt(r['paired_median'], 1, 3)} (median of paired rounds)"
        )
    print(f"\nresults written to {args.out}")
    bad = sum(c["errors"] + c["lost"] for c in result["configs"].values())
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
