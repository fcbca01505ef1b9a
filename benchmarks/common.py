"""Helpers shared by the benchmarks: statistics, machine facts, dtype choices."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import transformers

# The --dtype choices of the benchmarks.
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and quartiles (inclusive method) of a sample."""
    vals = sorted(float(v) for v in values)
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {
        "median": statistics.median(vals),
        "min": vals[0],
        "max": vals[-1],
        "q1": q1,
        "q3": q3,
        "n": len(vals),
    }


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(dtype_name: str) -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "dtype": dtype_name,
        "loadavg_start": list(os.getloadavg()),
    }


def compare(values: dict[str, list[float]], baseline: str) -> dict[str, Any]:
    """Per-variant summary of a higher-is-better metric and its ratios to ``baseline``.

    ``ratio_of_medians`` is median(v) / median(baseline); ``paired`` summarises the per-round
    ratios (the variants of one round ran back to back, so they saw similar machine load).
    """
    out: dict[str, Any] = {}
    base = statistics.median(values[baseline])
    for v, vals in values.items():
        paired = [x / y for x, y in zip(vals, values[baseline], strict=True)]
        out[v] = {
            "raw": vals,
            **summary(vals),
            "ratio_of_medians": statistics.median(vals) / base,
            "paired_ratio": summary(paired),
            "paired_ratio_raw": paired,
        }
    return out


def fmt_spread(s: dict[str, float], digits: int) -> str:
    return f"[{s['min']:.{digits}f}-{s['max']:.{digits}f}]"
