"""The vLLM engine's compass op on a GPU: correctness inside a CUDA graph, and its cost per
decode step against the decoder layer's own matrix work.

vLLM's CUDA build cannot run here, so this measures the op itself, as vLLM would run it: a
per-layer op over (tokens, d_model) with slot-indexed thresholds, captured in a CUDA graph,
in bf16, against a CUDA-graphed stand-in of one decoder layer of the same model (its QKV, O,
gate-up and down projections; attention over the KV cache is left out, so the layer time is
a lower bound and the op's share an upper bound).

Run: ``python benchmarks/gpu_op.py OUT.json`` on a machine with CUDA. It imports only torch
and the op's own module (loaded by path), so it needs no install.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OP_FILE = HERE.parent / "src" / "persona_compass" / "engines" / "compass_op.py"

# (name, d_model, q width, kv width (k and v each), intermediate): the models' configs.
MODELS = [
    ("SmolLM2-135M", 576, 576, 192, 1536),
    ("Gemma-2-27B", 4608, 4096, 2048, 36864),
    ("Qwen3-32B", 5120, 8192, 1024, 25600),
    ("Llama-3.3-70B", 8192, 8192, 1024, 28672),
]
TOKENS = [1, 8, 64, 256]
CAP_LAYERS = 8  # the research caps a window of about 8 layers


def load_op():
    spec = importlib.util.spec_from_file_location("compass_op", OP_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def graphed(fn, warmup: int = 3):
    """Capture ``fn`` in a CUDA graph; returns the graph (replay to run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph(graph, reps: int = 200) -> float:
    """Median microseconds per replay over 7 rounds."""
    rounds = []
    for _ in range(7):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(rounds), min(rounds), max(rounds)


def check_graph_correctness(op, d_model: int = 576) -> dict:
    """Capture once, then change slot settings between replays: the graph must follow."""
    torch.manual_seed(0)
    dev = "cuda"
    unit = torch.nn.functional.normalize(torch.randn(d_model), dim=0)
    tables = op.CompassTables({3: unit}, 3, max_tokens=16, max_slots=4, device=dev)
    hidden = torch.randn(8, d_model, device=dev, dtype=torch.float32) * 10
    residual = torch.randn(8, d_model, device=dev, dtype=torch.float32) * 10
    out = torch.empty_like(hidden)

    def step():
        out.copy_(op.apply_compass(tables, 3, hidden + residual, hidden))

    graph = graphed(step)
    results = {}
    # 1) every token on the null slot: nothing changes
    tables.token_slot[:8] = 0
    graph.replay()
    torch.cuda.synchronize()
    results["null_slot_unchanged"] = bool(torch.equal(out, hidden))
    # 2) tokens 0-3 on slot 1 with a high floor, 4-7 on slot 2 with steering only
    block = hidden + residual
    tau = float((block @ unit.to(dev)).max()) + 5.0
    tables.set_slot(1, caps=[(3, 0, tau)])
    tables.set_slot(2, steer=[(3, -4.0)])
    tables.token_slot[:8] = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2], device=dev)
    graph.replay()
    torch.cuda.synchronize()
    new_block = out + residual
    proj = new_block @ unit.to(dev)
    results["capped_rows_at_floor_max_err"] = float((proj[:4] - tau).abs().max())
    expect_steered = (block[4:] @ unit.to(dev)) - 4.0
    results["steered_rows_max_err"] = float((proj[4:] - expect_steered).abs().max())
    results["readings_match_max_err"] = float((tables.readings[:8] - proj).abs().max())
    results["raised_rows"] = tables.raised[0, :8].int().tolist()
    return results


def layer_standin(d_model: int, q: int, kv: int, inter: int, tokens: int):
    dev, dt = "cuda", torch.bfloat16
    w_qkv = torch.randn(d_model, q + 2 * kv, device=dev, dtype=dt) * 0.02
    w_o = torch.randn(q, d_model, device=dev, dtype=dt) * 0.02
    w_gu = torch.randn(d_model, 2 * inter, device=dev, dtype=dt) * 0.02
    w_down = torch.randn(inter, d_model, device=dev, dtype=dt) * 0.02
    x = torch.randn(tokens, d_model, device=dev, dtype=dt)
    out = torch.empty_like(x)

    def step():
        qkv = x @ w_qkv
        attn = qkv[:, :q] @ w_o
        h = x + attn
        gu = h @ w_gu
        act = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        out.copy_(h + act @ w_down)

    return step


def op_standin(op, d_model: int, tokens: int, compiled: bool = False):
    dev, dt = "cuda", torch.bfloat16
    units = {
        layer: torch.nn.functional.normalize(torch.randn(d_model), dim=0)
        for layer in range(CAP_LAYERS)
    }
    tables = op.CompassTables(units, 0, max_tokens=512, max_slots=33, device=dev)
    for slot in range(1, 33):  # half the slots capped, half steered: every code path busy
        if slot % 2:
            tables.set_slot(slot, caps=[(layer, 0, 1.0) for layer in range(CAP_LAYERS)])
        else:
            tables.set_slot(slot, steer=[(0, 0.5)])
    tables.token_slot[:tokens] = torch.arange(tokens, device=dev) % 32 + 1
    hidden = torch.randn(tokens, d_model, device=dev, dtype=dt)
    residual = torch.randn(tokens, d_model, device=dev, dtype=dt)
    out = torch.empty_like(hidden)
    apply = torch.compile(op.apply_compass, dynamic=False) if compiled else op.apply_compass

    def step():  # one layer's op (the cost per capped layer)
        out.copy_(apply(tables, 0, hidden + residual, hidden))

    return step


def main(path: str) -> None:
    op = load_op()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "graph_correctness": check_graph_correctness(op),
        "rows": [],
    }
    print(json.dumps(report["graph_correctness"]), flush=True)
    for name, d_model, q, kv, inter in MODELS:
        for tokens in TOKENS:
            layer_med, layer_lo, layer_hi = time_graph(
                graphed(layer_standin(d_model, q, kv, inter, tokens))
            )
            op_med, op_lo, op_hi = time_graph(graphed(op_standin(op, d_model, tokens)))
            try:  # what fusing the op's kernels (torch.compile) would save: not shipped
                fused = round(time_graph(graphed(op_standin(op, d_model, tokens, True)))[0], 2)
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                fused = f"failed: {type(exc).__name__}: {exc}"[:300]
            row = {
                "model": name,
                "tokens": tokens,
                "layer_us": round(layer_med, 2),
                "layer_us_range": [round(layer_lo, 2), round(layer_hi, 2)],
                "op_us": round(op_med, 2),
                "op_us_range": [round(op_lo, 2), round(op_hi, 2)],
                "op_share_of_layer": round(op_med / layer_med, 4),
                "op_compiled_us": fused,
            }
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_op.json")
